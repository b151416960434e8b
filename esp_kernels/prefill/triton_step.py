"""Triton ring step: the contract of esp_kernels/prefill/step.py (its module docstring), on any
GPU Triton supports; the Gluon kernel (gluon_step.py) hands it the calls it cannot take.

Partial causal attention of this rank's query stripes against one KV block, merged into the
running fp32 state (o normalized, lse natural log) in the epilogue. Rows of a tile are
(token, query head) pairs of one KV head's group, so the G query heads that share a KV head are
served by one load of each K/V tile (GQA packing). Keys left of the tile's first visible diagonal
run without a mask; only the diagonal band is masked; keys right of it are never loaded.

On the CPU this runs under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported);
there `tl.dot` on bfloat16 is wrong (docs/DESIGN.md §8), so CPU tests use float16/float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, k_len,
                  tok, shift, offs_d, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < k_len
    k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_ok[None, :],
                other=0.0)
    s = tl.dot(q, k) * qk_scale  # log2 domain
    if MASKED:  # diagonal band (causal) or ragged tail (keys past k_len)
        visible = kv_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= tok[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None],
                other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def request_bounds(CU_Q, CU_K, b):
    """Start and length of request b in q and in k/v."""
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    return q_start, q_len, k_start, tl.load(CU_K + b + 1) - k_start


@triton.jit
def kv_range(t0, TOK_M: tl.constexpr, q_len, k_len, shift, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr):
    """Keys of a tile of tokens t0 .. t0+TOK_M: (n_full, n_end). Keys below n_full (a multiple of
    BLOCK_N) are visible to every row, keys from n_end on to none; between lies the diagonal
    band and the ragged tail, which need the mask."""
    if CAUSAL:
        last_tok = tl.minimum(t0 + TOK_M, q_len) - 1
        n_end = tl.minimum(k_len, last_tok + shift + 1)      # keys past this are never visible
        n_full = tl.maximum(tl.minimum(k_len, t0 + shift + 1), 0)  # visible to every row
    else:
        n_end = k_len
        n_full = k_len
    return (n_full // BLOCK_N) * BLOCK_N, n_end


@triton.jit
def finish_block(acc, m_log2, l):
    """The block's state from its running sums: (seen, o, lse in natural log). l = 0 exactly iff
    no key was visible; a NaN score (NaN in q or a visible key) makes l NaN whether or not the
    max kept it, and NaN != 0, so such a row counts as seen (and is written as NaN)."""
    seen = l != 0.0
    l_safe = tl.where(seen, l, 1.0)
    lse = tl.where(seen, (m_log2 + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    # One reciprocal per row, not a division per element (sm_90a Gluon step: 136 -> 12 MUFU
    # divisions): merged steps 0.8-5.7% faster (H100: 8-block tiles 297 / 286 -> 280 / 280 us,
    # the 8k diagonal 907 / 908 -> 899 / 901), written ones 0.6-1.2% slower; the rounding moves
    # by about an ulp.
    return seen, acc * (1.0 / l_safe)[:, None], lse


@triton.jit
def merge_state(o_prev, lse_prev, o_blk, lse_blk):
    """Exact merge of the running state with a block's: (o, lse)."""
    m = tl.maximum(lse_prev, lse_blk)
    m_s = tl.where(m == float("-inf"), 0.0, m)
    w_prev = tl.exp(lse_prev - m_s)
    w_blk = tl.exp(lse_blk - m_s)
    tot = w_prev + w_blk
    tot_s = tl.where(tot != 0.0, tot, 1.0)  # NaN (a NaN state) passes and stays NaN
    lse_new = tl.where(tot != 0.0, m_s + tl.log(tot_s), float("-inf"))
    o_new = (tl.where(w_prev[:, None] > 0.0, o_prev * (w_prev / tot_s)[:, None], 0.0)
             + o_blk * (w_blk / tot_s)[:, None])
    return o_new, lse_new


@triton.jit
def _ring_step_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh, stride_lt, stride_lh,
                      qk_scale, shift, n_tiles,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr):
    TOK_M: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = n_tiles - 1 - tl.program_id(0)  # heavy (late, long causal rows) tiles first
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start, q_len, k_start, k_len = request_bounds(CU_Q, CU_K, b)
    t0 = tile * TOK_M
    if t0 >= q_len:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP_PAD
    head = hk * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)  # padded head slots of odd groups idle
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    n_full, n_end = kv_range(t0, TOK_M, q_len, k_len, shift, BLOCK_N, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):  # no mask needed
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                      start_n, k_len, tok, shift, offs_d, qk_scale,
                                      BLOCK_N, False, CAUSAL)
    for start_n in range(n_full, n_end, BLOCK_N):  # diagonal band and ragged tail
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                      start_n, k_len, tok, shift, offs_d, qk_scale,
                                      BLOCK_N, True, CAUSAL)

    seen, o_blk, lse_blk = finish_block(acc, m_i, l_i)  # m_i is in log2 units here
    o_ptrs = O + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    l_ptrs = LSE + (q_start + tok) * stride_lt + head * stride_lh
    if ACCUMULATE:
        # Merge into the running state; rows that saw nothing here keep it untouched.
        lse_prev = tl.load(l_ptrs, mask=row_ok & seen, other=float("-inf"))
        o_prev = tl.load(o_ptrs, mask=(row_ok & seen)[:, None], other=0.0)
        o_new, lse_new = merge_state(o_prev, lse_prev, o_blk, lse_blk)
        tl.store(o_ptrs, o_new, mask=(row_ok & seen)[:, None])
        tl.store(l_ptrs, lse_new, mask=row_ok & seen)
    else:
        tl.store(o_ptrs, o_blk, mask=row_ok[:, None])
        tl.store(l_ptrs, lse_blk, mask=row_ok)


def _config(head_dim: int, group: int, device: torch.device) -> dict:
    """Tile shape per head dim. Rows of a tile are (token, head-in-group) pairs."""
    if device.type != "cuda":
        # The interpreter runs numpy per program: small tiles keep CPU tests quick.
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def ring_step_triton(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
                     accumulate, softmax_scale, config=None):
    """Launch the Triton ring step (arguments as step.run_step's, positional, torch tensors).

    `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tuned tile shape; the
    benchmark bench/bench_triton_configs.py sweeps it."""
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if D & (D - 1) or D < 16:
        raise ValueError(f"the Triton ring step needs a power-of-two head dim >= 16, got {D}")
    cfg = _config(D, group, q.device)
    if config is not None:
        cfg = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), config))
    # Rows per token padded to a power of two (tl.arange needs one); e.g. G=3 uses 4 slots.
    group_pad = 1 << (group - 1).bit_length()
    block_m = max(cfg["BLOCK_M"], group_pad)
    tok_m = block_m // group_pad
    B = cu_q.shape[0] - 1
    n_tiles = max(1, math.ceil(max_q_len / tok_m))
    if Tq == 0 or B == 0:
        return
    grid = (n_tiles, B, Hkv)
    _ring_step_kernel[grid](
        q, k, v, o_state, lse_state, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o_state.stride(0), o_state.stride(1), lse_state.stride(0), lse_state.stride(1),
        softmax_scale * _LOG2E, int(mask_shift), n_tiles,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=D, CAUSAL=bool(causal),
        ACCUMULATE=bool(accumulate), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
