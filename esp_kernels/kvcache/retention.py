"""Proactive scale-down: which decode instance keeps which tokens, written during the ring.

Every KV block passes every rank of the prefill ring, so each decode instance (a member of the
ring) writes the passing tokens it must keep into its own paged cache while the step kernel
computes on them: no transfer after prefill, no extra communication.

Instances are identified by world rank (their rank in the world Group that ESP groups are cut
from), so a plan stays valid whatever order the prefill ring uses.

`RetentionPlan` is pure data (token ranges per request and instance, plain integers; compared by
value; `to_dict()` / `from_dict()`). The slots it reserves live in the cache (`reserve`), and the
row maps of a ring order live in a `RetentionWriter`, built once per (plan, cache, ring order).
"""

from __future__ import annotations

import math
import secrets
import weakref
from typing import Hashable, Mapping, Sequence

import torch

from .._checks import as_int, as_lengths
from .cache import PagedKVCache, plain_request_id, plan_request_id
from .copy import copy_rows_

Runs = tuple[tuple[int, int], ...]   # sorted disjoint [start, end) ranges of global positions


def _runs(positions, what: str) -> Runs:
    """Sorted [start, end) runs of a set of positions (range, sequence or integer tensor)."""
    if isinstance(positions, range):
        if positions.step == 1:
            return ((positions.start, positions.stop),) if len(positions) else ()
        t = torch.arange(positions.start, positions.stop, positions.step)
    elif isinstance(positions, torch.Tensor):
        t = positions
    else:
        values = list(positions)
        if not values:
            return ()
        t = torch.as_tensor(values)  # no dtype: floats must stay floats and be rejected
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{what} must be a 1-D sequence of integers, got {t.dtype} "
                        f"{tuple(t.shape)}")
    if not t.numel():
        return ()
    t = t.to("cpu", torch.int64).sort().values
    dup = t[1:] == t[:-1]
    if bool(dup.any()):
        raise ValueError(f"{what} lists positions {t[1:][dup][:8].tolist()} more than once")
    breaks = torch.nonzero(t[1:] != t[:-1] + 1).flatten()
    starts = torch.cat([t[:1], t[breaks + 1]]).tolist()
    ends = (torch.cat([t[breaks], t[-1:]]) + 1).tolist()
    return tuple(zip(starts, ends))


def _count(runs: Runs) -> int:
    return sum(e - s for s, e in runs)


def _unique_ids(n: int) -> tuple[str, ...]:
    """Ids no other plan has: a random batch tag (64 bits) and the request's index."""
    tag = secrets.token_hex(8)
    return tuple(f"batch-{tag}/{b}" for b in range(n))


def _policy_args(seqlens, free_pages, page_size):
    """A policy's (seqlens, {instance: free pages}, page_size) as checked ints."""
    left = {as_int(i, "free_pages instance"): as_int(f, f"free_pages[{i}]", minimum=0)
            for i, f in free_pages.items()}
    return tuple(as_lengths(seqlens)), left, as_int(page_size, "page_size", minimum=1)


class RetentionPlan:
    """For each request of a prefill batch: global token positions kept by each instance.

    `assignment[b]` maps instance (world rank) -> positions (a range, a sequence or an integer
    tensor, any order). Validation: every token of every request is kept exactly once; with
    `free_pages` given, no instance needs more pages than it has (pages are per request: n
    tokens take ceil(n / page_size) pages).

    request_ids: the ids the caches will store the requests under (ints or strings to travel
    in `to_dict`). Without them every plan gets fresh ids of its own (`plan.request_ids`,
    "batch-<random tag>/<index>"), so two batches can never collide in a cache: build such a
    plan once and send it (`to_dict`) to every instance, or pass the engine's ids.
    """

    __slots__ = ("seqlens", "request_ids", "_runs")

    def __init__(self, seqlens: Sequence[int], assignment: Sequence[Mapping[int, Sequence[int]]],
                 request_ids: Sequence[Hashable] | None = None,
                 free_pages: Mapping[int, int] | None = None, page_size: int | None = None):
        seqlens = tuple(as_lengths(seqlens))
        if len(assignment) != len(seqlens):
            raise ValueError(f"assignment has {len(assignment)} entries for {len(seqlens)} "
                             "requests")
        ids = (_unique_ids(len(seqlens)) if request_ids is None else
               tuple(plain_request_id(r) for r in request_ids))
        runs = tuple({as_int(i, "instance"): _runs(
                          p, f"positions of request {ids[b] if b < len(ids) else b!r} on "
                          f"instance {i}")
                      for i, p in sorted(amap.items())} for b, amap in enumerate(assignment))
        self._init(seqlens, ids, runs)
        self.validate(free_pages, page_size)

    def _init(self, seqlens, ids, runs):
        if len(ids) != len(seqlens):
            raise ValueError("request_ids must have one id per request")
        if len(set(ids)) != len(ids):
            raise ValueError("request_ids must be distinct")
        if any(L < 0 for L in seqlens):
            raise ValueError(f"seqlens must be non-negative, got {list(seqlens)[:8]}")
        object.__setattr__(self, "seqlens", seqlens)
        object.__setattr__(self, "request_ids", ids)
        # Per request: {instance: runs}, instances ascending, instances keeping nothing dropped.
        object.__setattr__(self, "_runs", tuple({i: r for i, r in amap.items() if r}
                                                for amap in runs))

    def __setattr__(self, name, value):
        raise AttributeError(f"RetentionPlan is immutable (cannot set {name!r})")

    # ---- policies --------------------------------------------------------------------------
    @classmethod
    def fill_first(cls, seqlens, free_pages: Mapping[int, int], page_size: int,
                   request_ids=None) -> "RetentionPlan":
        """LoongServe's policy: fill instances in the given order, one before the next; each
        request's tokens go in position order, so it spans as few instances as possible."""
        seqlens, left, page_size = _policy_args(seqlens, free_pages, page_size)
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
        seqlens, left, page_size = _policy_args(seqlens, free_pages, page_size)
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

    # ---- value semantics -------------------------------------------------------------------
    def _key(self):
        return (self.seqlens, self.request_ids, tuple(tuple(a.items()) for a in self._runs))

    def __eq__(self, other):
        if not isinstance(other, RetentionPlan):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def to_dict(self) -> dict:
        """Plain ints, strings and lists (JSON-ready): the positions as [start, end) ranges."""
        for rid in self.request_ids:
            plan_request_id(rid)
        return {"kind": "RetentionPlan", "seqlens": list(self.seqlens),
                "request_ids": list(self.request_ids),
                "assignment": [[[i, [list(r) for r in runs]] for i, runs in amap.items()]
                               for amap in self._runs]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RetentionPlan":
        if d.get("kind") != "RetentionPlan":
            raise ValueError(f"not a RetentionPlan dict (kind {d.get('kind')!r})")
        plan = object.__new__(cls)
        for key in ("seqlens", "request_ids", "assignment"):
            if key not in d:
                raise ValueError(f"RetentionPlan dict is missing key {key!r}")
        runs = tuple({as_int(i, "instance"): tuple((as_int(s, "range start"),
                                                    as_int(e, "range end")) for s, e in r)
                      for i, r in amap} for amap in d["assignment"])
        plan._init(tuple(as_lengths(d["seqlens"])), tuple(d["request_ids"]), runs)
        plan.validate()
        return plan

    def __reduce__(self):
        return (RetentionPlan.from_dict, (self.to_dict(),))

    # ---- queries ---------------------------------------------------------------------------
    @property
    def instances(self) -> list[int]:
        return sorted({i for amap in self._runs for i in amap})

    def ranges(self, request_index: int, instance: int) -> Runs:
        """Sorted [start, end) ranges of the positions of request `request_index` kept by
        `instance`."""
        return self._runs[request_index].get(int(instance), ())

    def positions(self, request_index: int, instance: int) -> torch.Tensor:
        """Sorted global positions of request `request_index` kept by `instance` (int64, CPU)."""
        runs = self.ranges(request_index, instance)
        if not runs:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in runs])

    def tokens_on(self, instance: int) -> int:
        return sum(_count(amap.get(instance, ())) for amap in self._runs)

    def validate(self, free_pages: Mapping[int, int] | None = None,
                 page_size: int | None = None) -> None:
        for b, (L, amap, rid) in enumerate(zip(self.seqlens, self._runs, self.request_ids)):
            runs = sorted((s, e) for r in amap.values() for s, e in r)
            name = f"request {b} ({rid!r})"
            if runs and (runs[0][0] < 0 or runs[-1][1] > L):
                raise ValueError(f"{name}: positions outside [0, {L})")
            covered, dup, miss = 0, [], []
            for s, e in runs:
                if s < covered:
                    dup.extend(range(s, min(e, covered)))
                elif s > covered:
                    miss.extend(range(covered, s))
                covered = max(covered, e)
            miss.extend(range(covered, L))
            if dup:
                raise ValueError(f"{name}: positions {sorted(dup)[:8]} are kept by more than "
                                 "one instance")
            if miss:
                raise ValueError(f"{name}: positions {miss[:8]} are kept by no instance")
        if free_pages is not None:
            if page_size is None:
                raise ValueError("validate: page_size is needed with free_pages")
            for inst in self.instances:
                need = sum(math.ceil(_count(amap[inst]) / page_size)
                           for amap in self._runs if inst in amap)
                have = int(free_pages.get(inst, 0))
                if need > have:
                    raise ValueError(f"instance {inst} would keep tokens needing {need} pages "
                                     f"but has {have} free")

    def reserve(self, cache: PagedKVCache, instance: int) -> dict:
        """Allocate this instance's tokens in `cache` (all-or-nothing) and return their slots
        by request id (int64, in position order). The reservation lives in the cache: calling
        again with an equal plan returns the same slots (ring_prefill reserves if the engine
        did not; reserve before prefill to fail early and on one rank only). Raises ValueError,
        with nothing allocated, naming a request of which the cache holds other tokens."""
        instance = int(instance)
        slots, wanted = {}, {}
        for b, rid in enumerate(self.request_ids):
            pos = self.positions(b, instance)
            if not pos.numel():
                continue
            held = cache.num_tokens(rid)
            if held == 0:
                wanted[rid] = pos
            elif held == pos.numel() and torch.equal(cache.positions(rid), pos):
                slots[rid] = cache.slots(rid)
            else:
                raise ValueError(f"the cache already holds {held} tokens of request {rid!r} "
                                 f"other than the {pos.numel()} this plan keeps on instance "
                                 f"{instance}: request ids must be new to the cache")
        slots.update(cache.allocate_many(wanted))
        return slots

    def __repr__(self):
        return (f"RetentionPlan({len(self.seqlens)} requests, instances "
                f"{ {i: self.tokens_on(i) for i in self.instances} } tokens)")


def stripe_block_offsets(seqlens: Sequence[int], P: int) -> list[list[int]]:
    """offsets[j][b]: row of request b's first token in ring rank j's block (its packed stripes:
    request b contributes its tokens g with g mod P == j)."""
    offsets = [[0] * len(seqlens) for _ in range(P)]
    for j in range(P):
        at = 0
        for b, L in enumerate(seqlens):
            offsets[j][b] = at
            at += max(0, (L - j + P - 1) // P)
    return offsets


class RetentionWriter:
    """Writes the passing KV blocks' retained tokens into this instance's cache.

    Built once per (plan, cache, ring order): reserves this instance's slots (`plan.reserve`)
    and maps, for each source ring rank j, the rows of j's block kept here to their slots.
    `write(source, block, layer)` is then one row copy per step. Holds the cache weakly (the
    engine owns it)."""

    def __init__(self, plan: RetentionPlan, cache: PagedKVCache, ring_order: Sequence[int],
                 instance: int):
        if not isinstance(plan, RetentionPlan):
            raise TypeError(f"retain[0] must be a RetentionPlan, got {type(plan).__name__}")
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"retain[1] must be a PagedKVCache, got {type(cache).__name__}")
        order = tuple(int(w) for w in ring_order)
        strangers = [i for i in plan.instances if i not in order]
        if strangers:
            raise ValueError(f"retention plan keeps tokens on instances {strangers} that are not "
                             f"in the prefill ring {list(order)}: the KV never passes them")
        self.plan, self.ring_order, self.instance = plan, order, int(instance)
        self._cache = weakref.ref(cache)
        slots = plan.reserve(cache, instance)
        # What check() compares: each request's slots and the positions stored there (slots
        # alone let a request freed and allocated again, its positions now on other slots, pass)
        self._slots = {rid: (s.tolist(), cache.positions(rid).tolist())
                       for rid, s in slots.items()}
        self.version = cache.version  # placement the maps were made for
        P = len(order)
        offsets = stripe_block_offsets(plan.seqlens, P)
        src_rows = [[] for _ in range(P)]
        dst_slots = [[] for _ in range(P)]
        for b, rid in enumerate(plan.request_ids):
            if rid not in slots:
                continue
            pos, sl = plan.positions(b, instance), slots[rid]
            src = pos % P
            for j in range(P):
                sel = src == j
                src_rows[j].append(offsets[j][b] + pos[sel] // P)
                dst_slots[j].append(sl[sel])

        def cat(parts):
            t = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
            return t.to(torch.int32).to(cache.device)
        self.maps = [(cat(src_rows[j]), cat(dst_slots[j])) for j in range(P)]

    def cache_is(self, cache: PagedKVCache) -> bool:
        return self._cache() is cache

    def matches(self, plan: RetentionPlan, ring_order: Sequence[int], instance: int) -> bool:
        return (self.instance == instance and self.ring_order == tuple(ring_order)
                and (self.plan is plan or self.plan == plan))

    def check(self, cache: PagedKVCache) -> None:
        """Raise unless the cache still holds this writer's reserved tokens at its slots (after
        its placement changed: allocations of others are fine, a free or migration is not)."""
        if cache.version == self.version:
            return
        for rid, (slots, positions) in self._slots.items():
            if cache.slots(rid).tolist() != slots or cache.positions(rid).tolist() != positions:
                raise ValueError(f"the cache moved or freed the reserved tokens of request "
                                 f"{rid!r} since this retention writer was prepared: prepare a "
                                 "new runner (it reserves again)")
        self.version = cache.version

    def write(self, source: int, block: torch.Tensor, layer: int) -> None:
        """block: [2, tokens, Hkv * D] (K then V) of the KV block that came from ring rank
        `source`; its tokens kept here go to their slots of `layer` on the current stream."""
        src_idx, dst_idx = self.maps[source]
        if src_idx.numel():
            cache = self._cache()
            if cache is None:
                raise RuntimeError("the RetentionWriter's cache no longer exists")
            # The ring runner checked the layer and built the maps: the unchecked copy, P times a
            # layer.
            copy_rows_(block, src_idx, cache.kv[layer].view(2, cache.num_slots, cache.row_elems),
                       dst_idx)
