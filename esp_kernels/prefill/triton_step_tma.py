"""Opt-in variants of the Triton ring step (issue 21): same contract as triton_step.py.

The default kernel (triton_step.py) reaches 0.74x / 0.64x FA3 (P=4 / P=8 of L=64k, H100). These
variants try what FA3-class Hopper kernels do and Triton 3.6 can express on sm_90:

- "fold":      pointer loads as today, but the softmax scale folded into one FMA per score
               (m from the raw max, p = exp2(qk * scale - m)), no load mask outside the band.
- "tma":       "fold" with K/V tiles loaded through device-side TMA descriptors, one per
               (request, KV head): base = that head's first key, shape [k_len, D], so rows past
               the request's end come back as zeros from the hardware (no other request's keys or
               values ever enter the tile: 0 * NaN cannot leak). TMA loads are asynchronous
               bulk copies with mbarriers: no per-thread address math, no registers for it.
- "tma_pipe":  "tma" with the QK^T of block j+1 issued before the softmax of block j (FA3's
               intra-warpgroup overlap, written as a rotated loop that carries S to the next
               iteration; Triton's wgmma is asynchronous, so the tensor cores work on S_{j+1}
               while the CUDA cores exponentiate S_j). One extra QK^T per CTA (the prefetch past
               the last block, read as zeros or discarded).
- "tma_lazy":  "tma" with FA4's conditional rescale: the running max only moves (and acc is only
               rescaled) when some row's max grew by more than 8 (log2 domain); p then stays
               <= 2^8, exact after the final division.
- "tma_ws":    "tma" with `tl.range(..., warp_specialize=True)` (Triton 3.6's Hopper
               warp-specialization pass: a TMA producer warpgroup and two consumer warpgroups,
               12 warps for num_warps=4). The pass only accepts TMA loads and no early exit, so
               Q also comes through a 3-D descriptor [q_len, Hq, D] (whole head groups: G a power
               of two, else the call runs "tma"), and a tile past its request's end runs an empty
               loop instead of returning. In 3.6 the pass crashes at BLOCK_M 128 (data
               partition: "Unexpected op") and does nothing at num_warps 8: use BLOCK_M 64, w4,
               num_stages <= 2 (s3 asks for 279 KB of shared memory).

All keep the contract: global-position mask (key b visible to query a iff b <= a + shift), keys
past k_len never visible, rows that see nothing keep the state untouched, NaN propagation, varlen,
GQA packing (rows = (token, head-in-group) pairs, G padded to a power of two), ACCUMULATE or not.

On the CPU this runs under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported),
float16/float32 only (bf16 dot is wrong there). TMA descriptors need 16-byte aligned bases and
strides; a call that does not meet that runs the pointer path of the same variant.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LAZY_THRESHOLD = 8.0  # log2 domain: p <= 256 between rescales

# name -> kernel flags
VARIANTS = {
    "fold": dict(USE_TMA=False, PIPE=False, LAZY=False, WS=False),
    "tma": dict(USE_TMA=True, PIPE=False, LAZY=False, WS=False),
    "tma_pipe": dict(USE_TMA=True, PIPE=True, LAZY=False, WS=False),
    "tma_lazy": dict(USE_TMA=True, PIPE=False, LAZY=True, WS=False),
    "tma_ws": dict(USE_TMA=True, PIPE=False, LAZY=False, WS=True),
}


@triton.jit
def _load_k(k_desc, k_base, stride_kt, start_n, k_len, offs_d, BLOCK_N: tl.constexpr,
            USE_TMA: tl.constexpr, MASK_LOAD: tl.constexpr):
    """K tile as [HEAD_DIM, BLOCK_N] (the B operand of q @ k^T)."""
    if USE_TMA:
        k = k_desc.load([start_n, 0]).T
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
        if MASK_LOAD:
            k = tl.load(ptrs, mask=(offs_n < k_len)[None, :], other=0.0)
        else:
            k = tl.load(ptrs)
    return k


@triton.jit
def _load_v(v_desc, v_base, stride_vt, start_n, k_len, offs_d, BLOCK_N: tl.constexpr,
            USE_TMA: tl.constexpr, MASK_LOAD: tl.constexpr):
    if USE_TMA:
        v = v_desc.load([start_n, 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASK_LOAD:
            v = tl.load(ptrs, mask=(offs_n < k_len)[:, None], other=0.0)
        else:
            v = tl.load(ptrs)
    return v


@triton.jit
def _softmax_update(acc, m_i, l_i, qk, v, start_n, k_len, tok, shift, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    LAZY: tl.constexpr, LAZY_TH: tl.constexpr):
    """Online softmax of one raw score tile qk = q @ k^T (scale not applied yet), then acc += p v.
    m_i is in the log2 domain (already scaled)."""
    if MASKED:  # diagonal band (causal) or ragged tail (keys past k_len)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = (offs_n < k_len)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= tok[:, None] + shift)
        qk = tl.where(visible, qk, float("-inf"))
    # scale > 0 (checked on the host): max(qk) * scale == max(qk * scale)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if LAZY:
        # m_i = -inf, m_new finite: a huge growth (the clamp keeps -inf - -inf out)
        grow = tl.where(m_new > m_i, m_new - tl.maximum(m_i, -1e30), 0.0)
        if tl.max(grow, 0) > LAZY_TH:
            m_s_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_s_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        m_s = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows with nothing visible yet
        p = tl.math.exp2(qk * qk_scale - m_s[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_i, l_i
    else:
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk * qk_scale - m_s[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_s)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_new, l_i


@triton.jit
def _ring_step_kernel_v2(Q, K, V, O, LSE, CU_Q, CU_K,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh, stride_lt, stride_lh,
                         qk_scale, shift, n_tiles,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                         ACCUMULATE: tl.constexpr, USE_TMA: tl.constexpr, PIPE: tl.constexpr,
                         LAZY: tl.constexpr, WS: tl.constexpr, LAZY_TH: tl.constexpr):
    TOK_M: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = n_tiles - 1 - tl.program_id(0)  # heavy (late, long causal rows) tiles first
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    t0 = tile * TOK_M
    if not WS:  # (Hopper's warp-specialization pass asserts on the early exit's branch)
        if t0 >= q_len:
            return
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP_PAD
    head = hk * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)  # padded head slots of odd groups idle
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    if WS:  # the warp-specialized producer wants TMA loads only (needs GROUP == GROUP_PAD)
        # An empty request (q_len 0, possibly at the end of q) reads one row of valid memory
        # that no stored row uses; past q_len TMA returns zeros.
        q_row0 = tl.maximum(q_start - (q_len == 0).to(tl.int32), 0)
        q_desc = tl.make_tensor_descriptor(Q + q_row0.to(tl.int64) * stride_qt,
                                           shape=[tl.maximum(q_len, 1),
                                                  GROUP * tl.num_programs(2), HEAD_DIM],
                                           strides=[stride_qt, stride_qh, 1],
                                           block_shape=[TOK_M, GROUP_PAD, HEAD_DIM])
        q = q_desc.load([t0, hk * GROUP, 0]).reshape([BLOCK_M, HEAD_DIM])
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    if USE_TMA:
        # One descriptor per (request, KV head): rows past k_len read as zeros.
        rows_k = tl.maximum(k_len, 1)  # never loaded when k_len == 0
        k_desc = tl.make_tensor_descriptor(k_base, shape=[rows_k, HEAD_DIM],
                                           strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[rows_k, HEAD_DIM],
                                           strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_base
        v_desc = v_base
    if CAUSAL:
        last_tok = tl.minimum(t0 + TOK_M, q_len) - 1
        n_end = tl.minimum(k_len, last_tok + shift + 1)      # keys past this are never visible
        n_full = tl.maximum(tl.minimum(k_len, t0 + shift + 1), 0)  # visible to every row
    else:
        n_end = k_len
        n_full = k_len
    n_full = (n_full // BLOCK_N) * BLOCK_N
    if WS:  # no early exit: a tile past the request's end runs no block
        n_end = tl.where(t0 < q_len, n_end, 0)
        n_full = tl.where(t0 < q_len, n_full, 0)

    if PIPE:
        # Rotated loop: S of the next block is issued before the softmax of this one.
        qk = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if n_end > 0:
            qk = tl.dot(q, _load_k(k_desc, k_base, stride_kt, 0, k_len, offs_d, BLOCK_N,
                                   USE_TMA, False))
        for start_n in range(0, n_full, BLOCK_N):
            qk_next = tl.dot(q, _load_k(k_desc, k_base, stride_kt, start_n + BLOCK_N, k_len,
                                        offs_d, BLOCK_N, USE_TMA, False))
            v = _load_v(v_desc, v_base, stride_vt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        False)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, qk, v, start_n, k_len, tok, shift,
                                            qk_scale, BLOCK_N, False, CAUSAL, LAZY, LAZY_TH)
            qk = qk_next
        for start_n in range(n_full, n_end, BLOCK_N):
            qk_next = tl.dot(q, _load_k(k_desc, k_base, stride_kt, start_n + BLOCK_N, k_len,
                                        offs_d, BLOCK_N, USE_TMA, False))
            v = _load_v(v_desc, v_base, stride_vt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        False)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, qk, v, start_n, k_len, tok, shift,
                                            qk_scale, BLOCK_N, True, CAUSAL, LAZY, LAZY_TH)
            qk = qk_next
    else:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):  # no mask needed
            k = _load_k(k_desc, k_base, stride_kt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        False)
            qk = tl.dot(q, k)
            v = _load_v(v_desc, v_base, stride_vt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        False)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, qk, v, start_n, k_len, tok, shift,
                                            qk_scale, BLOCK_N, False, CAUSAL, LAZY, LAZY_TH)
        for start_n in tl.range(n_full, n_end, BLOCK_N, warp_specialize=WS):  # band, tail
            k = _load_k(k_desc, k_base, stride_kt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        True)
            qk = tl.dot(q, k)
            v = _load_v(v_desc, v_base, stride_vt, start_n, k_len, offs_d, BLOCK_N, USE_TMA,
                        True)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, qk, v, start_n, k_len, tok, shift,
                                            qk_scale, BLOCK_N, True, CAUSAL, LAZY, LAZY_TH)

    # l = 0 exactly iff no key was visible; a NaN score (NaN in q or a visible key) makes l NaN
    # whether or not the max kept it, and NaN != 0, so the row is written (as NaN), not skipped.
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o_blk = acc / l_safe[:, None]
    lse_blk = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    l_ptrs = LSE + (q_start + tok) * stride_lt + head * stride_lh
    if ACCUMULATE:
        # Merge into the running state; rows that saw nothing here keep it untouched.
        lse_prev = tl.load(l_ptrs, mask=row_ok & seen, other=float("-inf"))
        o_prev = tl.load(o_ptrs, mask=(row_ok & seen)[:, None], other=0.0)
        m = tl.maximum(lse_prev, lse_blk)
        m_s = tl.where(m == float("-inf"), 0.0, m)
        w_prev = tl.exp(lse_prev - m_s)
        w_blk = tl.exp(lse_blk - m_s)
        tot = w_prev + w_blk
        tot_s = tl.where(tot != 0.0, tot, 1.0)  # NaN (a NaN state) passes and stays NaN
        lse_new = tl.where(tot != 0.0, m_s + tl.log(tot_s), float("-inf"))
        o_new = (tl.where(w_prev[:, None] > 0.0, o_prev * (w_prev / tot_s)[:, None], 0.0)
                 + o_blk * (w_blk / tot_s)[:, None])
        tl.store(o_ptrs, o_new, mask=(row_ok & seen)[:, None])
        tl.store(l_ptrs, lse_new, mask=row_ok & seen)
    else:
        tl.store(o_ptrs, o_blk, mask=row_ok[:, None])
        tl.store(l_ptrs, lse_blk, mask=row_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per variant on CUDA, D >= 128 (the sweep decides).
DEFAULT_CONFIGS = {
    "fold": (128, 64, 8, 3),
    "tma": (128, 64, 8, 3),
    "tma_pipe": (128, 64, 8, 2),
    "tma_lazy": (128, 64, 8, 3),
    "tma_ws": (64, 64, 4, 2),  # 3 warpgroups after the pass (1 producer, 2 consumers)
}


# The GPU sweep's grid (bench/sweep_ring_step.py): every entry compiles for sm_90a with Triton 3.6
# within 227 KB of shared memory (bench/diag_compile_sm90.py).
SWEEP_CONFIGS = {
    "fold": [(128, 64, 8, 3), (128, 128, 8, 2)],
    "tma": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3)],
    "tma_pipe": [(128, 64, 8, 2), (128, 64, 8, 3)],
    "tma_lazy": [(128, 64, 8, 3), (128, 128, 8, 2)],
    "tma_ws": [(64, 64, 4, 2), (64, 32, 4, 3)],
}


class _ScratchAllocator:
    """Global scratch for device-side TMA descriptors (128 bytes per descriptor per program),
    cached per device and grown on demand. Kernels on one stream run in order, so reuse is safe
    as long as the launches share a stream (the ring's steps do)."""

    def __init__(self):
        self.bufs = {}

    def __call__(self, size: int, alignment: int, stream):
        dev = torch.cuda.current_device()
        buf = self.bufs.get((dev, stream))
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, 1 << 20), dtype=torch.int8, device=f"cuda:{dev}")
            self.bufs[(dev, stream)] = buf
        return buf


_ALLOCATOR = _ScratchAllocator()


def _ensure_allocator():
    """Install our scratch allocator unless the application set one."""
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_ALLOCATOR)


def tma_ok(*ts) -> bool:
    """TMA needs 16-byte aligned bases and row strides and a unit last stride."""
    for t in ts:
        e = t.element_size()
        if (t.data_ptr() % 16 or t.stride(2) != 1 or (t.stride(0) * e) % 16
                or (t.stride(1) * e) % 16 or t.shape[2] * e < 16):
            return False
    return True


def ring_step_triton_v2(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
                        accumulate, softmax_scale, variant="tma", config=None):
    """ring_step_triton's contract with a kernel variant (VARIANTS) and an optional
    (BLOCK_M, BLOCK_N, num_warps, num_stages) config."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if D & (D - 1) or D < 16:
        raise ValueError(f"the Triton ring step needs a power-of-two head dim >= 16, got {D}")
    if q.device.type != "cuda":
        cfg = (16, 16, 4, 1)  # interpreter: small tiles keep CPU tests quick
    elif config is not None:
        cfg = tuple(config)
    else:
        cfg = DEFAULT_CONFIGS[variant]
        if D <= 64:
            cfg = (cfg[0], cfg[1], 4, cfg[3])
    block_m, block_n, num_warps, num_stages = cfg
    flags = dict(VARIANTS[variant])
    if flags["USE_TMA"] and not tma_ok(k, v):
        flags.update(USE_TMA=False, PIPE=False, WS=False)
    if flags["WS"] and (group & (group - 1) or not tma_ok(q)):
        flags.update(WS=False)  # Q by TMA needs whole head groups (GROUP == GROUP_PAD)
    if not softmax_scale > 0:
        raise ValueError(f"the Triton step variants need softmax_scale > 0, got {softmax_scale}")
    group_pad = 1 << (group - 1).bit_length()
    block_m = max(block_m, group_pad)
    tok_m = block_m // group_pad
    B = cu_q.shape[0] - 1
    n_tiles = max(1, math.ceil(max_q_len / tok_m))
    if Tq == 0 or B == 0:
        return
    if flags["USE_TMA"] and q.device.type == "cuda":
        _ensure_allocator()
    grid = (n_tiles, B, Hkv)
    _ring_step_kernel_v2[grid](
        q, k, v, o_state, lse_state, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o_state.stride(0), o_state.stride(1), lse_state.stride(0), lse_state.stride(1),
        softmax_scale * _LOG2E, int(mask_shift), n_tiles,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D,
        CAUSAL=bool(causal), ACCUMULATE=bool(accumulate), LAZY_TH=_LAZY_THRESHOLD, **flags,
        num_warps=num_warps, num_stages=num_stages)
