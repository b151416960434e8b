"""The anchor of the ring benchmark: a ring-flash-attention-style striped ring built from torch
ops, on the same Group and the same messages as ours, differing only in the compute:

- each step calls a causal attention kernel that returns its LSE (`attend`: FA3 from the
  carried anchors, cuDNN, or by default the SDPA flash kernel), with the shifted triangle done as
  ring-flash-attention does it (for a block from a later rank: queries from local index 1
  against keys up to n-1, plain causal);
- the running state is merged in fp32 with torch element-wise ops (sigmoid / logsigmoid form).

One request of length divisible by P. The SDPA flash op has no GQA argument: `sdpa_flash_attend`
expands K/V to the query heads inside each step (~2% of a step at these sizes). As a step
generator (`rfa_style_steps`), it is driven the way ours is (`run_steps` on virtual ranks, one
thread): on fresh `run_local` threads the cuDNN loop took 280 ms at P=4 where the FA3 loop took
66 (H100, 6868ba9); timed alone on 2026-12-06, 71 and 69 ms.
"""

import torch
import torch.nn.functional as F


def sdpa_flash_attend(q, k, v, scale):
    """Causal attention with its LSE from the SDPA flash kernel: q [n, Hq, D], k/v [n, Hkv, D]
    -> o [n, Hq, D], lse [n, Hq] (natural log)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        0.0, True, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def step_slices(src, me, n):
    """The rows and keys of one striped step as a plain causal call: a block from an earlier
    rank (or this one) is causal with the diagonal; one from a later rank excludes it."""
    if src <= me:
        return slice(0, n), slice(0, n)
    return slice(1, n), slice(0, n - 1)


def rfa_style_steps(q, k, v, ring, softmax_scale=None, attend=sdpa_flash_attend):
    """This rank's (out, lse) as a step generator: yields each exchange's Work where a blocking
    loop would wait on it (`esp.comm.drive` runs it as that loop; `run_steps` runs every virtual
    rank's from one thread, as ours)."""
    P, me = ring.size, ring.rank
    n, Hq, D = q.shape
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
        rows, keys = step_slices(src, me, n)
        bo, bl = attend(q[rows], cur[0][keys], cur[1][keys], scale)
        o_r, l_r = out[rows], lse[rows]
        if s == 0:
            o_r.copy_(bo)
            l_r.copy_(bl)
        else:
            bl = bl.float()
            o_r.sub_(torch.sigmoid(bl - l_r)[..., None] * (o_r - bo.float()))
            l_r.sub_(F.logsigmoid(l_r - bl))
        if work is not None:
            yield work
            cur, nxt = nxt, cur
    return out.to(q.dtype), lse
