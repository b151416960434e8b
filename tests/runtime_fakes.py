"""Scripted stand-ins for esp_kernels.scheduler's decisions in the runtime tests.

`Script` builds IterationPlans by hand while it tracks where every token of every request's KV
is, so a test states only the decisions (rings, retention, masters, append targets, migrations,
preemptions) and the shards / prefill lengths follow; `ScriptedScheduler` serves the plans in
order through the scheduler interface that `esp_kernels.runtime.serve` drives.
"""

from __future__ import annotations

import collections
from typing import Hashable, Mapping, Sequence

# The scheduler's own plan types: a script is what the scheduler would have decided.
from esp_kernels.scheduler.plans import DecodeBatch, IterationPlan, MigrationOrder, PrefillGroup


class Script:
    """requests: {rid: (prompt_len, max_new_tokens)}. A request finishes in the script after
    max_new_tokens tokens (a test of EOS gives the script the EOS step as max_new_tokens)."""

    def __init__(self, num_instances: int, requests: Mapping[Hashable, tuple]):
        self.n = num_instances
        self.req = {rid: tuple(v) for rid, v in requests.items()}
        self.owner = {rid: [] for rid in requests}       # instance of each KV position
        self.generated = collections.Counter()
        self.finished: set = set()
        self.plans: list[IterationPlan] = []
        self._batch = 0

    def _live(self, rid):
        if rid in self.finished:
            raise AssertionError(f"script schedules request {rid!r} after it finished")

    def _seqlen(self, rid) -> int:
        return self.req[rid][0] + self.generated[rid]

    def shards(self, rid) -> tuple:
        c = collections.Counter(self.owner[rid])
        return tuple(sorted(c.items()))

    def _generated(self, rid):
        self.generated[rid] += 1
        if self.generated[rid] >= self.req[rid][1]:
            self.finished.add(rid)
            self.owner[rid] = []

    def iteration(self, prefills: Sequence = (), decodes: Sequence = (),
                  migrations: Sequence = (), preempt: Sequence = ()) -> IterationPlan:
        """prefills: (ring instances, {rid: keep}) with keep an instance (all tokens there) or
        ((instance, start, end), ...); decodes: ({rid: master}, {rid: append target}) (target
        defaults to the master; the batch's instances are its masters, holders and targets,
        sorted); migrations: (rid, start, end, src, dst); preempt: request ids."""
        for rid in preempt:
            self._live(rid)
            self.owner[rid] = []
        orders = []
        for rid, start, end, src, dst in migrations:
            own = self.owner[rid]
            for g in range(start, end):
                if own[g] == src:
                    own[g] = dst
            orders.append(MigrationOrder(rid, start, end, src, dst))
        used: set = set()

        def claim(insts):
            if used & set(insts):
                raise AssertionError(f"batches share instances {sorted(used & set(insts))}")
            used.update(insts)

        dbatches = []
        for masters, appends in decodes:
            rids = tuple(masters)
            for rid in rids:
                self._live(rid)
            targets = tuple(appends.get(rid, masters[rid]) for rid in rids)
            shards = tuple(self.shards(rid) for rid in rids)
            insts = sorted({masters[r] for r in rids} | set(targets) |
                           {i for s in shards for i, _ in s})
            claim(insts)
            dbatches.append(DecodeBatch(self._next(), tuple(insts), rids,
                                        tuple(masters[r] for r in rids), shards, targets, 0.0))
        pgroups = []
        for ring, keeps in prefills:
            claim(ring)
            rids = tuple(keeps)
            seqlens = tuple(self._seqlen(r) for r in rids)
            retention = []
            for rid, L in zip(rids, seqlens):
                self._live(rid)
                keep = keeps[rid]
                ranges = ((keep, 0, L),) if isinstance(keep, int) else tuple(keep)
                retention.append(ranges)
            pgroups.append(PrefillGroup(self._next(), tuple(ring), rids, seqlens,
                                        tuple(retention), 0.0))
        # Effects, after the plan is fixed: KV placed, one token generated per request.
        for db in dbatches:
            for rid, t in zip(db.requests, db.append_to):
                self.owner[rid].append(t)
                self._generated(rid)
        for pg in pgroups:
            for rid, L, ranges in zip(pg.requests, pg.seqlens, pg.retention):
                own = [None] * L
                for inst, s, e in ranges:
                    own[s:e] = [inst] * (e - s)
                assert None not in own, f"retention of {rid!r} does not cover [0, {L})"
                self.owner[rid] = own
                self._generated(rid)
        plan = IterationPlan(len(self.plans), float(len(self.plans)), tuple(pgroups),
                             tuple(dbatches), tuple(orders), tuple(preempt), 0.0)
        self.plans.append(plan)
        return plan

    def _next(self) -> int:
        self._batch += 1
        return self._batch


class ScriptedScheduler:
    """The scheduler interface over a fixed list of plans (then empty plans)."""

    def __init__(self, plans: Sequence[IterationPlan]):
        self.plans = list(plans)
        self.added: dict = {}
        self.updates: list = []

    def add_request(self, rid, prompt_len, max_new_tokens, arrival=None):
        self.added[rid] = (prompt_len, max_new_tokens)

    def schedule(self, now=0.0) -> IterationPlan:
        if self.plans:
            return self.plans.pop(0)
        return IterationPlan(-1, now, (), (), (), (), 0.0)

    def update(self, done, finished=(), now=None):
        self.updates.append((done, tuple(finished)))


def random_plans(rng, num_instances: int, requests: Mapping[Hashable, tuple]) -> list:
    """A random valid plan sequence serving every request to its end: each iteration either
    prefills some waiting requests on a random ring (any order, any size) with random
    contiguous retention ranges on its members, or decodes every running request with random
    masters and append targets, after maybe preempting one and migrating a random range of
    another. rng: a random.Random."""
    s = Script(num_instances, requests)
    waiting, running = list(requests), []
    while waiting or running:
        if waiting and (not running or rng.random() < 0.5):
            batch = rng.sample(waiting, rng.randint(1, min(3, len(waiting))))
            ring = rng.sample(range(num_instances), rng.randint(1, num_instances))
            keeps = {}
            for rid in batch:
                L = s._seqlen(rid)
                cuts = sorted(rng.sample(range(1, L), min(L - 1, rng.randint(0, len(ring) - 1))))
                bounds = [0] + cuts + [L]
                keeps[rid] = tuple((rng.choice(ring), a, b) for a, b in zip(bounds, bounds[1:]))
            s.iteration(prefills=[(tuple(ring), keeps)])
            for rid in batch:
                waiting.remove(rid)
                if rid not in s.finished:
                    running.append(rid)
            continue
        preempt, migrations = [], []
        if len(running) > 1 and rng.random() < 0.2:
            victim = rng.choice(running)
            preempt.append(victim)
            running.remove(victim)
            waiting.append(victim)
        if num_instances > 1 and rng.random() < 0.4:
            rid = rng.choice(running)
            src = rng.choice(sorted(set(s.owner[rid])))
            dst = rng.choice([i for i in range(num_instances) if i != src])
            L = len(s.owner[rid])
            # A range holding at least one of src's tokens: migrate_kv refuses one with none.
            g = rng.choice([p for p, o in enumerate(s.owner[rid]) if o == src])
            a = rng.randint(0, g)
            migrations.append((rid, a, rng.randint(g + 1, L), src, dst))
        masters = {rid: rng.randrange(num_instances) for rid in running}
        spills = {rid: rng.randrange(num_instances) for rid in running if rng.random() < 0.3}
        s.iteration(preempt=preempt, migrations=migrations, decodes=[(masters, spills)])
        running = [rid for rid in running if rid not in s.finished]
    return s.plans
