"""ESPScheduler: LoongServe's elastic scheduling policy as an embeddable component.

    sched = ESPScheduler(num_instances, kv_slots_per_instance, cost_model, page_size=16, **policy)
    sched.add_request(rid, prompt_len, max_new_tokens)
    it = sched.schedule(now)        # IterationPlan for the instances idle now
    sched.update(it or one batch, finished=(rids that hit EOS), now=...)

Asynchronous: schedule() plans only instances that are idle (not in a batch handed out and not
yet reported done through update()); a lock-step engine passes the whole IterationPlan back, an
event-driven one (the simulator) each batch as it completes. An empty plan means nothing can
start until a running batch completes or a request arrives. KV is accounted when planned
(retention, appends and migrations are applied to the scheduler's books at schedule() time), per
instance in pages: a request's tokens on an instance take ceil(tokens / page_size) pages.
Deterministic: the same calls give the same plans (no randomness, no dict-order dependence on
hashing of rids).

Token semantics: a prefill over n tokens leaves n KV tokens and generates 1 token; a decode step
appends the KV of the last generated token and generates 1 token; a request finishes after
max_new_tokens tokens (or when update() lists it in `finished`) and its KV is freed. A request
preempted for recompute after g tokens is prefilled again over prompt_len + g tokens.

add_request rejects (ValueError) a request that can never run: its peak KV, prompt_len +
max_new_tokens - 1 tokens, needs more pages than all instances hold, counting one page of
rounding per instance it may spread over; or its largest prefill (a recompute of that peak) does
not fit the largest allowed group's pages.

Every schedule(), in this order:
1. Decode components. Decoding requests whose KV instances are all idle are grouped into
   components (union-find over the instances of each request): requests sharing an instance
   must be in one decode batch, since batches of an iteration use disjoint instances.
1b. Consolidation (`consolidate_decode`; LoongServe's _minimize_decoding_occupied_instances):
   with requests queued and decode KV on more instances than it needs (ceil(decoding requests /
   max_requests_per_master) and ceil(pages in use / pages per instance)), a ready component
   whose instances hold only its KV moves all of it onto one instance of a larger decode batch
   (ready, or running and ending within one of its steps: then its requests skip this step, at
   most 2 in a row) with room for its KV and growth, at most max_requests_per_master requests
   together, when the decode instance-time saved exceeds twice the migration time. Its
   instances, emptied, join the prefill pool (see _consolidate_decode).
2. Dispatch: FCFS with a bounded out-of-order window. The queue is walked in arrival order (a
   recomputed request keeps its place). A request is a prefill candidate if future-KV admission
   (`admission`) admits it: with every alive request (decoding, prefilling, earlier candidates)
   sorted by remaining output r descending and h = the KV it holds (a candidate: its prefill
   length), the peak KV is max_k (Σ_{i<=k} h_i + r_k·(k+1)) (LoongServe's formula); it must fit
   `admission_ratio` of all slots less one page per alive request (with nothing alive, any
   request is admitted). The exact peak is computed only when the sum of every request's final
   KV (an upper bound on it) does not fit. At most `max_prefill_candidates` candidates and
   `max_prefill_tokens` prefill tokens (a first candidate is always allowed).
   Bounded out-of-order: a request is overtaken when a later-arrived request starts its prefill
   while it stays queued; one overtaken `max_out_of_order` times is pinned. A pinned request that
   fails admission stops the walk. In the DP a pinned candidate cannot be deferred; if that makes
   the DP infeasible, the candidates are cut at the first pinned one that must wait (the largest
   feasible cut, by bisection): nothing behind it runs, and step 4 tries decode components for
   the uncut candidates (a pool that runs the pinned one is taken unless a running prefill
   group that will empty its instances ends soon enough that waiting adds less latency). So no
   request is overtaken more than `max_out_of_order` times, and every admitted request
   eventually runs (decodes end and free their KV; nothing new is admitted past a pinned
   request).
3. Batching DP (batching.py; exact over its stated space): candidates sorted by length are split
   into batches, each on its own group of the prefill pool (group sizes from `group_sizes`; a
   batch of several requests at most `max_prefill_time` long), minimising LoongServe's input-token
   latency Σ T(g, batch)·Σ1/l, plus (W + T(G, l))/l per deferred request, where G is the largest
   allowed group and W the wait until instances free up: the earliest of a running prefill's end
   (plus, when each of its instances keeps KV, its requests' decode: step time times their
   longest remaining output), and a decode batch's or ready decode component's step time times
   its longest remaining output
   (LoongServe's "run now on fewer instances only if that costs less than waiting"). With nothing
   running or ready (or `defer` off) deferring costs 1e12/l: whatever fits runs. The pool: the
   idle instances outside decode components.
4. Preemption of decode for prefill (`preempt_decode`): if the DP deferred a candidate, decode
   components (fewest requests first, at most `preempt_max_components`) are tried one at a time:
   one joins the pool (its decode step waits an iteration; its KV stays) when the DP cost with it
   plus the decode slowdown, the prefill's time · Σ_{its requests} 1/max_new_tokens ·
   `preempt_weight` (what the delay adds to their output-token latencies), is below the cost
   without it. When a pinned candidate was cut (step 2), components are added until the uncut
   candidates fit, and that pool is taken. A component is not preempted more than
   `max_decode_preemptions` times in a row. A trial whose slowdown alone, at the cheapest
   feasible batch time, exceeds the current cost is skipped without running the DP.
5. Retention (proactive scale-down): each prefill group keeps each request's KV fill-first, in
   position order, on its members ordered by `retention_order`: "fewest" (most free pages first:
   the batch lands on as few instances as possible and the others stay empty, free for other
   prefills) or "packed" (fullest first: tops up instances that already hold KV). Each request
   gets contiguous ranges; fill-first needs exactly Σ ceil(l / page_size) pages, which the DP
   checked. The instance holding a request's last tokens becomes its master.
6. Decode batches, one per component: M = ceil(R / max_requests_per_master) masters (LoongServe's
   ~128: decode is compute-bound beyond), the component's instances in used-token order (least
   used first); a request keeps its master if chosen and not full, else goes to the chosen master
   holding most of its KV, else the least loaded. Merge (`merge_decode`): before that, a
   component whose instances lack the free pages its requests' new tokens need (a request needs
   one when its tokens on its master fill their last page) is merged into the component with
   the largest surplus that covers it, so the tokens go there rather than onto an idle instance
   or to recompute; and a request whose token has nowhere to go while some instance outside its
   batch (busy now, or in another batch) has free pages skips the step, to merge when both are
   ready (asynchronous batches rarely are at once). Migration (`migrate_consolidate`, at most
   `max_migrations` orders per iteration, executed before the batches): a request spread over
   several instances has its other shards moved to its master when the master has room for them
   plus the request's remaining growth, and migration_time(tokens) < remaining steps ×
   (decode_time over its holders - decode_time on one instance). Release (`migrate_for_prefill`):
   if candidates were left queued, one non-master instance of a component that received no KV in
   this schedule() (no token moves twice in one plan) is emptied by moving its shards to the
   component's other instances when the decode slowdown (migration time · Σ 1/max_new_tokens ·
   `preempt_weight`) is below what the queued candidates that fit an instance gain by running
   now on one instance instead of waiting (their defer cost less T(1, l)/l); the freed instance
   joins the next schedule()'s prefill pool. Each step's new token goes to
   the master if it has room (a free slot in the request's last page there, or a free page); else
   (`scale_up`) to the component's instance with the most free pages, else to an unclaimed idle
   instance (it joins the batch); if nothing has room (`recompute`), the newest request (of those
   holding KV on the master when scale-up is off) is preempted: its KV is freed everywhere, it is
   requeued, listed in IterationPlan.preemptions and prefilled again later. If a schedule() made
   only preemptions, it plans again at once so the freed instances are used.

Predicted times: a PrefillGroup's is prefill_time(group size, seqlens); a DecodeBatch's is
decode_time over its requests' KV after the append, its holders and masters; an IterationPlan's
is the max over its batches plus migration_time of the tokens of each (src, dst) pair of its
migrations (migrate_kv moves a pair's orders as one batch). A migration order names exactly the
positions that move: one order per contiguous range the source holds.

Policy knobs: keyword arguments of ESPScheduler, fields of Policy (defaults there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Iterable, Sequence

import numpy as np

from .batching import BatchTable, solve_table
from .cost_model import CostModel
from .plans import DecodeBatch, IterationPlan, MigrationOrder, PrefillGroup

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Policy:
    """Every decision's knob (the module docstring says where each acts)."""
    max_out_of_order: int = 8            # times a queued request may be overtaken; then pinned
    max_prefill_candidates: int = 16     # requests the DP considers per iteration
    max_prefill_tokens: int | None = None  # prefill tokens per iteration (None: no cap)
    max_prefill_time: float | None = None  # a multi-request batch's prefill time cap (s;
                                           # LoongServe's max_prefill_time)
    group_sizes: tuple | None = None     # allowed ESP group sizes (None: all up to 16, then
                                         # coarser: batching.default_group_sizes)
    admission: bool = True               # future-KV admission
    admission_ratio: float = 1.0         # fraction of all KV slots admission may plan for
    defer: bool = True                   # the DP may leave a request queued when waiting pays
    preempt_decode: bool = True          # prefill may take idle decode instances when it pays
    preempt_weight: float = 1.0          # weight of the decode slowdown in that decision
    preempt_max_components: int = 2      # decode components tried per iteration (cheapest first)
    max_decode_preemptions: int = 4      # consecutive preemptions of one decode component
    retention_order: str = "fewest"      # "fewest" (roomiest first) or "packed" (fullest first)
    max_requests_per_master: int = 128   # decode is compute-bound beyond this (LoongServe)
    merge_decode: bool = True            # merge a decode batch short of KV pages into one
                                         # with room (before scaling up onto idle instances)
    scale_up: bool = True                # append to another instance when the master is full
    migrate_consolidate: bool = True     # move a request's shards to its master when it pays
    migrate_for_prefill: bool = True     # empty a decode instance for a queued prefill when
                                         # it pays
    max_migrations: int = 8              # migration orders per iteration
    consolidate_decode: bool = True      # move a small decode batch's KV onto an instance
                                         # that already decodes, freeing its instances for
                                         # queued prefills (step 1b)
    recompute: bool = True               # last resort on memory shortage: preempt the newest

    def __post_init__(self):
        for name in ("max_out_of_order", "max_migrations", "max_decode_preemptions",
                     "preempt_max_components"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"policy {name} must be an int >= 0, got {v!r}")
        for name in ("max_prefill_candidates", "max_requests_per_master"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"policy {name} must be an int >= 1, got {v!r}")
        if self.max_prefill_tokens is not None and (not isinstance(self.max_prefill_tokens, int)
                                                    or self.max_prefill_tokens < 1):
            raise ValueError(f"policy max_prefill_tokens must be None or an int >= 1, got "
                             f"{self.max_prefill_tokens!r}")
        if self.max_prefill_time is not None and not self.max_prefill_time > 0:
            raise ValueError(f"policy max_prefill_time must be None or > 0, got "
                             f"{self.max_prefill_time!r}")
        if not self.preempt_weight >= 0:
            raise ValueError(f"policy preempt_weight must be >= 0, got {self.preempt_weight!r}")
        if self.retention_order not in ("fewest", "packed"):
            raise ValueError(f"policy retention_order must be 'fewest' or 'packed', got "
                             f"{self.retention_order!r}")
        if not 0 < self.admission_ratio <= 1:
            raise ValueError(f"policy admission_ratio must be in (0, 1], got "
                             f"{self.admission_ratio}")
        if self.group_sizes is not None and (not self.group_sizes or any(
                not isinstance(g, int) or g < 1 for g in self.group_sizes)):
            raise ValueError(f"policy group_sizes must be ints >= 1, got {self.group_sizes!r}")


class _Req:
    __slots__ = ("rid", "seq", "prompt", "max_new", "arrival", "state", "generated", "ranges",
                 "ntok", "kv_len", "master", "overtaken", "batch", "preempted", "waits")

    def __init__(self, rid, seq, prompt, max_new, arrival):
        self.rid, self.seq, self.arrival = rid, seq, arrival
        self.prompt, self.max_new = prompt, max_new
        self.state = "queued"
        self.generated = 0
        self.ranges: dict = {}    # instance -> [[start, end), ...] positions held there
        self.ntok: dict = {}      # instance -> tokens held there
        self.kv_len = 0
        self.master = None
        self.overtaken = 0
        self.batch = None         # id of the running batch it is in
        self.preempted = 0        # times recomputed
        self.waits = 0            # consecutive decode steps skipped to consolidate (step 1b)

    @property
    def prefill_len(self) -> int:
        return self.prompt + self.generated

    @property
    def remaining(self) -> int:
        """Tokens still to generate."""
        return self.max_new - self.generated


class ESPScheduler:
    """See the module docstring. Instances are 0..num_instances-1 (world ranks).

    stats (counters since construction): iterations (schedule() calls), prefill_batches,
    prefilled_requests, decode_batches, decode_steps (request-steps completed), migrations
    (orders), migrated_tokens, released_instances, scale_ups, decode_merges, decode_waits
    (request-steps skipped to wait for a merge), recompute_preemptions,
    decode_preempted_for_prefill (request-steps that waited for a prefill), deferred
    (candidate-iterations the DP left queued), finished."""

    def __init__(self, num_instances: int, kv_slots_per_instance: int, cost_model: CostModel,
                 page_size: int = 16, **policy):
        for name, v in (("num_instances", num_instances), ("page_size", page_size),
                        ("kv_slots_per_instance", kv_slots_per_instance)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if kv_slots_per_instance < page_size:
            raise ValueError(f"kv_slots_per_instance ({kv_slots_per_instance}) is less than one "
                             f"page ({page_size} tokens)")
        if not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
        self.num_instances = num_instances
        self.page_size = page_size
        self.pages_per_instance = kv_slots_per_instance // page_size
        self.kv_slots_per_instance = kv_slots_per_instance
        self.cost_model = cost_model
        self.policy = Policy(**policy)
        if self.policy.group_sizes is not None and min(self.policy.group_sizes) > num_instances:
            raise ValueError(f"policy group_sizes {self.policy.group_sizes!r} allow no group of "
                             f"at most the {num_instances} instances: no request could ever run")
        self._reqs: dict = {}
        self._queue: list = []          # queued _Req, kept in seq order
        self._decoding: dict = {}       # rid -> _Req (state decoding)
        self._used = [0] * num_instances          # pages in use per instance
        self._busy: dict = {}           # instance -> batch id
        self._running: dict = {}        # batch id -> (batch, predicted end)
        self._prefill_tail: dict = {}   # prefill batch id -> decode time after it ends until
                                        # one of its instances is empty (see _commit_prefill)
        self._comp_preempted: dict = {}  # frozenset(instances) -> consecutive preemptions
        self._solo_time: dict = {}      # (group size, tokens) -> prefill_time, memo
        self._wants: list = []          # (pages, gain) of prefills waiting for an instance
        self._wait = INF                # W of the last _defer_costs (step 3)
        self._tables: dict = {}         # (lengths, max instances) -> BatchTable, last few built
        self._seq = 0
        self._batch_id = 0
        self._iter = 0
        self.stats = {"iterations": 0, "prefill_batches": 0, "decode_batches": 0,
                      "prefilled_requests": 0, "decode_steps": 0, "migrations": 0,
                      "migrated_tokens": 0, "recompute_preemptions": 0,
                      "decode_preempted_for_prefill": 0, "scale_ups": 0, "finished": 0,
                      "released_instances": 0, "decode_merges": 0, "decode_waits": 0,
                      "deferred": 0, "consolidations": 0, "consolidation_waits": 0}

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, rid: Hashable, prompt_len: int, max_new_tokens: int,
                    arrival: float | None = None) -> None:
        """Queue a request. FCFS order is the order of add_request calls; `arrival` is kept
        for the caller (request_arrival) and does not reorder the queue."""
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise ValueError(f"rid must be an int or str, got {rid!r}")
        if rid in self._reqs:
            raise ValueError(f"request {rid!r} was already added")
        for name, v in (("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r} (request {rid!r})")
        peak = prompt_len + max_new_tokens - 1
        # A request spread over every instance wastes at most one partial page per instance.
        need = -(-peak // self.page_size) + self.num_instances - 1
        have = self.num_instances * self.pages_per_instance
        if need > have:
            raise ValueError(
                f"request {rid!r} can never fit: prompt_len {prompt_len} + max_new_tokens "
                f"{max_new_tokens} - 1 = {peak} KV tokens need {need} pages (with one page of "
                f"rounding per instance) but all {self.num_instances} instances hold {have} pages "
                f"of {self.page_size} tokens")
        gmax = max(g for g in self.policy.group_sizes or (self.num_instances,)
                   if g <= self.num_instances)  # (__init__ checked that one exists)
        if -(-peak // self.page_size) > gmax * self.pages_per_instance:
            raise ValueError(
                f"request {rid!r} can never fit: its prefill (recomputed: up to {peak} tokens) "
                f"needs {-(-peak // self.page_size)} pages but the largest allowed group "
                f"({gmax} instances) has {gmax * self.pages_per_instance}")
        r = _Req(rid, self._seq, prompt_len, max_new_tokens, arrival)
        self._seq += 1
        self._reqs[rid] = r
        self._queue.append(r)

    # ---- introspection ---------------------------------------------------------------------
    def idle_instances(self) -> list:
        return [i for i in range(self.num_instances) if i not in self._busy]

    def kv_used(self, instance: int) -> int:
        """KV slots in use on the instance (pages x page_size)."""
        return self._used[self._inst(instance)] * self.page_size

    def kv_free(self, instance: int) -> int:
        return (self.pages_per_instance - self._used[self._inst(instance)]) * self.page_size

    def placement(self, rid) -> dict:
        """{instance: KV tokens of the request held there}."""
        return dict(self._req(rid).ntok)

    def ranges(self, rid) -> dict:
        """{instance: [(start, end), ...]} global positions of the request held there."""
        return {i: [tuple(x) for x in rs] for i, rs in self._req(rid).ranges.items()}

    def request_arrival(self, rid):
        return self._req(rid).arrival

    def state(self, rid) -> str:
        return self._req(rid).state

    def generated(self, rid) -> int:
        return self._req(rid).generated

    def requests(self) -> list:
        return list(self._reqs)

    def running_batches(self) -> list:
        """Batches handed out and not yet reported done, with their predicted end times."""
        return [(b, end) for b, end in self._running.values()]

    def _req(self, rid) -> _Req:
        try:
            return self._reqs[rid]
        except (KeyError, TypeError):
            raise KeyError(f"unknown request {rid!r}") from None

    def _inst(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_instances:
            raise ValueError(f"instance must be an int in [0, {self.num_instances}), got {i!r}")
        return i

    # ---- KV books --------------------------------------------------------------------------
    def _pages(self, n: int) -> int:
        return -(-n // self.page_size)

    def _add_kv(self, r: _Req, inst: int, start: int, end: int) -> None:
        old = r.ntok.get(inst, 0)
        new = old + end - start
        self._used[inst] += self._pages(new) - self._pages(old)
        r.ntok[inst] = new
        rs = r.ranges.setdefault(inst, [])
        if rs and rs[-1][1] == start:
            rs[-1][1] = end
        else:
            rs.append([start, end])
        rs.sort()
        if rs[-1][1] > r.kv_len:
            r.kv_len = rs[-1][1]
        assert self._used[inst] <= self.pages_per_instance, "KV books over capacity"

    def _move_kv(self, r: _Req, src: int, dst: int) -> int:
        """Every token of r on src to dst; returns the tokens moved."""
        n = r.ntok.pop(src)
        self._used[src] -= self._pages(n)
        moved = r.ranges.pop(src)
        old = r.ntok.get(dst, 0)
        self._used[dst] += self._pages(old + n) - self._pages(old)
        r.ntok[dst] = old + n
        merged = sorted(r.ranges.get(dst, []) + moved)
        out = [merged[0]]
        for s, e in merged[1:]:
            if s == out[-1][1]:
                out[-1] = [out[-1][0], e]
            else:
                out.append([s, e])
        r.ranges[dst] = out
        assert self._used[dst] <= self.pages_per_instance, "KV books over capacity"
        return n

    def _free_kv(self, r: _Req) -> None:
        for inst, n in r.ntok.items():
            self._used[inst] -= self._pages(n)
        r.ntok, r.ranges, r.kv_len = {}, {}, 0

    def _room(self, r: _Req, inst: int) -> bool:
        """Can inst store r's next token (a free slot in r's last page there, or a free page)?"""
        return (r.ntok.get(inst, 0) % self.page_size != 0 or
                self._used[inst] < self.pages_per_instance)

    def _free_pages(self, inst: int) -> int:
        return self.pages_per_instance - self._used[inst]

    # ---- scheduling ------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> IterationPlan:
        """Plan the idle instances (see the module docstring). An empty plan means nothing can
        start until a running batch completes or a request arrives."""
        prefills, decodes, migrations, preemptions = self._plan(now)
        if preemptions and not (prefills or decodes):
            # Recompute freed KV while nothing else could start: plan the freed instances now
            # rather than hand back a plan with nothing to wait on.
            prefills, decodes, more_migrations, more_preemptions = self._plan(now)
            migrations += more_migrations
            preemptions += more_preemptions
        for b in prefills + decodes:
            for i in b.instances:
                self._busy[i] = b.batch_id
            self._running[b.batch_id] = (b, now + b.predicted_time)
        # migrate_kv runs the orders of one (src, dst) pair as one batch.
        per_pair: dict = {}
        for m in migrations:
            per_pair[(m.src, m.dst)] = per_pair.get((m.src, m.dst), 0) + m.end - m.start
        mig_time = sum(self.cost_model.migration_time(n) for n in per_pair.values())
        pred = max((b.predicted_time for b in prefills + decodes), default=0.0) + mig_time
        it = IterationPlan(self._iter, float(now), tuple(prefills), tuple(decodes),
                           tuple(migrations), tuple(preemptions), pred)
        self._iter += 1
        self.stats["iterations"] += 1
        return it

    def _plan(self, now: float):
        idle = [i for i in range(self.num_instances) if i not in self._busy]
        idle_set = set(idle)
        comps = self._decode_components(idle_set)
        migrations: list = []
        held: set = set()
        if self.policy.consolidate_decode and self._queue and comps and self._spread():
            comps, held = self._consolidate_decode(comps, migrations, now)
        comp_insts = set(held)
        for insts, _ in comps:
            comp_insts |= insts
        pool = [i for i in idle if i not in comp_insts]
        preemptions: list = []
        prefills: list = []
        claimed = set()
        self._wants = []
        if self._queue and idle:
            cands = self._dispatch()
            if cands:
                plan, pool, comps, kept = self._plan_prefill(cands, pool, comps, now)
                prefills = self._commit_prefill(plan, kept, now)
                if self.policy.migrate_for_prefill and any(len(c[0]) > 1 for c in comps):
                    self._wants = self._prefill_wants(cands, comps, now)
                for g in prefills:
                    claimed |= set(g.instances)
                    for i in g.instances:   # the second pass of schedule() must not reuse them
                        self._busy[i] = g.batch_id
        decodes: list = []
        free_idle = [i for i in idle if i not in claimed and i not in comp_insts]
        if self.policy.merge_decode and len(comps) > 1:
            comps = self._merge_short(comps)
        for insts, reqs in comps:
            b = self._plan_decode(insts, reqs, free_idle, migrations, preemptions)
            if b is not None:
                decodes.append(b)
        return prefills, decodes, migrations, preemptions

    def _merge_short(self, comps: list) -> list:
        """Merge each decode component short of pages for this step's new tokens with the one
        with the largest surplus that covers the shortfall (LoongServe merges a batch out of
        memory into one with room before scaling up onto idle instances). A request needs a
        page when its token count on its master fills its last page."""
        ps = self.page_size
        surplus = []
        for insts, reqs in comps:
            need = sum(1 for r in reqs if r.ntok.get(r.master, 0) % ps == 0)
            surplus.append(sum(self._free_pages(i) for i in insts) - need)
        merged = list(comps)
        taken = set()
        for a in range(len(comps)):
            if surplus[a] >= 0 or a in taken:
                continue
            best = max((b for b in range(len(comps)) if b != a and b not in taken and
                        surplus[b] >= -surplus[a]), key=lambda b: (surplus[b], -b), default=None)
            if best is None:
                continue
            taken |= {a, best}
            merged[a] = (comps[a][0] | comps[best][0], comps[a][1] + comps[best][1])
            merged[best] = None
            self.stats["decode_merges"] += 1
        return [c for c in merged if c is not None]

    def _consolidate_decode(self, comps: list, migrations: list, now: float):
        """Cross-batch decode consolidation (step 1b; LoongServe's
        _minimize_decoding_occupied_instances, done per component since batches here end at
        different times). With requests queued, a ready decode component C whose instances hold
        only its KV moves all of it onto one instance y of a larger decode batch T (more
        requests; ties: more pages, then the lower instance) when y has free pages for C's KV plus the remaining growth
        of C's requests and of the requests mastered on y, T and C together have at most
        `max_requests_per_master` requests (decode stays memory-bound: 1 request 8.2 ms, 128
        requests 14.6 ms a step on the shipped H100 profile), and the decode instance-time it
        saves, C's longest remaining output x (C's step time - what C adds to T's step), exceeds
        twice the migration time. C's instances, emptied, join this schedule()'s prefill pool.
        If the best such y is in a decode batch running now that ends within one of C's steps,
        C's requests skip this step (at most 2 in a row) and move when it is ready: batches end
        at different times, so two are rarely ready at once. The largest batch never moves and
        a move only goes to a larger one, so KV does not travel back and forth.
        Returns (components left to decode now, instances held by waiting components)."""
        pol = self.policy
        cap = pol.max_requests_per_master
        cm = self.cost_model
        # Targets: ready components and running decode batches, as
        # [instances, requests, index in comps or None, end time, received].
        targets = [[insts, reqs, k, now, False] for k, (insts, reqs) in enumerate(comps)]
        for b, end in self._running.values():
            if isinstance(b, DecodeBatch):
                targets.append([frozenset(b.instances), None, None, end, False])

        out = list(comps)
        held: set = set()
        order = sorted(range(len(comps)), key=lambda k: (len(comps[k][1]), min(comps[k][0])))
        for k in order:
            insts, reqs = comps[k]
            src = targets[k]
            if src[4] or out[k] is None or len(reqs) >= cap or any(
                    r.waits >= 2 for r in reqs):
                continue
            pages_c = self._kv_pages(reqs)
            if pages_c != sum(self._used[i] for i in insts):
                continue            # other requests' KV is there too: nothing would empty
            if len(migrations) + self._orders(reqs) > pol.max_migrations:
                continue
            need = sum(self._pages(r.kv_len + r.remaining) for r in reqs)
            kv_c = sum(r.kv_len for r in reqs)
            key_c = (len(reqs), pages_c, -min(insts))
            best = None
            for t_idx, t in enumerate(targets):
                if t_idx == k or (t[2] is not None and out[t[2]] is None):
                    continue
                if t[1] is None:    # a running batch: its requests, once
                    b = self._running_batch_at(t)
                    t[1] = [self._reqs[rid] for rid in b.requests
                            if self._reqs[rid].state == "decoding"]
                t_reqs = t[1]
                if len(t_reqs) + len(reqs) > cap:
                    continue
                key_t = (len(t_reqs), sum(self._used[i] for i in t[0]), -min(t[0]))
                if key_t <= key_c:
                    continue
                ready = t[2] is not None
                if not ready and t[3] - now > cm._decode(len(reqs), kv_c, len(insts),
                                                         len(insts)):
                    continue
                for y in t[0]:
                    if y in insts:
                        continue
                    reserve = 0
                    for r in t_reqs:
                        if r.master == y:
                            n = r.ntok.get(y, 0)
                            reserve += self._pages(n + r.remaining) - self._pages(n)
                    if self._free_pages(y) - reserve < need:
                        continue
                    rank = (ready, self._used[y], -y)
                    if best is None or rank > best[0]:
                        best = (rank, t_idx, y)
            if best is None:
                continue
            _, t_idx, y = best
            t = targets[t_idx]
            t_reqs = t[1]
            kv_t = sum(r.kv_len for r in t_reqs)
            step_c = cm._decode(len(reqs), kv_c, len(insts), len(insts))
            step_t = cm._decode(len(t_reqs), kv_t, len(t[0]), len(t[0]))
            step_m = cm._decode(len(t_reqs) + len(reqs), kv_t + kv_c, len(t[0]), len(t[0]))
            wait = max(0.0, t[3] - now)
            saved = max(r.remaining for r in reqs) * (step_c - (step_m - step_t))
            if saved <= 2 * cm.migration_time(kv_c) + wait:
                continue
            if t[2] is None:        # the target is decoding now: wait for it
                for r in reqs:
                    r.waits += 1
                self.stats["consolidation_waits"] += len(reqs)
                held |= insts
                out[k] = None
                continue
            for r in reqs:
                for i in sorted(r.ntok):
                    self._migrate(r, i, y, migrations)
                r.master = y
            assert all(self._used[i] == 0 for i in insts)
            ti = t[2]
            out[ti] = (out[ti][0], out[ti][1] + list(reqs))
            t[1] = out[ti][1]
            t[4] = True
            out[k] = None
            self.stats["consolidations"] += 1
        return [c for c in out if c is not None], held

    def _spread(self) -> bool:
        """Does decode KV sit on more instances than it needs (LoongServe's test before it
        consolidates): instances holding KV > max(decoding requests / max_requests_per_master,
        pages in use / pages per instance), rounded up? ShareGPT at 270 req/s (~1,300 requests
        decoding, all 8 instances needed at 128 each) consolidated 42 times and waited 326
        request-steps for it without this, attainment 0.90 -> 0.83."""
        need = max(-(-len(self._decoding) // self.policy.max_requests_per_master),
                   -(-sum(self._used) // self.pages_per_instance))
        return sum(1 for u in self._used if u) > need

    def _running_batch_at(self, target):
        for b, end in self._running.values():
            if isinstance(b, DecodeBatch) and frozenset(b.instances) == target[0]:
                return b
        raise AssertionError("consolidation target batch not running")

    def _prefill_wants(self, cands: list, comps: list, now: float) -> list:
        """[(pages, gain)] of the candidates left queued: gain = their defer cost less their
        cost on one instance now (what freeing an instance would be worth to each)."""
        left = [r for r in cands if r.state == "queued"]
        wants = []
        for r, d in zip(left, self._defer_costs(left, now, comps)):
            L = r.prefill_len
            if d == INF:
                d = 1e12 / L
            t1 = self._solo_time.get((1, L))
            if t1 is None:
                t1 = self._solo_time[(1, L)] = self.cost_model.prefill_time(1, [L])
            if d - t1 / L > 0:
                wants.append((self._pages(L), d - t1 / L))
        return wants

    def _decode_components(self, idle_set: set) -> list:
        """[(instances frozenset, [requests])]: ready decoding requests grouped by shared
        instances (union-find over the instances of multi-instance requests), in order of
        their smallest instance; within one, single-instance requests by instance, then the
        others."""
        by_inst: dict = {}      # instance -> ready requests held only there
        multi = []
        parent: dict = {}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for r in self._decoding.values():
            if r.batch is not None:
                continue
            nt = r.ntok
            if len(nt) == 1:
                for i in nt:
                    if i in idle_set:
                        lst = by_inst.get(i)
                        if lst is None:
                            by_inst[i] = [r]
                        else:
                            lst.append(r)
            elif idle_set.issuperset(nt):
                multi.append(r)
                roots = []
                for i in nt:
                    parent.setdefault(i, i)
                    roots.append(find(i))
                low = min(roots)
                for x in roots:
                    parent[x] = low
        for i in by_inst:
            parent.setdefault(i, i)
        comps: dict = {}        # root -> (instances, requests)
        for i in sorted(parent):
            root = find(i)
            entry = comps.get(root)
            if entry is None:
                entry = comps[root] = (set(), [])
            entry[0].add(i)
            if i in by_inst:
                entry[1].extend(by_inst[i])
        for r in multi:
            comps[find(next(iter(r.ntok)))][1].append(r)
        return [(frozenset(insts), reqs) for _, (insts, reqs) in sorted(comps.items())]

    def _dispatch(self) -> list:
        """Prefill candidates in FCFS order (see step 2 of the module docstring)."""
        pol = self.policy
        cap_tokens = pol.admission_ratio * self.num_instances * self.pages_per_instance * \
            self.page_size
        alive = [(r.kv_len, r.max_new - r.generated - 1) for r in self._decoding.values()]
        for b, _ in self._running.values():
            if isinstance(b, PrefillGroup):
                for rid in b.requests:
                    r = self._reqs[rid]
                    if r.state == "prefilling":
                        alive.append((r.prefill_len, r.remaining - 1))
        total = sum(h + left for h, left in alive)
        cands, tokens = [], 0
        for r in self._queue:
            if len(cands) >= pol.max_prefill_candidates:
                break
            h, left = r.prefill_len, r.remaining - 1
            ok = pol.max_prefill_tokens is None or tokens + h <= pol.max_prefill_tokens or not cands
            if ok and pol.admission and alive:
                # One page of rounding per request; the exact peak only when the sum of every
                # request's final KV (an upper bound on it) does not fit.
                reserve = self.page_size * (len(alive) + 1)
                if total + h + left + reserve > cap_tokens:
                    ok = _peak_kv(alive + [(h, left)]) + reserve <= cap_tokens
            if ok:
                cands.append(r)
                alive.append((h, left))
                total += h + left
                tokens += h
            elif r.overtaken >= pol.max_out_of_order:
                break        # pinned: nothing behind it may overtake it
        return cands

    def _defer_costs(self, cands: list, now: float, comps: list) -> list:
        """Cost of leaving each candidate queued (see step 3); inf for pinned candidates.
        Sets self._wait: W (inf when nothing running or ready, or defer off)."""
        pol = self.policy
        cm = self.cost_model
        # When do more instances free up? A prefill group: when it ends. Decoding instances:
        # when their longest request has generated its last token (max_new_tokens bounds it;
        # LoongServe estimates the same from output lengths), at the batch's step time.
        waits = []
        for b, end in self._running.values():
            w = end - now
            if isinstance(b, DecodeBatch):
                w += b.predicted_time * max(self._reqs[rid].max_new - self._reqs[rid].generated
                                            - 1 for rid in b.requests)
            else:
                w += self._prefill_tail.get(b.batch_id, 0.0)
            waits.append(w)
        for insts, reqs in comps:
            step = cm._decode(len(reqs), sum(r.kv_len for r in reqs), len(insts), len(insts))
            waits.append(step * max(r.max_new - r.generated for r in reqs))
        wait = max(0.0, min(waits)) if pol.defer and waits else INF
        self._wait = wait
        best_g = max((g for g in pol.group_sizes or (self.num_instances,)
                      if g <= self.num_instances), default=1)
        if wait < INF:
            memo = self._solo_time       # a queued request is priced at every schedule()
            lens = {r.prefill_len for r in cands}
            miss = sorted(L for L in lens if (best_g, L) not in memo)
            if len(memo) + len(miss) > 1 << 16:
                memo.clear()
                miss = sorted(lens)
            if miss:
                m = np.array(miss, dtype=np.float64)
                t = self.cost_model.prefill_time_array(np.full_like(m, best_g), np.ones_like(m),
                                                       m, m * m)
                memo.update({(best_g, L): float(x) for L, x in zip(miss, t)})
        costs = []
        for r in cands:
            if r.overtaken >= pol.max_out_of_order:
                costs.append(INF)
            elif wait == INF:
                # Nothing running (or deferring off): waiting gains nothing; a huge finite cost
                # still lets the DP defer what cannot fit now.
                costs.append(1e12 / r.prefill_len)
            else:
                costs.append((wait + self._solo_time[(best_g, r.prefill_len)]) / r.prefill_len)
        return costs

    def _solve(self, cands, pool, defer, table=None):
        if table is None:
            table = self._table(cands, len(pool))
        return solve_table(table, [self._free_pages(i) for i in pool], defer)

    def _table(self, cands, max_instances):
        # A table depends only on the candidates' lengths and the largest pool: between two
        # decode steps the queue rarely changes, so recent ones are reused (10k ShareGPT
        # requests in the simulator rebuilt it on ~55% of 456k schedule() calls otherwise). A
        # few, not one: the out-of-order bisection builds a second table for a prefix of the
        # candidates, which evicted the full one every call (2k requests: 9.1 -> 6.6 s).
        key = (tuple(r.prefill_len for r in cands), max_instances)
        table = self._tables.pop(key, None)
        if table is None:
            table = BatchTable(self.cost_model, list(key[0]), self.page_size, max_instances,
                               self.policy.group_sizes, self.policy.max_prefill_time)
            if len(self._tables) >= 4:
                del self._tables[next(iter(self._tables))]   # the least recently used
        self._tables[key] = table
        return table

    def _solve_pinned(self, cands: list, pool: list, now: float, max_instances: int,
                      comps: list):
        """DP under the out-of-order bound: a pinned candidate (overtaken max_out_of_order
        times) may be deferred only if every later candidate is too. So the candidates are cut
        at the first deferred pinned one: the pinned before the cut must run (inf defer cost),
        nothing from the cut on runs. The largest feasible cut is found by bisection
        (feasibility only shrinks as the cut grows: more forced requests, same pool).
        Returns (result, candidates kept, their defer costs, their BatchTable, uncut) where
        uncut is None, or (every candidate, defer costs, BatchTable) when a pinned one was cut:
        then preemption may still run it (_plan_prefill)."""
        defer_all = self._defer_costs(cands, now, comps)
        pinned = [k for k, d in enumerate(defer_all) if d == INF]
        table = self._table(cands, max_instances)
        res = self._solve(cands, pool, defer_all, table)
        if res.cost < INF or not pinned:
            return res, cands, defer_all, table, None
        lo, hi = 0, len(pinned) - 1       # cut at pinned[lo] is feasible (nothing forced)
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            c = pinned[mid]
            sub = self._table(cands[:c], max_instances)
            trial = self._solve(cands[:c], pool, defer_all[:c], sub)
            if trial.cost < INF:
                best = (trial, cands[:c], defer_all[:c], sub, (cands, defer_all, table))
                lo = mid + 1
            else:
                hi = mid - 1
        return best

    def _plan_prefill(self, cands: list, pool: list, comps: list, now: float):
        """Run the DP on the pool, then try adding decode components (preemption)."""
        pol = self.policy
        tried = []
        if pol.preempt_decode:
            tried = sorted(comps, key=lambda c: (len(c[1]), min(c[0])))
            tried = [c for c in tried if self._comp_preempted.get(c[0], 0) <
                     pol.max_decode_preemptions][: pol.preempt_max_components]
        # The table covers the largest pool any trial can reach.
        max_instances = len(pool) + sum(len(c[0]) for c in tried)
        res, cands, defer, table, uncut = self._solve_pinned(cands, pool, now, max_instances,
                                                             comps)
        if tried and (res.deferred or res.cost == INF or uncut):
            # No trial can beat res.cost if the slowdown alone, at the shortest time any
            # feasible batch can take, does not (skips the DP for long-running decodes).
            finite = np.isfinite(table.C) if table.G and table.n else None
            t_min = float(table.T[finite].min()) if finite is not None and finite.any() else 0.0
            held = []       # components tried for a pinned candidate, not yet enough
            free_soon = None    # when a running prefill group frees its instances
            for comp in tried:
                if uncut is not None:
                    # A pinned candidate was cut: nothing behind it runs until it does. Without
                    # trying decode components here, a pinned request at the head of the queue
                    # waited until some instance held no KV at all: ShareGPT at 80 req/s, 99% of
                    # schedule() calls cut every candidate, TTFT p50 38 s (TPOT 9 ms). A pool
                    # that runs it is taken unless waiting adds less latency in total: W (step 3)
                    # x the cut candidates < the prefill's time x the decode requests it stalls
                    # x preempt_weight. Taking it whatever the slowdown stalled consolidated
                    # decode batches (20-30 requests) behind every pinned L-Eval prompt although
                    # running prefills free instances within ~0.3 s: 20 req/s, TPOT misses 25%,
                    # attainment 0.75 (with this rule: 1.0). Pricing it like an unpinned
                    # preemption instead (per-token costs) cost ShareGPT at 270 req/s 0.90 -> 0.77.
                    all_c, all_d, all_t = uncut
                    trial_pool = pool + sorted(set().union(*(c[0] for c in held), comp[0]))
                    trial = self._solve(all_c, trial_pool, all_d, all_t)
                    if trial.cost == INF:
                        held.append(comp)
                        continue
                    used = {trial_pool[k] for _, insts, _ in trial.batches for k in insts}
                    t_pf = max((t for _, _, t in trial.batches), default=0.0)
                    stalled = sum(len(c[1]) for c in held + [comp] if used & c[0])
                    if free_soon is None:
                        free_soon = min((end - now for b, end in self._running.values()
                                         if isinstance(b, PrefillGroup) and
                                         b.batch_id not in self._prefill_tail), default=INF)
                    if free_soon * (len(all_c) - len(cands)) < \
                            pol.preempt_weight * t_pf * stalled:
                        held.append(comp)
                        continue
                    res, pool, cands, defer, table, uncut = (trial, trial_pool, all_c, all_d,
                                                             all_t, None)
                    for c in held + [comp]:
                        if used & c[0]:
                            comps = [x for x in comps if x is not c]
                            self._comp_preempted[c[0]] = self._comp_preempted.get(c[0], 0) + 1
                            self.stats["decode_preempted_for_prefill"] += len(c[1])
                    held = []
                    continue
                if pol.preempt_weight * t_min * _inv_output(comp[1]) >= res.cost:
                    continue
                trial_pool = pool + sorted(comp[0])
                trial = self._solve(cands, trial_pool, defer, table)
                if trial.cost == INF:
                    continue
                t_pf = max((t for _, _, t in trial.batches), default=0.0)
                penalty = pol.preempt_weight * t_pf * _inv_output(comp[1])
                used = {trial_pool[k] for _, insts, _ in trial.batches for k in insts}
                if not used & comp[0]:
                    continue
                if trial.cost + penalty < res.cost:
                    res, pool = trial, trial_pool
                    comps = [c for c in comps if c is not comp]
                    self._comp_preempted[comp[0]] = self._comp_preempted.get(comp[0], 0) + 1
                    self.stats["decode_preempted_for_prefill"] += len(comp[1])
        for insts, _ in comps:
            self._comp_preempted.pop(insts, None)
        # Components that overlap instances the prefill took must skip this iteration.
        taken = {pool[k] for _, insts, _ in res.batches for k in insts}
        comps = [c for c in comps if not (c[0] & taken)]
        return (res, pool), pool, comps, cands

    def _commit_prefill(self, plan, cands: list, now: float) -> list:
        (res, pool) = plan
        if res.cost == INF:
            return []
        groups = []
        scheduled = set()
        for req_idx, inst_idx, t in res.batches:
            reqs = [cands[x] for x in req_idx]
            insts = sorted(pool[k] for k in inst_idx)
            retention = self._retain(reqs, insts)
            bid = self._next_batch_id()
            for r in reqs:
                r.state = "prefilling"
                r.batch = bid
                scheduled.add(r.seq)
            groups.append(PrefillGroup(bid, tuple(insts), tuple(r.rid for r in reqs),
                                       tuple(r.prefill_len for r in reqs), retention, t))
            # When does this group free an instance for the next prefill? Not at its end when
            # every member keeps KV: its requests decode there until the longest one is done.
            # (Counting the end alone made waiting for "a free group of G instances" look
            # ~40 ms away while every instance decoded for seconds: the DP deferred short
            # prompts and, on ShareGPT at 40 req/s, TTFT p50 was 27 s with TPOT 9 ms.)
            # With consolidation (step 1b) the group's KV moves to a decode instance with room
            # when it ends (if one exists now), emptying its instances: no tail then.
            kept = {i for parts in retention for i, _, _ in parts}
            if all(i in kept or self._used[i] for i in insts) and not (
                    self.policy.consolidate_decode and self._spread() and
                    self._absorbable(reqs, insts)):
                step = self.cost_model._decode(len(reqs), sum(r.prefill_len for r in reqs),
                                               len(kept), len(kept))
                self._prefill_tail[bid] = step * max(r.remaining - 1 for r in reqs)
            self.stats["prefill_batches"] += 1
            self.stats["prefilled_requests"] += len(reqs)
        if scheduled:
            last = max(scheduled)
            q = self._queue
            k = 0
            while k < len(q) and q[k].seq <= last:   # the queue is in seq order
                if q[k].seq not in scheduled:
                    q[k].overtaken += 1
                k += 1
            self._queue = [r for r in q[:k] if r.seq not in scheduled] + q[k:]
        self.stats["deferred"] += len(res.deferred)
        return groups

    def _absorbable(self, reqs: list, insts: list) -> bool:
        """Would step 1b move this prefill group's KV away when it ends (as far as can be told
        now): its instances hold only its KV, its orders fit max_migrations, and an instance
        outside `insts` that masters decoding requests has room for them (KV, growth, and the
        growth of its own requests) within max_requests_per_master? (The tail estimate of
        _commit_prefill.)"""
        cap = self.policy.max_requests_per_master
        if self._orders(reqs) > self.policy.max_migrations:
            return False
        if self._kv_pages(reqs) != sum(self._used[i] for i in insts):
            return False        # other KV stays there: the group's instances do not empty
        count: dict = {}
        reserve: dict = {}
        for r in self._decoding.values():
            m = r.master
            count[m] = count.get(m, 0) + 1
            n = r.ntok.get(m, 0)
            reserve[m] = reserve.get(m, 0) + self._pages(n + r.remaining) - self._pages(n)
        need = sum(self._pages(r.prefill_len + r.remaining) for r in reqs)
        return any(count[y] + len(reqs) <= cap and
                   self._free_pages(y) - reserve[y] >= need
                   for y in count if y not in insts)

    def _kv_pages(self, reqs: list) -> int:
        """Pages the requests' KV takes, summed over its instances."""
        return sum(self._pages(n) for r in reqs for n in r.ntok.values())

    @staticmethod
    def _orders(reqs: list) -> int:
        """Migration orders that moving all of the requests' KV takes (one per held range)."""
        return sum(len(rs) for r in reqs for rs in r.ranges.values())

    def _retain(self, reqs: list, insts: list) -> tuple:
        """Fill-first retention of the batch's KV over the ring members (step 5)."""
        if self.policy.retention_order == "fewest":
            order = sorted(insts, key=lambda i: (-self._free_pages(i), i))
        else:
            order = sorted(insts, key=lambda i: (self._free_pages(i), i))
        out = []
        ps = self.page_size
        for r in reqs:
            L, start, parts = r.prefill_len, 0, []
            for inst in order:
                if start >= L:
                    break
                room = self._free_pages(inst) * ps
                take = min(L - start, room)
                if take <= 0:
                    continue
                self._add_kv(r, inst, start, start + take)
                parts.append((inst, start, start + take))
                start += take
            if start < L:   # the DP checked the pages: unreachable unless the books are wrong
                raise AssertionError(f"retention of request {r.rid!r} overflowed its group")
            r.master = parts[-1][0]
            out.append(tuple(parts))
        return tuple(out)

    def _next_batch_id(self) -> int:
        self._batch_id += 1
        return self._batch_id - 1

    def _plan_decode(self, insts: frozenset, reqs: list, free_idle: list, migrations: list,
                     preemptions: list):
        """One decode batch for a component (step 6); None if every request was preempted."""
        pol = self.policy
        cap = pol.max_requests_per_master
        M = min(len(insts), -(-len(reqs) // cap))
        if M == 1 and len(insts) == 1:
            (m,) = insts
            for r in reqs:
                r.master = m
        else:
            self._assign_masters(insts, reqs, M, cap)
        if pol.migrate_consolidate:
            for r in reqs:
                if len(r.ntok) > 1 and len(migrations) < pol.max_migrations:
                    self._consolidate(r, migrations)
        if self._wants and len(insts) > 1:
            freed = self._release(insts, reqs, migrations)
            if freed is not None:
                insts = insts - {freed}     # not a scale-up target: it stays empty
        # Appends. Fast path: every master has room (no scale-up, no recompute needed).
        ps, cap_pages, used_pages = self.page_size, self.pages_per_instance, self._used
        shards_l, kv_total, done = [], 0, 0
        for r in reqs:
            nt = r.ntok
            sh = tuple(nt.items()) if len(nt) == 1 else tuple(sorted(nt.items()))
            m = r.master
            n = nt.get(m, 0)
            if n % ps:                       # room in its last page on the master
                pass
            elif used_pages[m] < cap_pages:  # a free page on the master
                used_pages[m] += 1
            else:
                break
            nt[m] = n + 1                    # _append, inlined: 256 requests per schedule()
            pos = r.kv_len
            rs = r.ranges.get(m)
            if rs is None:
                r.ranges[m] = [[pos, pos + 1]]
            elif rs[-1][1] == pos:
                rs[-1][1] = pos + 1
            else:
                rs.append([pos, pos + 1])
            r.kv_len = pos + 1
            kv_total += pos + 1
            shards_l.append(sh)
            done += 1
        if done == len(reqs):
            live = reqs
            targets_l = [r.master for r in reqs]
        else:
            live, shards_l, targets_l = self._append_slow(reqs, done, shards_l, insts, free_idle,
                                                          preemptions)
            if not live:
                return None
            kv_total = sum(r.kv_len for r in live)
        holders = {i for sh in shards_l for i, _ in sh}
        masters_l = [r.master for r in live]
        used = holders.union(masters_l, targets_l)
        pred = self.cost_model._decode(len(live), kv_total, len(holders), len(set(masters_l)))
        bid = self._next_batch_id()
        for r in live:
            r.batch = bid
        self.stats["decode_batches"] += 1
        return DecodeBatch(bid, tuple(sorted(used)), tuple([r.rid for r in live]),
                           tuple(masters_l), tuple(shards_l), tuple(targets_l), pred)

    def _append_slow(self, reqs: list, done: int, shards_l: list, insts, free_idle: list,
                     preemptions: list):
        """Appends from reqs[done] on when some master is full: scale-up; else, with
        merge_decode, wait a step if some instance outside the batch has free pages; else
        recompute the newest request and retry. Returns (live requests, their shards, their
        append targets)."""
        pol = self.policy
        live = list(reqs)
        shards = {r.rid: sh for r, sh in zip(reqs, shards_l)}
        targets = {r.rid: r.master for r in reqs[:done]}
        while True:
            ok = True
            for r in live:
                if r.rid in targets:
                    continue
                shards[r.rid] = tuple(sorted(r.ntok.items()))
                t = r.master if self._room(r, r.master) else None
                if t is None and pol.scale_up:
                    t = self._scale_up_target(r, insts, free_idle)
                    if t is not None and t not in insts:
                        insts = insts | {t}
                if t is None:
                    ok = False
                    break
                self._append(r, t)
                targets[r.rid] = t
            if ok:
                break
            if pol.merge_decode and any(self._used[i] < self.pages_per_instance
                                        for i in range(self.num_instances)
                                        if i not in insts and i not in free_idle):
                # Room exists on instances busy now or in other decode batches (idle free ones
                # were tried by scale-up): r skips this step and merges with them when both
                # are ready, rather than be recomputed.
                live.remove(r)
                self.stats["decode_waits"] += 1
                if not live:
                    return [], [], []
                continue
            if not pol.recompute:
                raise MemoryError(f"decode: no instance has room for the next token of request "
                                  f"{r.rid!r} and recompute is off")
            # The newest request whose KV frees room where r needs it.
            pool = live if pol.scale_up else [x for x in live if r.master in x.ntok] or live
            victim = max(pool, key=lambda x: x.seq)
            self._preempt(victim, targets)
            preemptions.append(victim.rid)
            live.remove(victim)
            if not live:
                return [], [], []
        return live, [shards[r.rid] for r in live], [targets[r.rid] for r in live]

    def _assign_masters(self, insts, reqs: list, M: int, cap: int) -> None:
        """M masters in used-token order; a request keeps its master if chosen and not full,
        else the chosen master holding most of its KV, else the least loaded (step 6)."""
        masters = sorted(insts, key=lambda i: (self._used[i], i))[:M]
        load = {m: 0 for m in masters}
        rest = []
        for r in reqs:
            if r.master in load and load[r.master] < cap:
                load[r.master] += 1
            else:
                rest.append(r)
        for r in rest:
            hold = [m for m in masters if r.ntok.get(m, 0) and load[m] < cap]
            m = max(hold, key=lambda m: (r.ntok[m], -m)) if hold else min(
                masters, key=lambda m: (load[m], m))
            r.master = m
            load[m] += 1

    def _scale_up_target(self, r: _Req, insts, free_idle: list):
        """Where r's next token goes when its master is full: the batch's instance with the most
        free pages, else an unclaimed idle one (taken out of free_idle); None if none has room."""
        cands = [i for i in insts if self._room(r, i)]
        if not cands:
            cands = [i for i in free_idle if self._room(r, i)]
        if not cands:
            return None
        t = max(cands, key=lambda i: (self._free_pages(i), -i))
        if t in free_idle:
            free_idle.remove(t)
        self.stats["scale_ups"] += 1
        return t

    def _append(self, r: _Req, inst: int) -> None:
        """Reserve r's next token (position kv_len) on inst."""
        n = r.ntok.get(inst, 0)
        if n % self.page_size == 0:
            self._used[inst] += 1
            assert self._used[inst] <= self.pages_per_instance, "KV books over capacity"
        r.ntok[inst] = n + 1
        pos = r.kv_len
        rs = r.ranges.get(inst)
        if rs is None:
            r.ranges[inst] = [[pos, pos + 1]]
        elif rs[-1][1] == pos:
            rs[-1][1] = pos + 1
        else:
            rs.append([pos, pos + 1])
        r.kv_len = pos + 1

    def _release(self, insts, reqs: list, migrations: list):
        """Free one instance of this component for a queued prefill (`migrate_for_prefill`):
        the non-master instance holding the fewest pages, if only this component's requests
        hold KV there, each request's tokens there fit one other instance of the component
        (plus the request's remaining growth if that instance is its master), and the
        migration pays: migration_time x Σ 1/max_new over the component's requests x
        preempt_weight (the decode slowdown, as for preemption) < the gains of the queued
        candidates that fit the freed instance. At most one instance per schedule(). Returns
        the freed instance or None."""
        pol = self.policy
        masters = {r.master for r in reqs}
        # Not an instance that received KV in this schedule() (cross-batch consolidation): its
        # tokens would travel twice, src -> x -> dst, in one plan.
        received = {o.dst for o in migrations}
        spare = sorted((self._used[i], i) for i in insts
                       if i not in masters and i not in received and self._used[i])
        if not spare:
            return None
        x = spare[0][1]
        on_x = [r for r in reqs if x in r.ntok]
        if sum(self._pages(r.ntok[x]) for r in on_x) != self._used[x]:
            return None                 # other requests' KV is there too
        if len(migrations) + sum(len(r.ranges[x]) for r in on_x) > pol.max_migrations:
            return None
        free = {i: self._free_pages(i) for i in insts if i != x}
        moves, tokens = [], 0
        for r in on_x:
            n = r.ntok[x]
            best = None
            for i in sorted(free, key=lambda i: (-free[i], i)):
                old = r.ntok.get(i, 0)
                grow = r.remaining - 1 if i == r.master else 0
                need = self._pages(old + n + grow) - self._pages(old)
                if need <= free[i]:
                    best = (i, self._pages(old + n) - self._pages(old))
                    break
            if best is None:
                return None
            free[best[0]] -= best[1]
            moves.append((r, best[0]))
            tokens += n
        gain = sum(g for pages, g in self._wants if pages <= self.pages_per_instance)
        slowdown = pol.preempt_weight * self.cost_model.migration_time(tokens) * _inv_output(reqs)
        if slowdown >= gain:
            return None
        for r, dst in moves:
            self._migrate(r, x, dst, migrations)
        self.stats["released_instances"] += 1
        self._wants = []
        return x

    def _consolidate(self, r: _Req, migrations: list) -> None:
        m = r.master
        others = [(i, n) for i, n in sorted(r.ntok.items()) if i != m]
        moved = sum(n for _, n in others)
        growth = r.remaining - 1
        old = r.ntok.get(m, 0)
        need = self._pages(old + moved + growth) - self._pages(old)
        if need > self._free_pages(m):
            return
        cm = self.cost_model
        steps = max(0, r.remaining - 1)
        gain = steps * (cm._decode(1, r.kv_len, len(r.ntok), 1) - cm._decode(1, r.kv_len, 1, 1))
        if cm.migration_time(moved) >= gain:
            return
        if len(migrations) + sum(len(r.ranges[i]) for i, _ in others) > \
                self.policy.max_migrations:
            return
        for i, _ in others:
            self._migrate(r, i, m, migrations)

    def _migrate(self, r: _Req, src: int, dst: int, migrations: list) -> None:
        """Move every token of r on src to dst: one order per contiguous range held there (so
        end - start is what moves)."""
        for a, b in r.ranges[src]:
            migrations.append(MigrationOrder(r.rid, a, b, src, dst))
            self.stats["migrations"] += 1
        self.stats["migrated_tokens"] += self._move_kv(r, src, dst)

    def _preempt(self, r: _Req, targets: dict) -> None:
        """Recompute: free r's KV everywhere and requeue it at its FCFS place."""
        if r.rid in targets:
            del targets[r.rid]
        self._free_kv(r)
        self._decoding.pop(r.rid, None)
        r.state = "queued"
        r.master = None
        r.batch = None
        r.preempted += 1
        self._queue.append(r)
        self._queue.sort(key=lambda x: x.seq)
        self.stats["recompute_preemptions"] += 1

    # ---- completion ------------------------------------------------------------------------
    def update(self, done, finished: Iterable = (), now: float | None = None) -> None:
        """Report completed work: an IterationPlan (all its batches done) or one PrefillGroup /
        DecodeBatch; `finished`: rids that stopped early (EOS), whose KV is freed."""
        if isinstance(done, IterationPlan):
            batches = list(done.batches)
        elif isinstance(done, (PrefillGroup, DecodeBatch)):
            batches = [done]
        else:
            raise TypeError(f"update: done must be an IterationPlan, PrefillGroup or DecodeBatch, "
                            f"got {type(done).__name__}")
        for b in batches:
            if b.batch_id not in self._running:
                raise ValueError(f"update: batch {b.batch_id} is not running (never scheduled or "
                                 "already reported)")
        for b in batches:
            del self._running[b.batch_id]
            self._prefill_tail.pop(b.batch_id, None)
            for i in b.instances:
                if self._busy.get(i) == b.batch_id:
                    del self._busy[i]
            for rid in b.requests:
                r = self._reqs[rid]
                if r.batch != b.batch_id or r.state == "finished":
                    continue
                r.batch = None
                r.generated += 1
                if isinstance(b, DecodeBatch):
                    self.stats["decode_steps"] += 1
                    r.waits = 0
                if r.generated >= r.max_new:
                    self._finish(r)
                elif r.state == "prefilling":
                    r.state = "decoding"
                    self._decoding[rid] = r
        for rid in finished:
            r = self._req(rid)
            if r.state != "finished":
                if r.state == "queued":
                    self._queue.remove(r)
                self._finish(r)

    def _finish(self, r: _Req) -> None:
        self._free_kv(r)
        self._decoding.pop(r.rid, None)
        r.state = "finished"
        r.batch = None
        self.stats["finished"] += 1


def _inv_output(reqs) -> float:
    """Σ 1/max_new_tokens: what delaying each of these decoding requests' next step by 1 s adds
    to the sum of their output-token latencies, (finish - arrival) / output tokens. LoongServe
    divides by the tokens generated so far (it does not know the output length); here the rest
    of the policy already takes max_new_tokens as the output length (W, admission), and 1 /
    generated made a request that had just produced its first token weigh as much as the whole
    prefill: ShareGPT at 320 req/s (with the pinned and W fixes) attained 0.27 with it, 0.51
    with this. With EOS before max_new_tokens this underestimates the slowdown."""
    return sum(1.0 / r.max_new for r in reqs)


def _peak_kv(alive: Sequence[tuple]) -> int:
    """Peak KV tokens if every (held, remaining) request runs to its end: sorted by remaining
    descending, max over k of Σ_{i<=k} held_i + remaining_k · (k + 1) (LoongServe)."""
    peak, cum = 0, 0
    for k, (h, left) in enumerate(sorted(alive, key=lambda x: -x[1])):
        cum += h
        v = cum + left * (k + 1)
        if v > peak:
            peak = v
    return peak
