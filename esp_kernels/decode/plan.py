"""DecodePlan: who masters each request and which instances hold how many of its tokens.

Instances are world ranks. A plan is built collectively from every instance's cache
(`DecodePlan.build`), is the same object on every instance, and changes only between decode
steps: `scale_up` decides where each request's next token is stored (its master by default, any
instance with room otherwise; old KV never moves) and allocates the slots; `allocate_appends`
allocates them for targets decided elsewhere (the scheduler's `append_to`), with no collective.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

from ..kvcache.cache import CacheOutOfMemory, PagedKVCache


class DecodePlan:
    """requests: ids in batch order; masters[i]: master of requests[i];
    shards[i]: {instance: tokens of requests[i] stored there} (zero-length entries dropped);
    append_to[i]: instance storing the token appended at this step, or None when the step
    appends nothing. `append_slots` holds, on the instance that calls scale_up, the slot of each
    token it stores ({request id: slot})."""

    def __init__(self, requests: Sequence[Hashable], masters: Sequence[int],
                 shards: Sequence[Mapping[int, int]], append_to: Sequence[int] | None = None,
                 free_pages: Mapping[int, int] | None = None, page_size: int | None = None):
        self.requests = list(requests)
        if len(set(self.requests)) != len(self.requests):
            raise ValueError("DecodePlan requests must be distinct")
        if len(masters) != len(self.requests) or len(shards) != len(self.requests):
            raise ValueError("DecodePlan needs one master and one shard map per request")
        self.masters = [int(m) for m in masters]
        self.shards = [{int(i): int(n) for i, n in s.items() if int(n) > 0} for s in shards]
        for i, s in enumerate(self.shards):
            if any(n < 0 for n in s.values()):
                raise ValueError(f"request {self.requests[i]!r} has a negative shard length")
        self.append_to = ([None if t is None else int(t) for t in append_to]
                          if append_to is not None else [None] * len(self.requests))
        if len(self.append_to) != len(self.requests):
            raise ValueError(f"append_to has {len(self.append_to)} entries for "
                             f"{len(self.requests)} requests")
        self.free_pages = dict(free_pages or {})
        self.page_size = page_size
        self.append_slots: dict = {}
        self._steps: dict = {}  # per-instance precomputed exchange layout (driver.py)

    @classmethod
    def build(cls, group, cache: PagedKVCache, requests: Sequence[Hashable],
              masters: Sequence[int]) -> "DecodePlan":
        """Collective over `group`: gather every instance's shard lengths and free pages."""
        lens = [cache.num_tokens(r) for r in requests]
        rows = group.all_gather_ints(lens + [cache.free_pages, cache.page_size])
        shards = [{} for _ in requests]
        free, sizes = {}, set()
        for pos, row in enumerate(rows):
            inst = group.world_ranks[pos]
            for i, n in enumerate(row[: len(requests)]):
                if n:
                    shards[i][inst] = n
            free[inst] = row[len(requests)]
            sizes.add(row[len(requests) + 1])
        if len(sizes) != 1:
            raise ValueError(f"instances use different page sizes {sorted(sizes)}")
        return cls(requests, masters, shards, free_pages=free, page_size=sizes.pop())

    # ---- queries ---------------------------------------------------------------------------
    def total_len(self, i: int) -> int:
        return sum(self.shards[i].values())

    def holders(self, i: int) -> list[int]:
        """Instances holding tokens of request i (sorted world ranks)."""
        return sorted(self.shards[i])

    def mastered_by(self, instance: int) -> list[int]:
        """Indices of the requests `instance` masters, in batch order (= its q rows)."""
        return [i for i, m in enumerate(self.masters) if m == instance]

    def held_by(self, instance: int) -> list[int]:
        return [i for i, s in enumerate(self.shards) if instance in s]

    # ---- scale-up --------------------------------------------------------------------------
    def scale_up(self, group, cache: PagedKVCache) -> "DecodePlan":
        """Collective: place every request's next token and allocate its slot.

        The request's master stores it if it has room (a free slot in the request's last page,
        or a free page); otherwise the instance with the most free pages. Every instance decides
        the same from the gathered lengths and free pages; each allocates what it stores.
        Raises CacheOutOfMemory, with nothing allocated, if some token has nowhere to go.
        """
        me = group.world_ranks[group.rank]
        rows = group.all_gather_ints([cache.free_pages] +
                                     [cache.num_tokens(r) for r in self.requests])
        free = {group.world_ranks[p]: row[0] for p, row in enumerate(rows)}
        local = {group.world_ranks[p]: row[1:] for p, row in enumerate(rows)}
        ps = cache.page_size
        targets = []
        for i, rid in enumerate(self.requests):
            def room(inst):
                n = local[inst][i] if inst in local else 0
                return n % ps != 0 or free.get(inst, 0) > 0
            m = self.masters[i]
            if room(m):
                t = m
            else:
                cands = sorted((inst for inst in free if room(inst)), key=lambda x: (-free[x], x))
                if not cands:
                    raise CacheOutOfMemory(f"no instance has room for the next token of request "
                                           f"{rid!r}")
                t = cands[0]
            if local[t][i] % ps == 0:
                free[t] -= 1
            local[t][i] += 1
            targets.append(t)
        return DecodePlan(self.requests, self.masters, self.shards, append_to=targets,
                          free_pages=free, page_size=ps).allocate_appends(cache, me)

    def allocate_appends(self, cache: PagedKVCache, instance: int) -> "DecodePlan":
        """The plan of a step whose `append_to` was decided beforehand (by `scale_up`, or
        centrally, e.g. by esp_kernels.scheduler, with `shards` as they are before the step).

        Not collective: every instance of the step calls it with the same plan and its own
        cache. Returns a new plan whose shards count each appended token on its target, with
        `append_slots` holding the slots allocated in `cache` for the tokens `instance` stores
        (each at global position = the request's length before the step). Raises
        CacheOutOfMemory, with nothing allocated, if they do not fit.
        """
        instance = int(instance)
        mine = {rid: [self.total_len(i)] for i, rid in enumerate(self.requests)
                if self.append_to[i] == instance}
        slots = cache.allocate_many(mine)
        shards = [dict(s) for s in self.shards]
        for i, t in enumerate(self.append_to):
            if t is not None:
                shards[i][t] = shards[i].get(t, 0) + 1
        plan = DecodePlan(self.requests, self.masters, shards, append_to=self.append_to,
                          free_pages=self.free_pages, page_size=cache.page_size)
        plan.append_slots = {rid: int(s[0]) for rid, s in slots.items()}
        return plan

    def __repr__(self):
        return (f"DecodePlan({len(self.requests)} requests, masters {sorted(set(self.masters))}, "
                f"max shards {max((len(s) for s in self.shards), default=0)})")
