"""Proactive scale-down: which decode instance keeps which tokens, written during the ring.

Every KV block passes every rank of the prefill ring, so each decode instance (a member of the
ring) writes the passing tokens the plan assigns to it into its own paged cache while the step
kernel computes on them: no transfer after prefill, no extra communication.

Instances are identified by world rank (their rank in the world Group that ESP groups are cut
from), so a plan stays valid whatever order the prefill ring uses.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import torch

from .cache import PagedKVCache
from .copy import copy_rows


class RetentionPlan:
    """For each request of a prefill batch: global token positions kept by each instance.

    `assignment[b]` maps instance (world rank) -> positions (any order). Validation: every token
    of every request is kept exactly once; with `free_pages` given, no instance needs more pages
    than it has (pages are per request: n tokens take ceil(n / page_size) pages).
    """

    def __init__(self, seqlens: Sequence[int], assignment: Sequence[Mapping[int, Sequence[int]]],
                 request_ids: Sequence[Hashable] | None = None,
                 free_pages: Mapping[int, int] | None = None, page_size: int | None = None):
        self.seqlens = [int(L) for L in seqlens]
        if len(assignment) != len(self.seqlens):
            raise ValueError(f"assignment has {len(assignment)} entries for "
                             f"{len(self.seqlens)} requests")
        self.request_ids = list(request_ids) if request_ids is not None else list(
            range(len(self.seqlens)))
        if len(self.request_ids) != len(self.seqlens):
            raise ValueError("request_ids must have one id per request")
        if len(set(self.request_ids)) != len(self.request_ids):
            raise ValueError("request_ids must be distinct")
        self._pos: list[dict[int, torch.Tensor]] = []
        for b, amap in enumerate(assignment):
            self._pos.append({int(i): torch.as_tensor(list(p) if not isinstance(p, torch.Tensor)
                                                      else p, dtype=torch.int64).sort().values
                              for i, p in amap.items()})
        self._prepared: dict = {}
        self.validate(free_pages, page_size)

    # ---- policies --------------------------------------------------------------------------
    @classmethod
    def fill_first(cls, seqlens, free_pages: Mapping[int, int], page_size: int,
                   request_ids=None) -> "RetentionPlan":
        """LoongServe's policy: fill instances in the given order, one before the next; each
        request's tokens go in position order, so it spans as few instances as possible."""
        left = {int(i): int(f) for i, f in free_pages.items()}
        order = list(left)
        assignment = []
        for b, L in enumerate(seqlens):
            amap, start = {}, 0
            for inst in order:
                if start >= L:
                    break
                take = min(L - start, left[inst] * page_size)
                if take <= 0:
                    continue
                amap[inst] = range(start, start + take)
                left[inst] -= math.ceil(take / page_size)
                start += take
            if start < L:
                raise ValueError(
                    f"fill_first: request {b} ({L} tokens) does not fit: {L - start} tokens "
                    f"left over after every instance is full (free pages {dict(free_pages)})")
            assignment.append(amap)
        return cls(seqlens, assignment, request_ids, free_pages, page_size)

    @classmethod
    def balanced(cls, seqlens, free_pages: Mapping[int, int], page_size: int,
                 request_ids=None) -> "RetentionPlan":
        """Spread every request over the instances in proportion to their free pages (one
        contiguous range each), so memory fills evenly; decode then merges more shards."""
        left = {int(i): int(f) for i, f in free_pages.items()}
        assignment = []
        for b, L in enumerate(seqlens):
            insts = [i for i in left if left[i] > 0]
            cap = sum(left[i] for i in insts)
            if cap * page_size < L:
                raise ValueError(f"balanced: request {b} ({L} tokens) does not fit in "
                                 f"{cap} free pages of {page_size} tokens")
            shares = [L * left[i] // cap for i in insts]
            for k in range(L - sum(shares)):      # largest capacities take the remainder
                shares[sorted(range(len(insts)), key=lambda j: -left[insts[j]])[k % len(insts)]] += 1
            # Page rounding can push an instance over: move the excess to one with room.
            for j, inst in enumerate(insts):
                while math.ceil(shares[j] / page_size) > left[inst]:
                    excess = shares[j] - left[inst] * page_size
                    room = [x for x in range(len(insts)) if x != j and
                            left[insts[x]] * page_size - shares[x] > 0]
                    if not room:
                        raise ValueError(f"balanced: request {b} does not fit after page "
                                         "rounding")
                    x = room[0]
                    moved = min(excess, left[insts[x]] * page_size - shares[x])
                    shares[j] -= moved
                    shares[x] += moved
            amap, start = {}, 0
            for inst, n in zip(insts, shares):
                if n:
                    amap[inst] = range(start, start + n)
                    left[inst] -= math.ceil(n / page_size)
                    start += n
            assignment.append(amap)
        return cls(seqlens, assignment, request_ids, free_pages, page_size)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def instances(self) -> list[int]:
        return sorted({i for amap in self._pos for i in amap})

    def positions(self, request_index: int, instance: int) -> torch.Tensor:
        """Sorted global positions of request `request_index` kept by `instance`."""
        return self._pos[request_index].get(int(instance), torch.empty(0, dtype=torch.int64))

    def tokens_on(self, instance: int) -> int:
        return sum(int(p.numel()) for amap in self._pos for i, p in amap.items() if i == instance)

    def validate(self, free_pages: Mapping[int, int] | None = None,
                 page_size: int | None = None) -> None:
        for b, (L, amap) in enumerate(zip(self.seqlens, self._pos)):
            allp = torch.cat(list(amap.values())) if amap else torch.empty(0, dtype=torch.int64)
            if allp.numel() and (int(allp.min()) < 0 or int(allp.max()) >= L):
                raise ValueError(f"request {b}: positions outside [0, {L})")
            counts = torch.bincount(allp, minlength=L) if allp.numel() else torch.zeros(
                L, dtype=torch.int64)
            if bool((counts > 1).any()):
                dup = torch.nonzero(counts > 1).flatten()[:8].tolist()
                raise ValueError(f"request {b}: positions {dup} are kept by more than one "
                                 "instance")
            if bool((counts == 0).any()):
                miss = torch.nonzero(counts == 0).flatten()[:8].tolist()
                raise ValueError(f"request {b}: positions {miss} are kept by no instance")
        if free_pages is not None:
            if page_size is None:
                raise ValueError("validate: page_size is needed with free_pages")
            for inst in self.instances:
                need = sum(math.ceil(amap[inst].numel() / page_size)
                           for amap in self._pos if inst in amap)
                have = int(free_pages.get(inst, 0))
                if need > have:
                    raise ValueError(f"instance {inst} would keep tokens needing {need} pages "
                                     f"but has {have} free")

    def reserve(self, cache: PagedKVCache, instance: int) -> dict:
        """Allocate this instance's tokens in `cache` (all-or-nothing) and return their slots
        by request id. Done once per plan and cache; ring_prefill calls it if the engine did
        not (call it before prefill to fail early and on one rank only)."""
        key = (id(cache), int(instance))
        if key not in self._prepared:
            wanted = {rid: self.positions(b, instance) for b, rid in enumerate(self.request_ids)
                      if self.positions(b, instance).numel()}
            self._prepared[key] = {"slots": cache.allocate_many(wanted), "maps": {}}
        return self._prepared[key]["slots"]

    def __repr__(self):
        return (f"RetentionPlan({len(self.seqlens)} requests, instances "
                f"{ {i: self.tokens_on(i) for i in self.instances} } tokens)")


class RetentionWriter:
    """Writes the passing KV blocks' retained tokens into this instance's cache (one layer)."""

    def __init__(self, cache: PagedKVCache, layer: int, maps):
        self.cache, self.layer, self.maps = cache, layer, maps

    @classmethod
    def prepare(cls, retain, seqlens: Sequence[int], ring, k: torch.Tensor) -> "RetentionWriter":
        try:
            plan, cache, layer = retain
        except (TypeError, ValueError):
            raise TypeError("retain must be a (RetentionPlan, PagedKVCache, layer) tuple") from None
        if not isinstance(plan, RetentionPlan):
            raise TypeError(f"retain[0] must be a RetentionPlan, got {type(plan).__name__}")
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"retain[1] must be a PagedKVCache, got {type(cache).__name__}")
        cache._check_layer(layer)
        if list(seqlens) != plan.seqlens:
            raise ValueError(f"retention plan covers seqlens {plan.seqlens[:8]}... but the "
                             f"prefill batch has {list(seqlens)[:8]}...")
        if cache.dtype != k.dtype or cache.num_kv_heads != k.shape[1] or \
                cache.head_dim != k.shape[2] or cache.device != k.device:
            raise ValueError(f"retain cache ({cache.dtype}, {cache.num_kv_heads} kv heads, "
                             f"head dim {cache.head_dim}, {cache.device}) does not match k "
                             f"({k.dtype}, {k.shape[1]}, {k.shape[2]}, {k.device})")
        members = set(ring.world_ranks)
        strangers = [i for i in plan.instances if i not in members]
        if strangers:
            raise ValueError(f"retention plan keeps tokens on instances {strangers} that are not "
                             f"in the prefill ring {list(ring.world_ranks)}: the KV never "
                             "passes them")
        instance = ring.world_ranks[ring.rank]
        slots = plan.reserve(cache, instance)
        key = (id(cache), instance)
        per_order = plan._prepared[key]["maps"]
        order = tuple(ring.world_ranks)
        if order not in per_order:
            per_order[order] = cls._build_maps(plan, slots, ring.size, instance, cache.device)
        return cls(cache, layer, per_order[order])

    @staticmethod
    def _build_maps(plan: RetentionPlan, slots: dict, P: int, instance: int, device):
        """Per source rank j: (rows of j's block, destination slots) of the tokens kept here.

        Position g of a request comes from ring rank g mod P, at row (offset of the request in
        that rank's block) + g div P.
        """
        src_rows = [[] for _ in range(P)]
        dst_slots = [[] for _ in range(P)]
        offsets = torch.zeros(P, dtype=torch.int64)
        ranks = torch.arange(P)
        for b, (L, rid) in enumerate(zip(plan.seqlens, plan.request_ids)):
            if rid in slots:
                pos, sl = plan.positions(b, instance), slots[rid]
                src = pos % P
                for j in range(P):
                    sel = src == j
                    src_rows[j].append(offsets[j] + pos[sel] // P)
                    dst_slots[j].append(sl[sel])
            offsets += torch.clamp((L - ranks + P - 1) // P, min=0)

        def cat(parts):
            t = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
            return t.to(torch.int32).to(device)
        return [(cat(src_rows[j]), cat(dst_slots[j])) for j in range(P)]

    def write(self, source: int, block: torch.Tensor) -> None:
        """block: [2, tokens, Hkv * D] (K then V) of the KV block that came from ring rank
        `source`; its tokens kept here go to their slots on the current stream."""
        src_idx, dst_idx = self.maps[source]
        if src_idx.numel():
            copy_rows(block, src_idx, self.cache.slot_rows(self.layer), dst_idx)
