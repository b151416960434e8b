"""Hopper ring step in Gluon (Triton's explicit-layout dialect): the step's contract (step.py's
module docstring; triton_step.py) with FA3's structure, which Triton 3.6's `tl` cannot express
(bench/NOTES.md: every wgmma wait it emits is `wait_group 0`, so the softmax never overlaps the
tensor cores).

A tile is 128 query rows = (token, head) pairs of one KV head's group (GQA packed, as the Triton
twin). The kernel is persistent: one CTA per SM walks the tiles heavy first (latest tokens, the
longest causal rows, outermost): the tiles of a table built on the host from the requests'
lengths (`work_tiles`, what the ring driver passes), or without one, tiles of the longest request
for every request, skipping the empty ones. With many tiles per CTA the CTAs take them from an
atomic counter (dynamic: a CTA slowed by another kernel on the GPU, a virtual rank's, takes
fewer); with few, in rounds whose order alternates (snake: the CTA that took a round's heaviest
tile takes the next round's lightest, so causal tiles, whose work falls linearly, even out per
CTA, without a counter). Its 1-warp loader streams each
tile's Q ([tokens, group heads, D] TMA boxes) and K/V blocks into shared memory, its counters
running on across tiles, so a tile's loads and pipeline fill overlap the previous tile's work;
under the dynamic schedule it also takes the items and posts each one's index beside its Q.
Three descriptors serve the whole launch (K/V read as [tokens, KV heads x D]); a block that reaches
past its request's end is loaded whole and its V rows past the end are zeroed in shared memory
before the PV product (they are the next request's, whose NaN or Inf a zero p would still spread).
When merging, each consumer copies its rows' previous state into shared memory (cp.async) while the
main loop runs, so the merge does not wait on global memory. Main loop: two consumer warpgroups of
4 warps own 64 rows each. Each issues S_j = Q K_j^T, then O += P_{j-1} V_{j-1}, and does the
softmax of block j while the PV product runs (intra-warpgroup overlap); the two warpgroups
interleave on the tensor cores by themselves (FA3's explicit turn-taking measured no better,
bench/NOTES.md). Ready barriers carry the TMA bytes, empty barriers count both consumers' releases.
P stays in registers as the A operand of the PV wgmma. The mask comes from global positions (key b
visible to query a iff b <= a + shift), applied only to the diagonal band and the ragged tail; the
fp32 running state is merged in the epilogue exactly as the Triton twin does.

Needs sm_90 (wgmma, TMA), float16/bfloat16, head dim 64 or 128, a power-of-two GQA group of at
most 64, Q and K/V rows 16-byte aligned, K/V heads contiguous within a row and a positive
softmax scale (the row max is taken on raw scores); `supports()` says whether a call
qualifies, and the step falls back to the Triton twin otherwise.

Scratch: Triton allocates the device-side descriptors' global scratch per program, 384 bytes
per SM. Launch: the first launch of a specialization goes through Triton's launcher, later ones
call its compiled kernel directly (`_launch`: Triton's binding and specialization cost 30-57 us
of host a step).
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
from triton.runtime import _allocation
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                             warpgroup_mma, warpgroup_mma_wait)

# The step's layout-free math, shared with the Triton twin (Gluon calls Triton's jit helpers).
from .._core import stream_handle
from .._host import cuda_properties
from .triton_step import finish_block, kv_range, merge_state, request_bounds

# Triton 3.7 renamed the TMA load and later the cp.async copy (async_copy_global_to_shared ->
# async_load in both modules).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
ITEM_COPIES = gl.constexpr(4)  # the posted item index, as one 16-byte vector
# Triton 3.6 names it thread_barrier, later releases barrier.
_warp_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_LOG2E = 1.4426950408889634
BLOCK_M = 128      # rows per CTA: two consumer warpgroups of 64
BLOCK_N = 128
# Swept on an H100 with the earlier one-CTA-per-tile kernel (bench/NOTES.md): a third stage or
# FA3's explicit ping-pong of the two warpgroups (P=4, 64k: 587-604 and 620.4 TFLOP/s against
# 610-620.5) did not beat this within a call's noise. With the state prefetch there is no room
# for a third (Q, two stages and the state fill 224 of 227 KB).
STAGES = 2
# Merging steps: each tile's previous state (o fp32, lse) is copied into shared memory while the
# tile's main loop runs (the two o halves take the second Q buffer's room).
# H100, same call: 64k rings 595 / 591 against 589 / 582 TFLOP/s (P=4), 535 / 529 against
# 525 / 521 (P=8); 8k rings unchanged.
PREFETCH_STATE = True
# How the CTAs share the items (`ring_step_gluon`'s schedule): from this many rounds of items per
# CTA on, dynamically (an atomic counter); below, in the static snake order.
# H200, one call (bench/NOTES.md): the dynamic schedule against the snake, 64k prefill on 4
# virtual ranks 61.5 against 63.5 ms (16k tokens per rank, 31 rounds) and steps alone +0.4-1%;
# tied at 2k tokens per rank (3.9 rounds, 428-435 against 423-439 TFLOP/s from a CUDA graph); at
# 1k (1.9 rounds) the counter's zeroing, then one more graph node or launch per step, cost 5% in
# a graph (271 against 285) and 16% launched (172 against the full-round snake's 205; the
# partial-round snake was not timed launched). Launched steps now reuse a counter per stream
# that each launch leaves at zero (H100: one launch per step, 1k launched 0.46 -> 0.60x FA3's
# launched steps); graphs still zero theirs. The threshold was not re-measured since.
DYNAMIC_ROUNDS = 4


@gluon.jit
def _softmax_block(s, m_i, l_i, start_n, n_full, k_len, tok, shift, qk_scale,
                   BN: gl.constexpr, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """Scores of one block -> unnormalized p (fp32), the new max and sum, and the rescale of the
    previous accumulator. Scores stay raw; the scale is folded into the exp2 argument."""
    if start_n >= n_full:  # diagonal band (causal) or ragged tail (keys past k_len)
        offs_n = gl.expand_dims(start_n + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)),
                                0)
        if CAUSAL:
            s = gl.where((offs_n < k_len) & (offs_n <= gl.expand_dims(tok + shift, 1)), s,
                         float("-inf"))
        else:
            s = gl.where(offs_n < k_len, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * qk_scale)  # nothing visible yet
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_scaled, 1))
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _state_ptrs(O, LSE, row0, tok0, q_len, o_row0, head0, stride_ot, stride_oh, stride_lt,
                stride_lh, GROUP: gl.constexpr, M: gl.constexpr, D: gl.constexpr,
                o_layout: gl.constexpr):
    """Pointers into the running state (o, lse) of rows row0 .. row0+M, and which rows exist
    (O may be the output instead: same layout, another dtype)."""
    rows_o = row0 + gl.arange(0, M, layout=gl.SliceLayout(1, o_layout))
    tok_o = tok0 + rows_o // GROUP
    head = head0 + rows_o % GROUP
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    row_off = (o_row0 + tok_o).to(gl.int64)
    o_ptrs = O + gl.expand_dims(row_off * stride_ot + head * stride_oh, 1) + \
        gl.expand_dims(offs_d, 0)
    l_ptrs = LSE + row_off * stride_lt + head * stride_lh
    return o_ptrs, l_ptrs, tok_o < q_len


@gluon.jit
def _work_item(w, work, TOK_M: gl.constexpr, BN: gl.constexpr, CAUSAL: gl.constexpr,
               HAS_TILES: gl.constexpr, DYNAMIC: gl.constexpr):
    """Work item w of the grid, heavy first. Without a tile table the tile index runs outermost
    from the last (longest causal rows) down, then requests, then KV heads (a tile past its
    request's end is an empty item); with one (`work_tiles`), item w is KV head w % n_kv_heads
    of the table's (tile, request) pair w // n_kv_heads. Returns the tile's request bounds, first
    token, KV head and its K/V blocks (n_full, n_blocks; 0 blocks: nothing to attend)."""
    CU_Q, CU_K, TILES, n_tiles, n_req, n_kv_heads, n_items, shift, COUNTER = work
    # Snake order (the static schedule): slot w is CTA w % n_ctas's item in round
    # r = w // n_ctas, and odd rounds hand their items out backwards (a partial last round among
    # the CTAs that have a slot in it), so a CTA that took a heavy item in one round takes a
    # light one in the next. H100, against round robin in one call (two rounds, bench/NOTES.md):
    # +2.0-2.9% / +0.4-3.7% / +3.4-4.9% at 16k / 8k / 2k tokens per rank with full rounds
    # reversed; H200, the partial round reversed too: +11.5% at 1k (285 against 255 TFLOP/s
    # from a CUDA graph), +0.6-4% at 2k.
    if not DYNAMIC:
        n_ctas = gl.num_programs(0)
        r = w // n_ctas
        if r % 2 == 1:
            w = 2 * r * n_ctas + gl.minimum(n_ctas, n_items - r * n_ctas) - 1 - w
    if HAS_TILES:
        pair = w // n_kv_heads
        tile = gl.load(TILES + 2 * pair)
        b = gl.load(TILES + 2 * pair + 1)
        hk = w % n_kv_heads
    else:
        tile = n_tiles - 1 - w // (n_req * n_kv_heads)
        rest = w % (n_req * n_kv_heads)
        b = rest // n_kv_heads
        hk = rest % n_kv_heads
    q_start, q_len, k_start, k_len = request_bounds(CU_Q, CU_K, b)
    t0 = tile * TOK_M
    n_full, n_end = kv_range(t0, TOK_M, q_len, k_len, shift, BN, CAUSAL)
    n_blocks = gl.cdiv(gl.maximum(n_end, 0), BN)
    if t0 >= q_len:
        n_blocks = 0
    return q_start, q_len, k_start, k_len, t0, hk, n_full, n_blocks


@gluon.jit
def _next_item(COUNTER, n_ctas):
    """The dynamic schedule's next item: past every CTA's first (its program id), the items are
    handed out by an atomic counter (the launch's last take zeroes it). One lane adds; a warp reduction (shuffles,
    no shared memory) gives every lane its result."""
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    lane = gl.arange(0, 32, layout=lanes)
    one = lane == 0
    old = gl.atomic_add(COUNTER + lane * 0, gl.full([32], 1, gl.int32, layout=lanes), mask=one)
    return n_ctas + gl.sum(gl.where(one, old, 0), 0)


@gluon.jit
def _reset_counter_after_last_take(COUNTER, w, n_ctas, n_items):
    """The dynamic schedule leaves its counter at zero for the next launch on the stream. The
    grid has at most n_items CTAs, and each takes from the counter until its take runs past the
    last item (exactly once), so a launch takes n_items times in all: the CTA whose take
    returned the last value (w == n_ctas + n_items - 1) is the counter's last user and zeroes it
    (same thread and address as its atomic, so the store follows it)."""
    if w == n_ctas + n_items - 1:
        lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        lane = gl.arange(0, 32, layout=lanes)
        gl.store(COUNTER + lane * 0, gl.zeros([32], gl.int32, layout=lanes), mask=lane == 0)


@gluon.jit
def _post_item(item_smem, q_empty, it, w, Q_BUFS: gl.constexpr):
    """The dynamic schedule: wait for the Q buffer of the loader's it-th item, then write the
    item's index beside it for the consumers (they read it once q_ready completes)."""
    qb = it % Q_BUFS
    mbarrier.wait(q_empty.index(qb), ((it // Q_BUFS) & 1) ^ 1)
    copies: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    item_smem.index(qb).store(gl.full([ITEM_COPIES], w, gl.int32, layout=copies))
    _warp_barrier()  # every lane's store before the arrive that releases them
    return qb


@gluon.jit
def _take_item(item_smem, q_ready, it, Q_BUFS: gl.constexpr):
    """The dynamic schedule, in a consumer: the index of the it-th item the loader posted."""
    qb = it % Q_BUFS
    mbarrier.wait(q_ready.index(qb), (it // Q_BUFS) & 1)
    # every thread reads all copies (one vector load) and reduces in its registers
    each: gl.constexpr = gl.BlockedLayout([ITEM_COPIES], [32], [4], [0])
    return gl.max(item_smem.index(qb).load(each), 0)


@gluon.jit
def _loader(args, GROUP: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr,
            PREFETCH: gl.constexpr, HAS_TILES: gl.constexpr, DYNAMIC: gl.constexpr):
    """Every item's Q tile (two buffers, or one when the consumers prefetch the previous state)
    and K/V blocks (the stage ring, its counters running on across items) through TMA. With the
    dynamic schedule it also takes the items from the counter and posts each one's index with
    its Q tile (an item with nothing to attend posts with a plain arrive), then an index past
    the last, which ends the consumers' walk."""
    descs, smem, bars, work, state = args
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem, o_smem, item_smem = smem
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, fix_bar = bars
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    BN: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = k_smem.type.shape[2]
    TOK_M: gl.constexpr = q_smem.type.shape[1]
    Q_BUFS: gl.constexpr = q_smem.type.shape[0]
    n_items = work[6]
    n_ctas = gl.num_programs(0)
    it = 0
    kv = 0
    w = gl.program_id(0)
    while w < n_items:
        q_start, q_len, k_start, k_len, t0, hk, n_full, n_blocks = _work_item(
            w, work, TOK_M, BN, CAUSAL, HAS_TILES, DYNAMIC)
        if DYNAMIC:
            qb = _post_item(item_smem, q_empty, it, w, Q_BUFS)
            if n_blocks > 0:
                mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
                _tma_load(q_desc, [q_start + t0, hk * GROUP, 0], q_ready.index(qb),
                          q_smem.index(qb))
            else:
                mbarrier.arrive(q_ready.index(qb), count=1)
            it += 1
        elif n_blocks > 0:
            qb = it % Q_BUFS
            mbarrier.wait(q_empty.index(qb), ((it // Q_BUFS) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_start + t0, hk * GROUP, 0], q_ready.index(qb),
                      q_smem.index(qb))
            it += 1
        for j in range(n_blocks):
            s = kv % NUM_STAGES
            phase = (kv // NUM_STAGES) & 1
            row = k_start + j * BN
            mbarrier.wait(k_empty.index(s), phase ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            _tma_load(k_desc, [row, hk * D], k_ready.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), phase ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            _tma_load(v_desc, [row, hk * D], v_ready.index(s), v_smem.index(s))
            kv += 1
        if DYNAMIC:
            w = _next_item(work[8], n_ctas)
        else:
            w += n_ctas
    if DYNAMIC:  # past the last item: the consumers stop
        qb = _post_item(item_smem, q_empty, it, w, Q_BUFS)
        mbarrier.arrive(q_ready.index(qb), count=1)
        _reset_counter_after_last_take(work[8], w, n_ctas, n_items)


@gluon.jit
def _zero_rows_past(v_stage, first_zero, fix_bar, nfix, WG: gl.constexpr, M: gl.constexpr):
    """Zero the V rows from first_zero on (keys past the request's end: the next request's rows,
    which may hold NaN or Inf that a zero p would still turn into NaN); each consumer warpgroup
    zeros half the rows, then both meet at fix_bar."""
    BN: gl.constexpr = v_stage.type.shape[0]
    D: gl.constexpr = v_stage.type.shape[1]
    CH: gl.constexpr = 16
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])
    for r0 in gl.static_range(WG * (BN // 2), (WG + 1) * (BN // 2), CH):
        chunk = v_stage.slice(r0, CH)
        rows = r0 + gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
        x = chunk.load(layout)
        chunk.store(gl.where(gl.expand_dims(rows < first_zero, 1), x, gl.zeros_like(x)))
    fence_async_shared()
    mbarrier.arrive(fix_bar, count=1)
    mbarrier.wait(fix_bar, nfix & 1)


@gluon.jit
def _prefetch_state(O, LSE, o_stage, row0, tok0, q_len, o_row0, head0, stride_ot, stride_oh,
                    stride_lt, stride_lh, GROUP: gl.constexpr, M: gl.constexpr, D: gl.constexpr,
                    o_layout: gl.constexpr):
    """Start copying the running state's o rows row0 .. row0+M into shared memory (cp.async,
    rows past the request zero-filled) and load their lse: the merge at the tile's end then
    reads them without waiting on global memory."""
    CH: gl.constexpr = 16
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // D, D // 4], [4, 1], [1, 0])
    offs_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, layout)), 0)
    for c in gl.static_range(0, M, CH):
        rows = row0 + c + gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
        tok = tok0 + rows // GROUP
        head = head0 + rows % GROUP
        ptrs = O + gl.expand_dims((o_row0 + tok).to(gl.int64) * stride_ot + head * stride_oh,
                                  1) + offs_d
        _cp_async(o_stage.slice(c, CH), ptrs, mask=gl.expand_dims(tok < q_len, 1))
    async_copy.commit_group()
    _, l_ptrs, row_ok = _state_ptrs(O, LSE, row0, tok0, q_len, o_row0, head0, stride_ot,
                                    stride_oh, stride_lt, stride_lh, GROUP, M, D, o_layout)
    return gl.load(l_ptrs, mask=row_ok, other=float("-inf"))


@gluon.jit
def _epilogue(acc, m_i, l_i, qk_scale, O, OUT, LSE, o_stage, lse_prev, row0, tok0, q_len,
              o_row0, head0, stride_ot, stride_oh, stride_lt, stride_lh, GROUP: gl.constexpr,
              M: gl.constexpr, D: gl.constexpr, o_layout: gl.constexpr,
              ACCUMULATE: gl.constexpr, PREFETCH: gl.constexpr):
    """The block's state from a consumer's sums, written or merged into the running state: the
    Triton twin's epilogue, row for row (the scores' max m_i is raw, not log2 units). With
    PREFETCH the previous state comes from `_prefetch_state` (o_stage, lse_prev), else from
    global memory (the two are unused). The merged o goes to OUT: O itself, or on a ring's last
    step the output in its own dtype (O's layout), which saves the cast kernel after the ring."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_ptrs, l_ptrs, row_ok = _state_ptrs(O, LSE, row0, tok0, q_len, o_row0, head0, stride_ot,
                                         stride_oh, stride_lt, stride_lh, GROUP, M, D, o_layout)
    out_ptrs, _, _ = _state_ptrs(OUT, LSE, row0, tok0, q_len, o_row0, head0, stride_ot,
                                 stride_oh, stride_lt, stride_lh, GROUP, M, D, o_layout)
    out_dtype: gl.constexpr = OUT.dtype.element_ty
    seen, o_blk, lse_blk = finish_block(acc, gl.convert_layout(m_i, row_o) * qk_scale,
                                        gl.convert_layout(l_i, row_o))
    ok2 = gl.expand_dims(row_ok, 1)
    if ACCUMULATE:
        # Merge into the running state; rows that saw nothing here write their state back
        # unchanged. (Masks stay functions of the row index: Triton 3.6's axis analysis has no
        # information on values carried out of the KV loop inside a warp-specialized partition
        # and crashes on a store masked by one.)
        if PREFETCH:
            async_copy.wait_group(0)
            o_prev = o_stage.load(o_layout)
        else:
            lse_prev = gl.load(l_ptrs, mask=row_ok, other=float("-inf"))
            o_prev = gl.load(o_ptrs, mask=ok2, other=0.0)
        o_new, lse_new = merge_state(o_prev, lse_prev, o_blk, lse_blk)
        gl.store(out_ptrs, gl.where(gl.expand_dims(seen, 1), o_new, o_prev).to(out_dtype),
                 mask=ok2)
        gl.store(l_ptrs, gl.where(seen, lse_new, lse_prev), mask=row_ok)
    else:
        gl.store(out_ptrs, o_blk.to(out_dtype), mask=ok2)
        gl.store(l_ptrs, lse_blk, mask=row_ok)


@gluon.jit
def _consumer(args, GROUP: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr,
              PREFETCH: gl.constexpr, HAS_TILES: gl.constexpr, DYNAMIC: gl.constexpr,
              WG: gl.constexpr):
    descs, smem, bars, work, state = args
    q_smem, k_smem, v_smem, o_smem, item_smem = smem
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, fix_bar = bars
    n_items, shift = work[6], work[7]
    qk_scale, O, OUT, LSE, stride_ot, stride_oh, stride_lt, stride_lh = state
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    BN: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = k_smem.type.shape[2]
    TOK_M: gl.constexpr = q_smem.type.shape[1]
    Q_BUFS: gl.constexpr = q_smem.type.shape[0]
    BM: gl.constexpr = TOK_M * GROUP
    M: gl.constexpr = BM // 2
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([M, BN], gl.float32, layout=s_layout)
    rows = WG * M + gl.arange(0, M, layout=row_s)
    o_stage = None  # this warpgroup's rows of the prefetched state
    if PREFETCH:
        o_stage = o_smem.index(WG)
    it = 0
    kv = 0
    nfix = 0
    if DYNAMIC:
        w = _take_item(item_smem, q_ready, 0, Q_BUFS)
    else:
        w = gl.program_id(0)
    while w < n_items:
        q_start, q_len, k_start, k_len, t0, hk, n_full, n_blocks = _work_item(
            w, work, TOK_M, BN, CAUSAL, HAS_TILES, DYNAMIC)
        tok = t0 + rows // GROUP
        if PREFETCH:
            if t0 < q_len:
                lse_prev = _prefetch_state(O, LSE, o_stage, WG * M, t0, q_len, q_start,
                                           hk * GROUP, stride_ot, stride_oh, stride_lt,
                                           stride_lh, GROUP, M, D, o_layout)
            else:  # an empty item (no tile table): nothing to fetch, nor to merge below
                lse_prev = gl.full([M], float("-inf"), gl.float32, layout=row_o)
        else:
            lse_prev = None
        m_i = gl.full([M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([M], gl.float32, layout=row_s)
        acc = gl.zeros([M, D], gl.float32, layout=o_layout)
        qb = it % Q_BUFS
        if n_blocks > 0:
            if not DYNAMIC:  # (the dynamic schedule waited for it with the item's index)
                mbarrier.wait(q_ready.index(qb), (it // Q_BUFS) & 1)
            q = q_smem.index(qb).reshape([BM, D]).slice(WG * M, M)
            cur = kv % NUM_STAGES
            mbarrier.wait(k_ready.index(cur), (kv // NUM_STAGES) & 1)
            s_tok = warpgroup_mma(q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(cur), count=1)
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, 0, n_full, k_len, tok, shift,
                                                qk_scale, BN, CAUSAL, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                prev = (kv + j - 1) % NUM_STAGES
                cur = (kv + j) % NUM_STAGES
                mbarrier.wait(k_ready.index(cur), ((kv + j) // NUM_STAGES) & 1)
                mbarrier.wait(v_ready.index(prev), ((kv + j - 1) // NUM_STAGES) & 1)
                s_tok = warpgroup_mma(q, k_smem.index(cur).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])  # groups retire in order: S_j is done
                mbarrier.arrive(k_empty.index(cur), count=1)
                p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, j * BN, n_full, k_len, tok,
                                                    shift, qk_scale, BN, CAUSAL, s_layout)
                acc = warpgroup_mma_wait(0, deps=[o_tok])
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.arrive(q_empty.index(qb), count=1)  # every S of this tile is done
            it += 1
            last_kv = kv + n_blocks - 1
            last = last_kv % NUM_STAGES
            mbarrier.wait(v_ready.index(last), (last_kv // NUM_STAGES) & 1)
            if n_blocks * BN > k_len:  # the block reaches past the request's last key
                _zero_rows_past(v_smem.index(last), k_len - (n_blocks - 1) * BN,
                                fix_bar.index(0), nfix, WG, M)
                nfix += 1
            o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(last), count=1)
            kv += n_blocks
        elif DYNAMIC:  # the loader posted the item with its Q buffer: hand it back
            # (Triton puts a barrier of the warpgroup before each arrive, checked in the PTX of
            # 3.6 and 3.9, so all four warps have read the index before the slot is released.)
            mbarrier.arrive(q_empty.index(qb), count=1)
            it += 1
        if t0 < q_len:
            _epilogue(acc, m_i, l_i, qk_scale, O, OUT, LSE, o_stage, lse_prev, WG * M, t0,
                      q_len, q_start, hk * GROUP, stride_ot, stride_oh, stride_lt, stride_lh,
                      GROUP, M, D, o_layout, ACCUMULATE, PREFETCH)
        if DYNAMIC:
            w = _take_item(item_smem, q_ready, it, Q_BUFS)
        else:
            w += gl.num_programs(0)


@gluon.jit
def _consumer0(args, GROUP: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr,
               PREFETCH: gl.constexpr, HAS_TILES: gl.constexpr, DYNAMIC: gl.constexpr):
    _consumer(args, GROUP, CAUSAL, ACCUMULATE, PREFETCH, HAS_TILES, DYNAMIC, 0)


@gluon.jit
def _consumer1(args, GROUP: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr,
               PREFETCH: gl.constexpr, HAS_TILES: gl.constexpr, DYNAMIC: gl.constexpr):
    _consumer(args, GROUP, CAUSAL, ACCUMULATE, PREFETCH, HAS_TILES, DYNAMIC, 1)


@gluon.jit
def _ring_step_gluon_kernel(Q, K, V, O, OUT, LSE, CU_Q, CU_K, TILES, COUNTER, Tq, Tk, n_q_heads,
                            n_kv_heads,
                            stride_qt, stride_qh, stride_kt, stride_vt, stride_ot, stride_oh,
                            stride_lt, stride_lh, qk_scale, shift, n_tiles, n_req, n_items,
                            GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BN: gl.constexpr,
                            NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                            ACCUMULATE: gl.constexpr, PREFETCH: gl.constexpr,
                            Q_BUFS: gl.constexpr, HAS_TILES: gl.constexpr,
                            DYNAMIC: gl.constexpr):
    TOK_M: gl.constexpr = 128 // GROUP
    dtype: gl.constexpr = Q.dtype.element_ty
    gl.static_assert(ACCUMULATE or not PREFETCH, "the prefetched epilogue always merges")
    # Three descriptors for the whole launch, built once per CTA on the device. K/V are read as
    # [tokens, KV heads x D]: a block of one head is a [BN, D] box. A block that reaches past
    # its request reads the next request's rows (zeroed in shared memory before the PV product,
    # _zero_rows_past) or, past the tensor, TMA's zeros.
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TOK_M, GROUP, HEAD_DIM], dtype)
    q_desc = tma.make_tensor_descriptor(Q, [Tq, n_q_heads, HEAD_DIM], [stride_qt, stride_qh, 1],
                                        [TOK_M, GROUP, HEAD_DIM], q_layout)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, HEAD_DIM], dtype)
    k_desc = tma.make_tensor_descriptor(K, [Tk, n_kv_heads * HEAD_DIM], [stride_kt, 1],
                                        [BN, HEAD_DIM], kv_layout)
    v_desc = tma.make_tensor_descriptor(V, [Tk, n_kv_heads * HEAD_DIM], [stride_vt, 1],
                                        [BN, HEAD_DIM], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFS, TOK_M, GROUP, HEAD_DIM], q_layout)
    if PREFETCH:  # the running state's o rows of a tile, fp32 (the merge's input)
        o_smem = gl.allocate_shared_memory(gl.float32, [2, 64, HEAD_DIM],
                                           gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    else:  # a placeholder: warp_specialize's arguments cannot be None
        o_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 4],
                                           gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # The dynamic schedule's item index beside each Q buffer.
    item_smem = gl.allocate_shared_memory(gl.int32, [Q_BUFS, ITEM_COPIES],
                                          gl.SwizzledSharedLayout(1, 1, 1, [0]))
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BN, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BN, HEAD_DIM], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    fix_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one release per consumer warpgroup
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(fix_bar.index(0), count=2)
    # What the partitions share, by role (Gluon hands every partition the same arguments):
    args = ((q_desc, k_desc, v_desc), (q_smem, k_smem, v_smem, o_smem, item_smem),
            (q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, fix_bar),
            (CU_Q, CU_K, TILES, n_tiles, n_req, n_kv_heads, n_items, shift, COUNTER),  # the work
            (qk_scale, O, OUT, LSE, stride_ot, stride_oh, stride_lt, stride_lh))  # the state
    # (constexprs stay constexpr only when written out in each partition's tuple)
    gl.warp_specialize(
        [(_consumer0, (args, GROUP, CAUSAL, ACCUMULATE, PREFETCH, HAS_TILES, DYNAMIC)),
         (_consumer1, (args, GROUP, CAUSAL, ACCUMULATE, PREFETCH, HAS_TILES, DYNAMIC)),
         (_loader, (args, GROUP, CAUSAL, ACCUMULATE, PREFETCH, HAS_TILES, DYNAMIC))],
                       [4, 1], [240, 24])


_compile_error = []  # set once a launch failed to compile: this Triton cannot build the kernel


def supports(q, k, v, o_state=None, lse_state=None) -> bool:
    """Whether the Gluon step can run this call (else the Triton twin does); the kernels keep
    the running state in float32 only."""
    if _compile_error or q.device.type != "cuda" or q.dtype not in (torch.float16,
                                                                     torch.bfloat16):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (o_state, lse_state)):
        return False
    if cuda_properties(q.get_device()).major != 9:
        return False
    Hq, D = q.shape[1], q.shape[2]
    group = Hq // k.shape[1]
    if D not in (64, 128) or group & (group - 1) or group > 64 or k.shape[0] == 0:
        return False  # (a TMA descriptor needs at least one key row)
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != D or (t.stride(0) * t.element_size()) % 16 \
                or t.data_ptr() % 16:
            return False
    # Q is read through TMA too: 16-byte aligned rows and heads.
    return q.stride(2) == 1 and not ((q.stride(0) * q.element_size()) % 16
                                     or (q.stride(1) * q.element_size()) % 16
                                     or q.data_ptr() % 16)


def _scratch(size: int, alignment: int, stream):
    """Global scratch for the device-side TMA descriptors (Triton asks for 128 bytes per
    descriptor and program at each launch): a fresh block from torch's caching allocator, so
    reuse is stream-ordered and a CUDA graph capture keeps its own (~3 µs of host time)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Install our scratch allocator unless the application set one of its own (per step: the
    setting is a ContextVar, so each thread of virtual ranks starts without it)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def work_tiles(q_lengths, num_q_heads: int, num_kv_heads: int, device) -> torch.Tensor:
    """The tile table of a packed batch whose requests hold q_lengths query tokens (host ints):
    int32 [pairs, 2] of (tile, request), every tile of every request once, heavy first (tile
    index descending: the longest causal rows; requests ascending within a tile index), on
    `device`. With it the kernel walks only real tiles; without it, tiles of the longest
    request x requests, skipping the empty ones. One 8k request packed with 63 of 64 tokens
    (H100, causal, state written / merged; the 8k request alone 854 / 897 us): 913 / 954 us
    with the table, 1118 / 1152 without (3347 merged before empty items skipped the prefetch
    and the epilogue)."""
    tok_m = BLOCK_M // (num_q_heads // num_kv_heads)
    lengths = torch.as_tensor(list(q_lengths), dtype=torch.int64)
    tiles = (lengths + tok_m - 1) // tok_m
    req = torch.repeat_interleave(torch.arange(len(lengths)), tiles)
    tile = torch.arange(req.numel()) - (torch.cumsum(tiles, 0) - tiles)[req]
    order = torch.sort(-tile, stable=True).indices
    return torch.stack([tile[order], req[order]], 1).to(torch.int32).to(device)


_stream_counters = {}  # (device index, stream handle) -> (the stream, its int32 [1] counter)


def _dynamic_counter(device) -> torch.Tensor:
    """The dynamic schedule's item counter for a launch on the current stream: zero when the
    launch starts. Each launch leaves it at zero (`_reset_counter_after_last_take`) and launches
    on one stream run in order, so each stream keeps one, zeroed once (the entry holds the
    stream, so its handle is not reused while the counter lives). Under CUDA graph capture a
    fresh one, zeroed by a node of the graph: graphs captured on one stream (torch's shared
    capture stream) may be replayed side by side on others."""
    stream = torch.cuda.current_stream(device)
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (stream.device_index, stream.cuda_stream)
    entry = _stream_counters.get(key)
    if entry is None:
        entry = _stream_counters[key] = (stream, torch.zeros(1, dtype=torch.int32, device=device))
    return entry[1]


def _check_schedule(schedule):
    if schedule not in (None, "snake", "dynamic"):
        raise ValueError(f"schedule must be None, 'snake' or 'dynamic', not {schedule!r}")


def takes_items_dynamically(n_items: int, n_ctas: int, schedule=None) -> bool:
    """Whether a launch of n_items items on n_ctas CTAs uses the dynamic schedule: as `schedule`
    says ("dynamic" / "snake"), or with None from DYNAMIC_ROUNDS items per CTA on."""
    _check_schedule(schedule)
    if schedule is not None:
        return schedule == "dynamic"
    return n_items >= DYNAMIC_ROUNDS * n_ctas


def ring_step_gluon(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
                    accumulate, softmax_scale, stages=STAGES, block_n=BLOCK_N,
                    prefetch_state=PREFETCH_STATE, tiles=None, schedule=None, out=None):
    """Launch the Gluon ring step (arguments as step.run_step's, positional, torch tensors; the
    caller checked `supports`). prefetch_state: merging steps copy each tile's previous state
    into shared memory during its main loop. tiles: None, or `work_tiles` of this batch's
    query lengths (not checked against cu_q). schedule: "dynamic" (items from an atomic
    counter, which each launch leaves at zero), "snake" (static), or None: dynamic from
    DYNAMIC_ROUNDS items per CTA on. out: None, or a contiguous tensor of q's shape and dtype
    that takes the merged o in o_state's place (o_state contiguous too; it is left stale)."""
    _check_schedule(schedule)  # (before any early return)
    Tq, Hq, D = q.shape
    group = Hq // k.shape[1]
    B = cu_q.shape[0] - 1
    if Tq == 0 or B == 0:
        return
    n_tiles = max(1, math.ceil(max_q_len / (BLOCK_M // group)))
    n_items = (n_tiles * B if tiles is None else tiles.shape[0]) * k.shape[1]
    if n_items == 0:  # a table of no tiles: no request has queries
        return
    grid = (min(n_items, cuda_properties(q.get_device()).multi_processor_count),)
    dynamic = takes_items_dynamically(n_items, grid[0], schedule)
    _ensure_allocator()
    prefetch = bool(prefetch_state and accumulate)
    # The dynamic schedule's counter (else an unused placeholder pointer).
    counter = _dynamic_counter(q.device) if dynamic else cu_q
    args = (grid, q, k, v, cu_q, cu_k, tiles, counter, o_state,
            o_state if out is None else out, lse_state, group, D, n_tiles, B, n_items, causal,
            mask_shift, accumulate, softmax_scale, stages, block_n, prefetch, dynamic)
    key = (q.dtype, group, D, bool(causal), bool(accumulate), stages, block_n, prefetch,
           tiles is not None, dynamic, out is not None)
    if key not in _compiled:
        # Gluon is experimental and its API moves between Triton releases (verified on a GPU:
        # 3.6; the CPU tests compile it for sm_90a with the installed Triton). Each
        # specialization is compiled once without launching; a Triton that cannot build it (any
        # error of the compiler, before anything runs) gets the Triton twin, with one warning.
        try:
            _launch(*args, warmup=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "cannot build"
            _compile_error.append(exc)
            warnings.warn(f"the Gluon ring step does not compile with Triton "
                          f"{triton.__version__} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "ring steps use the Triton kernel instead", RuntimeWarning,
                          stacklevel=3)
            from .triton_step import ring_step_triton

            ring_step_triton(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal,
                             mask_shift, accumulate, softmax_scale)
            if out is not None:
                out.copy_(o_state)
            return
        _compiled.add(key)
    _launch(*args)


_compiled = set()  # specializations known to compile with this Triton


def _launch(grid, q, k, v, cu_q, cu_k, tiles, counter, o_state, out, lse_state, group, D,
            n_tiles, B, n_items, causal, mask_shift, accumulate, softmax_scale, stages, block_n,
            prefetch, dynamic, warmup=False):
    params = (q, k, v, o_state, out, lse_state, cu_q, cu_k, cu_q if tiles is None else tiles,
              counter, q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.stride(0), q.stride(1),
              k.stride(0), v.stride(0), o_state.stride(0), o_state.stride(1), lse_state.stride(0),
              lse_state.stride(1), softmax_scale * _LOG2E, int(mask_shift), n_tiles, B, n_items)
    constexprs = (group, D, block_n, stages, bool(causal), bool(accumulate), prefetch,
                  1 if prefetch else 2, tiles is not None, dynamic)
    if warmup:
        _ring_step_gluon_kernel.warmup(*params, **dict(zip(_CONSTEXPR_NAMES, constexprs)),
                                       num_warps=4, maxnreg=168, grid=grid)
        return
    device = q.get_device()
    options = _direct_launch_options()
    direct = options is not None and device == torch.cuda.current_device()
    if direct:
        key = (device, options, constexprs, _specialization(params))
        kernel = _direct_kernels.get(key)
        if kernel is not None:
            kernel.run(grid[0], 1, 1, stream_handle(q.device), kernel.function,
                       kernel.packed_metadata, None, None, None, *params, *constexprs)
            return
    kernel = _ring_step_gluon_kernel[grid](*params, **dict(zip(_CONSTEXPR_NAMES, constexprs)),
                                           num_warps=4, maxnreg=168)
    if direct and hasattr(kernel, "run") and not hasattr(kernel, "result"):
        _direct_kernels[key] = kernel


# Triton's launcher binds and specializes every argument again at each launch: 30-57 us of host
# per step on an H100 host (diag_step.py --only host), about what a 1k-token step takes on the
# GPU. After one launch through it, a specialization's compiled kernel is launched directly
# (the call Triton's launcher ends in), keyed at least as finely as Triton 3.6 specializes the
# arguments (each tensor's dtype and 16-byte alignment, each integer's divisibility by 16,
# equality to 1 and int32 range; no argument here reaches 2**63), plus the constexprs, the
# device and the compile options the environment can change (debug, instrumentation). Launch or
# pre-run hooks (a profiler's) take Triton's path.
_direct_kernels = {}
_CONSTEXPR_NAMES = ("GROUP", "HEAD_DIM", "BN", "NUM_STAGES", "CAUSAL", "ACCUMULATE", "PREFETCH",
                    "Q_BUFS", "HAS_TILES", "DYNAMIC")
_INT32 = range(-2 ** 31, 2 ** 31)


def _specialization(params) -> tuple:
    """What selects the compiled kernel among launches of the same constexprs: at least as fine
    as Triton's own specialization key (tensors: dtype, 16-byte alignment; integers: divisible by
    16, equal to 1, 32-bit or not; floats: nothing)."""
    out = []
    for a in params:
        if a.__class__ is int:
            out.append((a % 16 == 0, a == 1, a in _INT32))
        elif a.__class__ is float:
            out.append(None)
        else:
            out.append((a.dtype, a.data_ptr() % 16 == 0))
    return tuple(out)


def _direct_launch_options():
    """The compile options Triton's launcher would read from the environment, as part of the
    direct launch's key; None when a hook must see the launch (Triton 3.6+ keeps each launch
    hook as a chain of hooks, empty by default)."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or _ring_step_gluon_kernel.pre_run_hooks:
        return None
    if not all(h is None or getattr(h, "calls", None) == []
               for h in (runtime.launch_enter_hook, runtime.launch_exit_hook)):
        return None
    return bool(runtime.debug), knobs.compilation.instrumentation_mode
