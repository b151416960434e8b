"""Iteration plans: what the scheduler decided, as pure data (frozen dataclasses).

Instances are world ranks; request ids (rid) are ints or strings. Every plan has to_dict() /
from_dict() with plain JSON types, and maps onto the drivers' plans (esp_kernels.RetentionPlan,
DecodePlan, MigrationPlan; imported only when asked, so this module needs no torch).
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Tuple

Rid = Hashable


def _tuples(x):
    """Lists (from JSON) back to nested tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


class _Data:
    def to_dict(self) -> dict:
        return {"type": type(self).__name__,
                **{f.name: _lists(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, d: dict):
        if d.get("type", cls.__name__) != cls.__name__:
            raise ValueError(f"{cls.__name__}.from_dict got a {d.get('type')!r}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                raise ValueError(f"{cls.__name__}.from_dict: missing key {f.name!r}")
            kw[f.name] = _tuples(d[f.name])
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class PrefillGroup(_Data):
    """One prefill batch on an ESP group.

    instances: ordered ring (world ranks). requests / seqlens: tokens prefilled per request
    (prompt, plus what it had generated if it is recomputed). retention[b]: (instance, start, end)
    ranges of global positions kept there for decode: disjoint, covering [0, seqlen) exactly,
    on ring members. predicted_time: the cost model's prefill_time."""
    batch_id: int
    instances: Tuple[int, ...]
    requests: Tuple[Rid, ...]
    seqlens: Tuple[int, ...]
    retention: Tuple[Tuple[Tuple[int, int, int], ...], ...]
    predicted_time: float

    def retention_plan(self, free_pages=None, page_size=None):
        """esp_kernels.RetentionPlan of this group (request_ids = requests)."""
        from ..kvcache import RetentionPlan
        assignment = []
        for ranges in self.retention:
            amap: dict = {}
            for i, s, e in ranges:   # an instance may keep several ranges of one request
                amap[i] = range(s, e) if i not in amap else [*amap[i], *range(s, e)]
            assignment.append(amap)
        return RetentionPlan(self.seqlens, assignment, request_ids=list(self.requests),
                             free_pages=free_pages, page_size=page_size)


@dataclasses.dataclass(frozen=True)
class DecodeBatch(_Data):
    """One decode step of a batch. instances: every instance that masters or holds KV (or takes
    a scale-up token). shards[b]: (instance, KV tokens held there) BEFORE this step.
    append_to[b]: the instance storing this step's new KV token (the master when it has room,
    else a scale-up target)."""
    batch_id: int
    instances: Tuple[int, ...]
    requests: Tuple[Rid, ...]
    masters: Tuple[int, ...]
    shards: Tuple[Tuple[Tuple[int, int], ...], ...]
    append_to: Tuple[int, ...]
    predicted_time: float

    def decode_plan(self):
        """esp_kernels.DecodePlan(requests, masters, shards, append_to=append_to)."""
        from ..decode import DecodePlan
        return DecodePlan(list(self.requests), list(self.masters),
                          [dict(s) for s in self.shards], append_to=list(self.append_to))


@dataclasses.dataclass(frozen=True)
class MigrationOrder(_Data):
    """Move the tokens of positions [start, end) of `request` that `src` holds to `dst`;
    executed before the batches of its iteration."""
    request: Rid
    start: int
    end: int
    src: int
    dst: int


@dataclasses.dataclass(frozen=True)
class IterationPlan:
    """What to run now on the instances that were idle at schedule() time. Batches use
    disjoint instances. preemptions: requests whose KV was freed everywhere (requeued; their
    prefill is recomputed later). predicted_time: max over its batches, plus its migrations."""
    index: int
    now: float
    prefills: Tuple[PrefillGroup, ...]
    decodes: Tuple[DecodeBatch, ...]
    migrations: Tuple[MigrationOrder, ...]
    preemptions: Tuple[Rid, ...]
    predicted_time: float

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes or self.migrations or self.preemptions)

    @property
    def batches(self):
        return self.prefills + self.decodes

    def migration_plan(self):
        """esp_kernels.MigrationPlan of the migrations, in order."""
        from ..kvcache import MigrationPlan
        return MigrationPlan([(m.request, m.start, m.end, m.src, m.dst) for m in self.migrations])

    def to_dict(self) -> dict:
        return {"type": "IterationPlan", "index": self.index, "now": self.now,
                "prefills": [p.to_dict() for p in self.prefills],
                "decodes": [d.to_dict() for d in self.decodes],
                "migrations": [m.to_dict() for m in self.migrations],
                "preemptions": list(self.preemptions), "predicted_time": self.predicted_time}

    @classmethod
    def from_dict(cls, d: dict) -> "IterationPlan":
        for k in ("index", "now", "prefills", "decodes", "migrations", "preemptions",
                  "predicted_time"):
            if k not in d:
                raise ValueError(f"IterationPlan.from_dict: missing key {k!r}")
        return cls(d["index"], d["now"], tuple(PrefillGroup.from_dict(p) for p in d["prefills"]),
                   tuple(DecodeBatch.from_dict(x) for x in d["decodes"]),
                   tuple(MigrationOrder.from_dict(m) for m in d["migrations"]),
                   tuple(d["preemptions"]), d["predicted_time"])
