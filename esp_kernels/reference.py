"""Pure-PyTorch reference attention over packed variable-length sequences (any device).

This is the ground truth every kernel is tested against. It computes in float32 (float64 when
the inputs are float64), processes queries and keys in blocks with an exact online merge so that
long inputs never materialize a T x T matrix, and skips blocks that causality masks completely.
"""

from __future__ import annotations

import math

import torch

from ._checks import (FLOAT_DTYPES, as_cu_seqlens, as_int_tensor, check_cu_seqlens, check_gqa,
                      check_same_device, check_tensor)

# Scores held at once per block: q_block * k_block * Hq elements (fp32: 4 bytes each).
_BLOCK_ELEMS = 1 << 25


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None,
              q_positions=None, k_positions=None):
    """Attention of packed queries against packed keys/values, request by request.

    Args:
        q: [Tq, Hq, D] float tensor; k, v: [Tk, Hkv, D] with Hq % Hkv == 0 (GQA: query head h
            reads KV head h // (Hq // Hkv)).
        cu_seqlens_q, cu_seqlens_k: int32 [B+1] offsets of each request in q and in k/v (a list
            or numpy array of ints is converted).
        causal: a query at position p sees keys at positions <= p.
        softmax_scale: defaults to 1/sqrt(D).
        q_positions, k_positions: optional integer [Tq] / [Tk] global token positions (tensors or
            sequences of ints), used by the
            causal mask (this is how a stripe of queries meets a stripe of keys). Defaults: keys at
            0..Lk-1 and queries at the end, Lk-Lq..Lk-1 (bottom-right alignment; equal lengths
            give the usual mask).

    Returns:
        out [Tq, Hq, D] in q.dtype and lse [Tq, Hq] float32 (natural log; float64 for float64
        inputs, the precision it was computed in). A query row that sees no key gets out = 0 and
        lse = -inf (the empty state). NaN propagates: a NaN in a query row, or in a key row it
        sees, gives NaN out and lse; a NaN in a value row it sees gives NaN out (lse does not
        read v). As in FlashAttention, a NaN value row may also reach rows
        of the same key block whose mask hides it (p = 0 times NaN in the P V product).
    """
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(k, "k", ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(v, "v", ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    cu_seqlens_q = as_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    cu_seqlens_k = as_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if q_positions is not None and not isinstance(q_positions, torch.Tensor):
        q_positions = as_int_tensor(q_positions, "q_positions", device=q.device)
    if k_positions is not None and not isinstance(k_positions, torch.Tensor):
        k_positions = as_int_tensor(k_positions, "k_positions", device=q.device)
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      q_positions=q_positions, k_positions=k_positions)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    check_gqa(q.shape[1], k.shape[1])
    cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} requests but cu_seqlens_k has "
                         f"{len(ck) - 1}")
    for name, pos, total in (("q_positions", q_positions, q.shape[0]),
                             ("k_positions", k_positions, k.shape[0])):
        if pos is not None:
            check_tensor(pos, name, ndim=1)
            if pos.dtype.is_floating_point or pos.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {pos.dtype}")
            if pos.shape[0] != total:
                raise ValueError(f"{name} has {pos.shape[0]} entries, expected {total}")

    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(Tq, Hq, D, dtype=cdt, device=q.device)
    lse = torch.full((Tq, Hq), -math.inf, dtype=cdt, device=q.device)

    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        if q_positions is not None:
            qp = q_positions[q0:q1].to(torch.int64)
        else:
            qp = torch.arange(lk - lq, lk, device=q.device)
        kp = (k_positions[k0:k1].to(torch.int64) if k_positions is not None
              else torch.arange(lk, device=q.device))
        # [Hkv, G, L, D] so one matmul serves every query head of a KV head.
        qb = q[q0:q1].to(cdt).reshape(lq, Hkv, G, D).permute(1, 2, 0, 3)
        kb = k[k0:k1].to(cdt).permute(1, 0, 2)
        vb = v[k0:k1].to(cdt).permute(1, 0, 2)
        bq = max(1, min(lq, _BLOCK_ELEMS // max(1, min(lk, 4096) * Hq)))
        bk = max(1, min(lk, _BLOCK_ELEMS // (bq * Hq)))
        for i in range(0, lq, bq):
            qpi = qp[i:i + bq]
            m_run = torch.full((Hkv, G, qpi.shape[0]), -math.inf, dtype=cdt, device=q.device)
            l_run = torch.zeros_like(m_run)
            acc = torch.zeros(Hkv, G, qpi.shape[0], D, dtype=cdt, device=q.device)
            qmax = int(qpi.max()) if causal else None
            for j in range(0, lk, bk):
                kpj = kp[j:j + bk]
                if causal and int(kpj.min()) > qmax:
                    continue  # every key of this block is in the future of every query
                s = torch.einsum("hgqd,hkd->hgqk", qb[:, :, i:i + bq], kb[:, j:j + bk]) * scale
                if causal:
                    s = s.masked_fill(kpj[None, :] > qpi[:, None], -math.inf)
                m_blk = s.amax(dim=-1)
                m_new = torch.maximum(m_run, m_blk)
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None])
                alpha = torch.exp(m_run - m_safe)
                l_run = l_run * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + torch.einsum("hgqk,hkd->hgqd", p, vb[:, j:j + bk])
                m_run = m_new
            # Empty rows have l = 0 exactly. A NaN in the row's query or in a key/value it sees
            # makes l (or acc) NaN, and `l == 0` is False for NaN, so the row comes out NaN
            # instead of passing for empty (`l > 0` would have said empty).
            empty = l_run == 0
            l_safe = torch.where(empty, 1, l_run)
            o_blk = torch.where(empty[..., None], torch.zeros_like(acc), acc / l_safe[..., None])
            lse_blk = torch.where(empty, torch.full_like(m_run, -math.inf),
                                  m_run + torch.log(l_safe))
            rows = slice(q0 + i, q0 + i + qpi.shape[0])
            out[rows] = o_blk.permute(2, 0, 1, 3).reshape(-1, Hq, D)
            lse[rows] = lse_blk.permute(2, 0, 1).reshape(-1, Hq)
    return out.to(q.dtype), lse
