"""DecodePlan: who masters each request and which instances hold how many of its tokens.

Instances are world ranks. A plan is pure data: it holds no cache, no device state and nothing
prepared (a `DecodeRunner` holds that), compares and hashes by value, and round-trips through
`to_dict()` / `from_dict()` (plain ints, strings, lists, None), so a central scheduler can send it
to every instance. It is built collectively from every instance's cache (`DecodePlan.build`) and
changes only between decode steps: `scale_up` decides where each request's next token is stored
(its master by default, any instance with room otherwise; old KV never moves) and reserves the
slots in each instance's cache.
"""

from __future__ import annotations

import types
from typing import Hashable, Mapping, Sequence

from .._checks import as_int
from ..kvcache.cache import (CacheOutOfMemory, PagedKVCache, plain_request_id,
                             plan_request_id)


class DecodePlan:
    """requests: ids in batch order; masters[i]: master of requests[i];
    shards[i]: {instance: tokens of requests[i] stored there BEFORE this step} (zero-length
    entries dropped); append_to[i]: instance storing the token this step appends (None: the
    step appends nothing for it). So request i attends, on instance h, over
    `kv_len(i, h)` = shards[i][h] + (1 if append_to[i] == h) tokens, and its new token sits at
    global position `appended_position(i)` = sum(shards[i]). The scheduler's plans mean the
    same (esp_kernels.scheduler: shards before the step, append targets).
    free_pages / page_size: the instances' free pages and page size when the plan was made
    (information for a scheduler; not used by the decode itself).

    Fields are read-only (tuples and read-only mappings): a plan never changes once made.
    """

    __slots__ = ("requests", "masters", "shards", "append_to", "free_pages", "page_size")

    def __init__(self, requests: Sequence[Hashable], masters: Sequence[int],
                 shards: Sequence[Mapping[int, int]], append_to: Sequence[int | None] | None = None,
                 free_pages: Mapping[int, int] | None = None, page_size: int | None = None):
        requests = tuple(plain_request_id(r) for r in requests)
        if len(set(requests)) != len(requests):
            raise ValueError("DecodePlan requests must be distinct")
        if len(masters) != len(requests) or len(shards) != len(requests):
            raise ValueError("DecodePlan needs one master and one shard map per request")
        masters = tuple(as_int(m, f"master of request {r!r}", minimum=0)
                        for r, m in zip(requests, masters))
        clean = []
        for r, s in zip(requests, shards):
            d = {}
            for inst, n in dict(s).items():
                inst, n = as_int(inst, f"instance of request {r!r}", minimum=0), as_int(
                    n, f"shard length of request {r!r}")
                if n < 0:
                    raise ValueError(f"request {r!r} has a negative shard length {n} on "
                                     f"instance {inst}")
                if n:
                    d[inst] = n
            clean.append(types.MappingProxyType(dict(sorted(d.items()))))
        if append_to is None:
            append_to = (None,) * len(requests)
        elif len(append_to) != len(requests):
            raise ValueError(f"append_to has {len(append_to)} entries for {len(requests)} "
                             "requests")
        append_to = tuple(None if t is None else as_int(t, f"append_to of request {r!r}", minimum=0)
                          for r, t in zip(requests, append_to))
        set_ = object.__setattr__
        set_(self, "requests", requests)
        set_(self, "masters", masters)
        set_(self, "shards", tuple(clean))
        set_(self, "append_to", append_to)
        set_(self, "free_pages", types.MappingProxyType(
            {as_int(i, "free_pages instance", minimum=0): as_int(n, f"free pages of instance {i}",
                                                                   minimum=0)
             for i, n in sorted(dict(free_pages or {}).items())}))
        set_(self, "page_size", None if page_size is None else as_int(page_size, "page_size",
                                                                       minimum=1))

    def __setattr__(self, name, value):
        raise AttributeError(f"DecodePlan is immutable (cannot set {name!r}); make a new plan")

    # ---- value semantics -------------------------------------------------------------------
    def _key(self):
        return (self.requests, self.masters, tuple(tuple(s.items()) for s in self.shards),
                self.append_to, tuple(self.free_pages.items()), self.page_size)

    def __eq__(self, other):
        if not isinstance(other, DecodePlan):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def to_dict(self) -> dict:
        """Plain ints, strings, lists and None (JSON-ready); request ids must be ints or strs."""
        return {"kind": "DecodePlan",
                "requests": [plan_request_id(r) for r in self.requests],
                "masters": list(self.masters),
                "shards": [[[i, n] for i, n in s.items()] for s in self.shards],
                "append_to": list(self.append_to),
                "free_pages": [[i, n] for i, n in self.free_pages.items()],
                "page_size": self.page_size}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DecodePlan":
        if d.get("kind") != "DecodePlan":
            raise ValueError(f"not a DecodePlan dict (kind {d.get('kind')!r})")
        missing = [k for k in ("requests", "masters", "shards", "append_to", "free_pages",
                               "page_size") if k not in d]
        if missing:
            raise ValueError(f"DecodePlan dict is missing keys {missing}")
        return cls(d["requests"], d["masters"], [dict(map(tuple, s)) for s in d["shards"]],
                   append_to=d["append_to"], free_pages=dict(map(tuple, d["free_pages"])),
                   page_size=d["page_size"])

    def __reduce__(self):  # pickling (multi-process tests, engines) goes through the dict
        return (DecodePlan.from_dict, (self.to_dict(),))

    # ---- construction from the caches -------------------------------------------------------
    @classmethod
    def build(cls, group, cache: PagedKVCache, requests: Sequence[Hashable],
              masters: Sequence[int]) -> "DecodePlan":
        """Collective over `group`: gather every instance's shard lengths and free pages.

        Raises ValueError naming the requests no instance of the group holds (unknown ids, or
        freed), and the masters outside the group; every instance raises alike (they all see
        the same gathered lengths), and nothing changes.
        """
        requests = list(requests)
        if len(masters) != len(requests):
            raise ValueError(f"{len(masters)} masters for {len(requests)} requests")
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
        unknown = [r for r, s in zip(requests, shards) if not s]
        if unknown:
            raise ValueError(f"DecodePlan.build: no instance of the group "
                             f"{list(group.world_ranks)} holds any token of requests "
                             f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''} (unknown ids, "
                             "or freed)")
        strangers = sorted({int(m) for m in masters} - set(group.world_ranks))
        if strangers:
            raise ValueError(f"DecodePlan.build: masters {strangers} are not in the group "
                             f"{list(group.world_ranks)}")
        return cls(requests, masters, shards, free_pages=free, page_size=sizes.pop())

    # ---- queries ---------------------------------------------------------------------------
    def kv_len(self, i: int, instance: int) -> int:
        """Tokens of request i that `instance` attends over this step (its appended one too)."""
        return self.shards[i].get(instance, 0) + (self.append_to[i] == instance)

    def kv_shards(self, i: int) -> dict[int, int]:
        """{instance: kv_len(i, instance)} over the instances with tokens of request i this
        step, ascending."""
        s, t = self.shards[i], self.append_to[i]
        if t is None:
            return dict(s)
        return dict(sorted({**s, t: s.get(t, 0) + 1}.items()))

    def total_len(self, i: int) -> int:
        """Tokens request i attends over this step (its appended one included)."""
        return sum(self.shards[i].values()) + (self.append_to[i] is not None)

    def appended_position(self, i: int) -> int:
        """Global position of the token appended for request i this step."""
        return sum(self.shards[i].values())

    def holders(self, i: int) -> list[int]:
        """Instances holding tokens of request i this step (sorted world ranks): the ones whose
        partial states its master merges."""
        return list(self.kv_shards(i))

    def mastered_by(self, instance: int) -> list[int]:
        """Indices of the requests `instance` masters, in batch order (= its q rows)."""
        return [i for i, m in enumerate(self.masters) if m == instance]

    def held_by(self, instance: int) -> list[int]:
        return [i for i in range(len(self.requests)) if self.kv_len(i, instance)]

    # ---- scale-up --------------------------------------------------------------------------
    def scale_up(self, group, cache: PagedKVCache) -> "DecodePlan":
        """Collective: place every request's next token and reserve its slot in the cache of
        the instance that stores it (`reserve`); returns the new plan (this one is unchanged).

        The request's master stores it if it has room (a free slot in the request's last page,
        or a free page); otherwise the instance with the most free pages. Every instance decides
        the same from the gathered lengths and free pages; each reserves what it stores.
        Raises CacheOutOfMemory, with nothing allocated, if some token has nowhere to go, and
        ValueError if the caches do not hold exactly this plan's tokens (a stale plan: e.g.
        scale_up already called on it).
        """
        me = group.world_ranks[group.rank]
        rows = group.all_gather_ints([cache.free_pages] +
                                     [cache.num_tokens(r) for r in self.requests])
        free = {group.world_ranks[p]: row[0] for p, row in enumerate(rows)}
        local = {group.world_ranks[p]: row[1:] for p, row in enumerate(rows)}
        # The caches must hold exactly this plan's tokens (its appended ones included; where they
        # are may have changed, by migration). More means slots this plan does not know were
        # reserved (scale_up called on it before: the second plan would attend over the first
        # one's unwritten slot), fewer means tokens went: either way the plan is stale. Every
        # instance raises alike (the counts are gathered), nothing allocated.
        held = [sum(col) for col in zip(*local.values())]  # every request's tokens, all caches
        stale = [(rid, held[i], self.total_len(i)) for i, rid in enumerate(self.requests)
                 if held[i] != self.total_len(i)]
        if stale:
            rid, held, want = stale[0]
            raise ValueError(
                f"DecodePlan.scale_up: the caches hold {held} tokens of request {rid!r} but this "
                f"plan accounts for {want} ({len(stale)} requests differ): the plan is stale "
                "(scale_up was already called on it, or tokens were added or removed since); "
                "scale up the plan that call returned, or remove the unwritten slots and "
                "DecodePlan.build a new one")
        # The new plan's shards: what the caches hold now (this plan's appends included).
        shards = [{inst: n[i] for inst, n in local.items() if n[i]}
                  for i in range(len(self.requests))]
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
        plan = DecodePlan(self.requests, self.masters, shards, append_to=targets,
                          free_pages=free, page_size=ps)
        plan.reserve(cache, me)
        return plan

    def reserve(self, cache: PagedKVCache, instance: int) -> dict:
        """Allocate, in `instance`'s cache, the slot of every token the plan appends there
        (all-or-nothing); returns {request id: slot}. Idempotent: a token whose position the
        cache already stores as the request's last token keeps its slot (no other token can be
        there: positions below it are the ones the shards count). The slots live in the cache
        (a runner finds them there), not on the plan. Raises CacheOutOfMemory with nothing
        allocated."""
        instance = as_int(instance, "instance")
        slots, wanted = {}, {}
        for i, (rid, t) in enumerate(zip(self.requests, self.append_to)):
            if t != instance:
                continue
            pos = self.appended_position(i)
            last = cache.last_token(rid)
            if last is not None and last[0] == pos:
                slots[rid] = last[1]
            else:
                wanted[rid] = pos
        slots.update(cache.append_one(wanted))
        return slots

    def allocate_appends(self, cache: PagedKVCache, instance: int) -> "DecodePlan":
        """`reserve(cache, instance)`, then this plan (for chaining when the append targets
        were decided centrally, e.g. by esp_kernels.scheduler). Not collective."""
        self.reserve(cache, instance)
        return self

    def __repr__(self):
        return (f"DecodePlan({len(self.requests)} requests, masters {sorted(set(self.masters))}, "
                f"max shards {max((len(s) for s in self.shards), default=0)})")
