"""The group-size / batching DP: which queued requests to prefill now, in which batches, on how
many instances each.

Search space (the DP is exact over it):
- candidate requests sorted by prefill length (ascending; ties keep their input order);
- each request is either deferred (left queued; cost `defer_cost[i]`, +inf forbids it) or in a
  batch; a batch is a run of consecutive sorted requests with no deferred request inside;
- the pool's instances sorted by free pages (ascending; ties by the given order); batches, in
  length order, take disjoint runs of consecutive instances in that order (the longest requests
  get the roomiest instances); instances may be left unused (they stay free for decode);
- a batch's group size is one of `group_sizes` (default_group_sizes: every size up to 16, then
  multiples of 4 up to 32, of 8 up to 64, of 16 beyond, and the whole pool: with 64 instances
  the DP does 24 sizes instead of 64, 2.7x less work, and a 37-instance group is no better
  than 40 in any way the scheduler can use);
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

import bisect
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
    T = cost_model.prefill_time_array(P, safe_cnt[None], safe_S1[None],
                                      np.where(valid, S2, 1.0)[None])
    ok = np.broadcast_to(valid, T.shape)
    if max_prefill_time is not None:
        ok = ok & ((T <= max_prefill_time) | (cnt == 1)[None])
    return np.where(ok, T * inv[None], INF), T


def default_group_sizes(max_instances: int) -> list:
    sizes = set(range(1, min(max_instances, 16) + 1)) | {max_instances}
    for lo, hi, step in ((16, 32, 4), (32, 64, 8), (64, 1 << 30, 16)):
        sizes |= set(range(lo + step, min(hi, max_instances) + 1, step))
    return sorted(sizes)


class BatchTable:
    """What the DP needs of a candidate set, independent of the pool: the length order, the
    batch cost table for group sizes up to max_instances, and page prefix sums. Built once per
    schedule() and shared by the DPs over different pools (decode-preemption trials)."""

    def __init__(self, cost_model, lengths: Sequence[int], page_size: int, max_instances: int,
                 group_sizes: Sequence[int] | None = None, max_prefill_time: float | None = None):
        self.n = n = len(lengths)
        self.order = sorted(range(n), key=lambda i: (lengths[i], i))
        L = np.array([lengths[i] for i in self.order], dtype=np.int64)
        self.G = sorted({int(g) for g in (group_sizes or default_group_sizes(max_instances))
                         if 1 <= g <= max_instances})
        self.max_instances = max_instances
        pg = np.concatenate([[0], np.cumsum(-(-L // page_size))])
        self.pages = pg[None, :] - pg[:, None]                               # [j, i]
        if n and self.G:
            self.C, self.T = batch_cost_table(cost_model, L, np.array(self.G), max_prefill_time)


def solve(cost_model, lengths: Sequence[int], free_pages: Sequence[int], page_size: int,
          defer_cost: Sequence[float], group_sizes: Sequence[int] | None = None,
          max_prefill_time: float | None = None) -> DPResult:
    """Exact DP over the search space of the module docstring.

    lengths[i]: prefill tokens of candidate i; free_pages[k]: free pages of pool instance k;
    defer_cost[i]: cost of leaving candidate i queued (inf: it must run now)."""
    table = BatchTable(cost_model, lengths, page_size, len(free_pages), group_sizes,
                       max_prefill_time)
    return solve_table(table, free_pages, defer_cost)


def solve_table(table: BatchTable, free_pages: Sequence[int],
                defer_cost: Sequence[float]) -> DPResult:
    """The DP for a prepared BatchTable on a pool of len(free_pages) <= max_instances."""
    n, m = table.n, len(free_pages)
    if m > table.max_instances:
        raise ValueError(f"pool of {m} instances exceeds the table's {table.max_instances}")
    order = table.order
    if n == 0:
        return DPResult(0.0, [], [])
    inst_order = sorted(range(m), key=lambda k: (free_pages[k], k))
    w = [float(defer_cost[i]) for i in order]
    G = [g for g in table.G if g <= m]
    caps = np.array([free_pages[k] for k in inst_order], dtype=np.int64)
    capsum = np.concatenate([[0], np.cumsum(caps)])
    pages = table.pages
    dp = np.full((n + 1, m + 1), INF)
    # choice: -1 skip instance, -2 defer, else g index * (n+1) + j (a batch j..i-1)
    choice = np.full((n + 1, m + 1), -3, dtype=np.int64)
    if G:
        Garr = np.array(G, dtype=np.int64)
        C, T = table.C, table.T
    cols = np.arange(n + 1)
    for k in range(m + 1):
        if k == 0:
            col = np.full(n + 1, INF)
            col[0] = 0.0
            ch = np.full(n + 1, -3, dtype=np.int64)
        else:
            col = dp[:, k - 1].copy()
            ch = np.full(n + 1, -1, dtype=np.int64)
            ng = bisect.bisect_right(G, k)
            if ng:
                gk = Garr[:ng]
                room = capsum[k] - capsum[k - gk]                            # [g]
                tot = dp[:, k - gk].T[:, :, None] + C[:ng]                   # [g, j, i]
                tot[pages[None] > room[:, None, None]] = INF
                flat = tot.reshape(-1, n + 1)
                best = flat.argmin(axis=0)
                bval = flat[best, cols]
                better = bval < col
                col[better] = bval[better]
                ch[better] = best[better]                                    # g index * (n+1) + j
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
