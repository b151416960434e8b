"""The anchor of the ring benchmark: a ring-flash-attention-style striped ring built from torch
ops, on the same Group and the same messages as ours, differing only in the compute:

- each step calls the SDPA flash kernel that returns its LSE (aten._scaled_dot_product_flash_
  attention), with the shifted triangle done as ring-flash-attention does it (for a block from
  a later rank: queries from local index 1 against keys up to n-1, plain causal);
- the running state is merged in fp32 with torch element-wise ops (sigmoid / logsigmoid form).

One request of length divisible by P; K/V are expanded to the query heads inside each step (the
aten flash op has no GQA argument; the expansion costs ~2% of a step at these sizes).
"""

import torch
import torch.nn.functional as F


def _flash(q, k, v, scale):
    # q [n, H, D] -> [1, H, n, D]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        0.0, True, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)  # [n, H, D], [n, H]


def rfa_style_prefill(q, k, v, ring, softmax_scale=None):
    P, me = ring.size, ring.rank
    n, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = softmax_scale or D ** -0.5
    cur = torch.stack([k, v]).contiguous()
    nxt = torch.empty_like(cur)
    out = torch.zeros(n, Hq, D, device=q.device, dtype=torch.float32)
    lse = torch.full((n, Hq), float("-inf"), device=q.device, dtype=torch.float32)
    for s in range(P):
        src = (me - s) % P
        work = None
        if s < P - 1:
            work = ring.exchange(sends=[(cur, (me + 1) % P)], recvs=[(nxt, (me - 1) % P)])
        kb = cur[0].repeat_interleave(G, dim=1)
        vb = cur[1].repeat_interleave(G, dim=1)
        rows = slice(0, n) if src <= me else slice(1, n)
        keys = slice(0, n) if src <= me else slice(0, n - 1)
        bo, bl = _flash(q[rows], kb[keys], vb[keys], scale)
        o_r, l_r = out[rows], lse[rows]
        if s == 0:
            o_r.copy_(bo)
            l_r.copy_(bl)
        else:
            bl = bl.float()
            o_r.sub_(torch.sigmoid(bl - l_r)[..., None] * (o_r - bo.float()))
            l_r.sub_(F.logsigmoid(l_r - bl))
        if work is not None:
            work.wait()
            cur, nxt = nxt, cur
    return out.to(q.dtype), lse
