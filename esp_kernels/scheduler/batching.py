"""The group-size / batching DP: which queued requests to prefill now, in which batches, on how
many instances each.

Search space (the DP is exact over it):
- candidate requests sorted by prefill length (ascending; ties keep their input order);
- each request is either deferred (left queued; cost `defer_cost[i]`, +inf forbids it) or in a
  batch; a batch is a run of consecutive sorted requests with no deferred request inside;
- the pool's instances sorted by free pages (ascending; ties by the given order); batches, in
  length order, take disjoint runs of consecutive instances in that order (the longest requests
  get the roomiest instances); instances may be left unused (they stay free for decode);
- a batch's group size is one of `group_sizes`;
- feasibility: the batch's pages Σ ceil(l / page_size) fit in the free pages of its instances
  (fill-first retention needs exactly that many: only a request's last piece on an instance
  rounds up); its prefill time is <= max_prefill_time unless it is a single request.
Objective (LoongServe's input-token latency): Σ over batches T(g, batch) · Σ_{r in batch} 1/l_r
+ Σ over deferred requests defer_cost.

dp[i][k] = best cost with the first i sorted requests decided and the first k sorted instances
used or skipped: skip instance k; defer request i; or a batch of requests j..i-1 on instances
k-g..k-1. Vectorised over (g, j, i) per k with numpy: O(m · |G| · n²) work, m numpy rounds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

INF = math.inf


@dataclasses.dataclass
class DPResult:
    cost: float                      # objective; inf if infeasible
    batches: list                    # [(request indices (input order), instance indices, time)]
    deferred: list                   # request indices (input order) left queued


def batch_cost_table(cost_model, lengths_sorted: np.ndarray, group_sizes: np.ndarray,
                     max_prefill_time: float | None):
    """[|G|, n+1, n+1] cost of batch j..i-1 on g instances (inf where j >= i or too slow), and
    the matching prefill times."""
    n = len(lengths_sorted)
    L = lengths_sorted.astype(np.float64)
    c1 = np.concatenate([[0.0], np.cumsum(L)])
    c2 = np.concatenate([[0.0], np.cumsum(L * L)])
    cinv = np.concatenate([[0.0], np.cumsum(1.0 / L)])
    idx = np.arange(n + 1)
    cnt = (idx[None, :] - idx[:, None]).astype(np.float64)          # [j, i] = i - j
    valid = cnt > 0
    S1 = c1[None, :] - c1[:, None]
    S2 = c2[None, :] - c2[:, None]
    inv = cinv[None, :] - cinv[:, None]
    safe_cnt = np.where(valid, cnt, 1.0)
    safe_S1 = np.where(valid, S1, 1.0)
    P = group_sizes.astype(np.float64)[:, None, None]
    T = cost_model.prefill_time_array(P, safe_cnt[None], safe_S1[None], np.where(valid, S2, 1.0)[None])
    ok = np.broadcast_to(valid, T.shape)
    if max_prefill_time is not None:
        ok = ok & ((T <= max_prefill_time) | (cnt == 1)[None])
    return np.where(ok, T * inv[None], INF), T


def solve(cost_model, lengths: Sequence[int], free_pages: Sequence[int], page_size: int,
          defer_cost: Sequence[float], group_sizes: Sequence[int] | None = None,
          max_prefill_time: float | None = None) -> DPResult:
    """Exact DP over the search space of the module docstring.

    lengths[i]: prefill tokens of candidate i; free_pages[k]: free pages of pool instance k;
    defer_cost[i]: cost of leaving candidate i queued (inf: it must run now)."""
    n, m = len(lengths), len(free_pages)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    inst_order = sorted(range(m), key=lambda k: (free_pages[k], k))
    L = np.array([lengths[i] for i in order], dtype=np.int64)
    w = [float(defer_cost[i]) for i in order]
    if n == 0:
        return DPResult(0.0, [], [])
    G = sorted({int(g) for g in (group_sizes or range(1, m + 1)) if 1 <= g <= m})
    caps = np.array([free_pages[k] for k in inst_order], dtype=np.int64)
    capsum = np.concatenate([[0], np.cumsum(caps)])
    pg = np.concatenate([[0], np.cumsum(-(-L // page_size))])
    pages = pg[None, :] - pg[:, None]                                   # [j, i]
    dp = np.full((n + 1, m + 1), INF)
    # choice: -1 skip instance, -2 defer, else g index * (n+1) + j (a batch j..i-1)
    choice = np.full((n + 1, m + 1), -3, dtype=np.int64)
    if G:
        Garr = np.array(G, dtype=np.int64)
        C, T = batch_cost_table(cost_model, L, Garr, max_prefill_time)
    for k in range(m + 1):
        col = np.full(n + 1, INF)
        ch = np.full(n + 1, -3, dtype=np.int64)
        if k == 0:
            col[0] = 0.0
        else:
            col[:] = dp[:, k - 1]
            ch[:] = -1
            gk = Garr[Garr <= k] if G else np.array([], dtype=np.int64)
            if len(gk):
                prev = dp[:, k - gk].T                                       # [g, j]
                room = capsum[k] - capsum[k - gk]                            # [g]
                tot = prev[:, :, None] + C[: len(gk)]                        # [g, j, i]
                tot = np.where(pages[None] <= room[:, None, None], tot, INF)
                flat = tot.reshape(-1, n + 1)
                best = np.argmin(flat, axis=0)
                bval = flat[best, np.arange(n + 1)]
                better = bval < col
                col = np.where(better, bval, col)
                ch = np.where(better, best, ch)                              # g index * (n+1) + j
        for i in range(n):                                                   # defer request i
            v = col[i] + w[i]
            if v < col[i + 1]:
                col[i + 1] = v
                ch[i + 1] = -2
        dp[:, k] = col
        choice[:, k] = ch
    cost = float(dp[n, m])
    if cost == INF:
        return DPResult(INF, [], [order[i] for i in range(n)])
    batches, deferred = [], []
    i, k = n, m
    while i > 0 or k > 0:
        c = int(choice[i, k])
        if c == -1:
            k -= 1
        elif c == -2:
            i -= 1
            deferred.append(order[i])
        else:
            gi, j = divmod(c, n + 1)
            g = G[gi]
            batches.append(([order[x] for x in range(j, i)],
                            [inst_order[x] for x in range(k - g, k)], float(T[gi, j, i])))
            i, k = j, k - g
    batches.reverse()
    deferred.reverse()
    return DPResult(cost, batches, deferred)
