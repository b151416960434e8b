"""Baseline policies: static SP groups, chunked prefill (SplitFuse) on TP replicas, and
prefill/decode disaggregation (DistServe). All take their times from the CostModel only.

Common to all: N instances are cut into fixed replicas of `t` consecutive instances; a replica
runs one iteration at a time (continuous batching). A vLLM-style block manager per replica: KV in
16-token pages, a request's whole (re)prefill is reserved when it is admitted (vLLM v0's
can_allocate), decode steps add a page when the last one is full, and when a decode step does not
fit the most recently admitted request is preempted (KV freed, requeued at the front of the waiting
queue, recomputed later over its prompt plus the tokens it already generated: vLLM's recompute
preemption). Admission keeps 1% of the capacity free (vLLM's watermark) and at most 256 requests
per replica (vLLM's max_num_seqs). Arrivals go to the replica with the least (reserved + queued)
tokens relative to its capacity.

Time of a tensor-parallel (TP) replica of t GPUs: the CostModel has no TP entry, so a TP-t
iteration is priced as the cost model's SP-t iteration (prefill_time(t, ...) and
decode_time(kv, group_size=t, num_masters=t)): both split the dense FLOPs and the attention work
evenly over the t GPUs. TP's two all-reduces per layer are not charged, which favours the
baselines. Capacity of a TP-t replica: t GPUs' memory minus one copy of the weights.

Token semantics (same as the scheduler spec): a prefill over n tokens leaves n KV tokens and
generates one token; a decode step appends one KV token and generates one token.
"""

from __future__ import annotations

from collections import deque

from .engine import Launch, Policy, kv_capacity_tokens

__all__ = ["StaticSPPolicy", "ChunkedPrefillPolicy", "DisaggregatedPolicy", "CHUNK_SIZES"]

PAGE = 16
WATERMARK = 0.01
MAX_SEQS = 256

# Chunk sizes LoongServe tuned for its chunked-prefill baseline (arXiv 2404.09526 §6): per dataset.
# The Zipf ablation mixes all three datasets, so it takes Mixed's size (an assumption).
CHUNK_SIZES = {"sharegpt": 256, "leval": 2048, "lveval": 16384, "mixed": 2048,
               "zipf1.0": 2048, "zipf1.2": 2048, "zipf1.4": 2048}


def _pages(tokens: int) -> int:
    return -(-tokens // PAGE) * PAGE


class _Seq:
    """A request inside a replica. target: tokens its current (re)prefill covers; done: tokens of it
    prefilled so far; kv: KV tokens held (reserved = pages(kv) once admitted); order: admission
    stamp (preemption takes the largest)."""
    __slots__ = ("req", "rid", "target", "done", "kv", "order")

    def __init__(self, req):
        self.req, self.rid = req, req.rid
        self.target, self.done, self.kv, self.order = req.prompt_len, 0, 0, 0


class _Replica:
    """One replica: `instances` (a tuple of world ranks) running as one TP/SP group."""

    def __init__(self, instances, capacity, cost_model, rec, mode, chunk_size=None):
        self.instances, self.t = tuple(instances), len(instances)
        self.capacity, self.cm, self.rec, self.mode = capacity, cost_model, rec, mode
        self.chunk_size = chunk_size
        self.waiting = deque()
        self.prefilling = []       # admitted, partially prefilled (chunked mode)
        self.running = []          # decoding
        self.handoff = []          # prefilled, KV still here, waiting for transfer (disaggregated)
        self.reserved = 0          # tokens of pages held
        self.queued = 0            # target tokens of the waiting queue
        self.busy = False
        self.stamp = 0
        self._pf = {}

    # -- memory ----------------------------------------------------------------------------------
    @property
    def free(self):
        return self.capacity - self.reserved

    def load(self):
        return (self.reserved + self.queued) / self.capacity

    def enqueue(self, seq, front=False):
        (self.waiting.appendleft if front else self.waiting.append)(seq)
        self.queued += seq.target

    def _admit_fits(self, seq, active):
        return (active < MAX_SEQS
                and _pages(seq.target) <= self.free - WATERMARK * self.capacity)

    def _admit(self):
        seq = self.waiting.popleft()
        self.queued -= seq.target
        seq.done, seq.kv = 0, seq.target
        self.reserved += _pages(seq.target)
        self.stamp += 1
        seq.order = self.stamp
        return seq

    def release(self, seq):
        self.reserved -= _pages(seq.kv)
        seq.kv = 0

    def accept(self, seq):
        """Take a request whose KV (seq.kv tokens, reserved here when its transfer began) arrived."""
        self.stamp += 1
        seq.order = self.stamp
        self.running.append(seq)

    def _make_decode_room(self, preempted):
        """Preempt the latest-admitted request until every running request can append one token."""
        need = sum(PAGE for s in self.running if s.kv % PAGE == 0)
        while need > self.free:
            victim = max(self.running + self.prefilling, key=lambda s: s.order)
            if victim in self.running:
                self.running.remove(victim)
                if victim.kv % PAGE == 0:
                    need -= PAGE
            else:
                self.prefilling.remove(victim)
            self.release(victim)
            victim.target, victim.done = victim.req.prompt_len + self.rec.generated[victim.rid], 0
            self.rec.preempted(victim.rid)
            preempted.append(victim)

    # -- cost ------------------------------------------------------------------------------------
    def _prefill_one(self, n):
        t = self._pf.get(n)
        if t is None:
            t = self._pf[n] = self.cm.prefill_time(self.t, [n]) if n > 0 else 0.0
        return t

    def _decode_time(self):
        return self.cm.decode_time([s.kv for s in self.running], group_size=self.t, num_masters=self.t)

    # -- one iteration ---------------------------------------------------------------------------
    def step(self, preempted):
        """Compose the next iteration: (duration, kind, payload) or None when there is no work.
        Preempted requests are appended to `preempted` (the caller requeues them)."""
        if self.mode == "chunked":
            return self._step_chunked(preempted)
        if self.mode != "decode_only" and self.waiting:
            batch = []
            active = len(self.running) + len(self.handoff)
            while self.waiting and self._admit_fits(self.waiting[0], active + len(batch)):
                batch.append(self._admit())
            if batch:
                dur = self.cm.prefill_time(self.t, [s.target for s in batch])
                return dur, "prefill", ("prefill", batch)
        if self.running and self.mode != "prefill_only":
            self._make_decode_room(preempted)
            if self.running:
                return self._decode_time(), "decode", ("decode", list(self.running))
        return None

    def _step_chunked(self, preempted):
        """SplitFuse / Sarathi / vLLM chunked prefill: every running request decodes one token and the
        rest of the chunk_size token budget goes to prefill chunks (partially prefilled requests
        first, then newly admitted ones in FCFS order)."""
        if self.running:
            self._make_decode_room(preempted)
        budget = self.chunk_size - len(self.running)
        chunks = []
        for s in self.prefilling:
            if budget <= 0:
                break
            n = min(budget, s.target - s.done)
            chunks.append((s, n))
            budget -= n
        while budget > 0 and self.waiting and self._admit_fits(
                self.waiting[0], len(self.running) + len(self.prefilling)):
            s = self._admit()
            self.prefilling.append(s)
            n = min(budget, s.target)
            chunks.append((s, n))
            budget -= n
        if not chunks and not self.running:
            return None
        # A chunk of n tokens after c cached ones costs prefill(c + n) - prefill(c): the telescoping
        # sum over all chunks of a request is exactly one full prefill. Decode and chunk are priced
        # separately and added; the fused kernel saves one fixed per-iteration overhead that this
        # does not credit (a small bias against the baseline).
        dur = self._decode_time() if self.running else 0.0
        for s, n in chunks:
            dur += self._prefill_one(s.done + n) - self._prefill_one(s.done)
        return dur, "mixed", ("mixed", list(self.running), chunks)

    def complete(self, payload, now):
        """Apply a finished iteration; returns the requests that finished their prefill and need a
        KV transfer (prefill_only mode)."""
        rec, handed = self.rec, []
        kind = payload[0]
        if kind in ("decode", "mixed"):
            still = []
            for s in payload[1]:
                if s.kv % PAGE == 0:
                    self.reserved += PAGE
                s.kv += 1
                if rec.token(s.rid, now):
                    self.release(s)
                else:
                    still.append(s)
            done_ids = {id(s) for s in payload[1]}
            self.running = still + [s for s in self.running if id(s) not in done_ids]
        if kind == "prefill":
            prefilled = payload[1]
            for s in prefilled:
                s.done = s.target
        elif kind == "mixed":
            prefilled = []
            for s, n in payload[2]:
                s.done += n
                if s.done == s.target:
                    prefilled.append(s)
            if prefilled:
                ids = {id(s) for s in prefilled}
                self.prefilling = [s for s in self.prefilling if id(s) not in ids]
        else:
            prefilled = []
        for s in prefilled:
            if rec.token(s.rid, now):
                self.release(s)
            elif self.mode == "prefill_only":
                self.handoff.append(s)
                handed.append(s)
            else:
                self.running.append(s)
        return handed


def _check_fits(req, replicas, what):
    """A request whose peak KV (in pages) an empty replica would not admit (admission keeps the
    watermark free) would wait at the head of its FCFS queue forever: refuse it on arrival."""
    cap = max(r.capacity for r in replicas)
    limit = cap - WATERMARK * cap
    need = req.prompt_len + req.output_len - 1
    if _pages(need) > limit:
        raise ValueError(f"request {req.rid} needs {need} KV tokens ({_pages(need)} in pages of "
                         f"{PAGE}) but a {what} replica admits at most {limit:g} (its {cap} less "
                         f"the {WATERMARK:.0%} watermark): use a larger tensor-parallel size")


class _ReplicaPolicy(Policy):
    """N instances in N / tp replicas of tp instances, each an independent continuous-batching engine."""

    mode = None

    def __init__(self, cost_model, num_instances=8, tp=None, kv_tokens_per_replica=None,
                 gpu_mem_gib=80.0, mem_fraction=0.9, chunk_size=None):
        tp = num_instances if tp is None else tp
        if num_instances < 1 or tp < 1 or num_instances % tp:
            raise ValueError(f"tp={tp} must divide num_instances={num_instances} (both >= 1)")
        self.cost_model, self.num_instances, self.tp = cost_model, num_instances, tp
        self.capacity = (kv_tokens_per_replica if kv_tokens_per_replica is not None
                         else kv_capacity_tokens(cost_model, gpu_mem_gib, mem_fraction, tp=tp))
        self.chunk_size = chunk_size

    def bind(self, recorder, requests):
        super().bind(recorder, requests)
        self.replicas = [_Replica(range(k, k + self.tp), self.capacity, self.cost_model, recorder,
                                  self.mode, self.chunk_size)
                         for k in range(0, self.num_instances, self.tp)]
        self.of_instance = [r for r in self.replicas for _ in range(self.tp)]

    def on_arrival(self, request, now):
        _check_fits(request, self.replicas, self.name)
        min(self.replicas, key=_Replica.load).enqueue(_Seq(request))

    def schedule(self, now):
        launches = []
        for r in self.replicas:
            if r.busy:
                continue
            preempted = []
            step = r.step(preempted)
            for s in reversed(preempted):
                r.enqueue(s, front=True)
            if step is not None:
                dur, kind, payload = step
                r.busy = True
                launches.append(Launch(r.instances, now, now + dur, kind, (r, payload)))
        return launches

    def on_complete(self, launch, now):
        r, payload = launch.payload
        r.busy = False
        r.complete(payload, now)

    def kv_used(self, instance):
        r = self.of_instance[instance]
        return r.reserved / r.t

    def kv_capacity(self, instance):
        return self.capacity / self.tp

    def describe(self):
        extra = f", chunk={self.chunk_size}" if self.mode == "chunked" else ""
        return f"{self.name}(N={self.num_instances}, {self.num_instances // self.tp}x{self.tp}{extra})"


class StaticSPPolicy(_ReplicaPolicy):
    """`static_sp`: LoongServe's ablation without elasticity. Fixed SP groups of `tp` instances
    (default: all N); a request stays in its group for prefill and decode, its KV striped over the
    group (decode_time with group_size = num_masters = the group size). Each group is scheduled like
    vLLM without chunking: admit and prefill waiting requests when they fit, else decode."""
    name = "static_sp"
    mode = "prefill_first"


class ChunkedPrefillPolicy(_ReplicaPolicy):
    """`chunked_prefill`: SplitFuse-style chunked prefill (DeepSpeed-FastGen / Sarathi / vLLM
    --enable-chunked-prefill) on TP replicas of `tp` instances (default one replica of all N, the
    issue's "one TP instance"); iteration = all running decodes + prefill chunks filling the
    chunk_size token budget (CHUNK_SIZES per dataset)."""
    name = "chunked_prefill"
    mode = "chunked"

    def __init__(self, cost_model, num_instances=8, tp=None, chunk_size=2048, **kw):
        if chunk_size is None or chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        super().__init__(cost_model, num_instances, tp, chunk_size=chunk_size, **kw)


class DisaggregatedPolicy(Policy):
    """`disaggregated`: DistServe-style fixed pools. `prefill_instances` instances (default N/2) in
    prefill replicas of `prefill_tp` (default the whole pool), the rest in decode replicas of
    `decode_tp` (default the whole pool). A prefill replica batches waiting requests FCFS and
    prefills them (emitting the first token); their KV stays there until it is transferred to a
    decode replica with room (pull-based, FCFS, one transfer at a time per decode replica), which
    takes cost_model.migration_time(tokens / min(prefill_tp, decode_tp)) (the TP shards move over
    that many GPU pairs in parallel) and overlaps with compute on both sides. A request preempted in
    the decode pool is recomputed in the prefill pool. Simplified: DistServe's placement search and
    pipeline parallelism are not modelled (the caller sweeps pool sizes instead)."""

    name = "disaggregated"

    def __init__(self, cost_model, num_instances=8, prefill_instances=None, prefill_tp=None,
                 decode_tp=None, gpu_mem_gib=80.0, mem_fraction=0.9, kv_tokens_per_replica=None):
        p = num_instances // 2 if prefill_instances is None else prefill_instances
        d = num_instances - p
        if p < 1 or d < 1:
            raise ValueError(f"prefill_instances={p} must leave >= 1 instance to each pool of {num_instances}")
        ptp = p if prefill_tp is None else prefill_tp
        dtp = d if decode_tp is None else decode_tp
        if ptp < 1 or p % ptp or dtp < 1 or d % dtp:
            raise ValueError(f"prefill_tp={ptp} must divide {p} prefill instances and decode_tp={dtp} "
                             f"the {d} decode instances")
        self.cost_model, self.num_instances = cost_model, num_instances
        self.p, self.ptp, self.dtp = p, ptp, dtp
        cap = lambda tp: (kv_tokens_per_replica if kv_tokens_per_replica is not None
                          else kv_capacity_tokens(cost_model, gpu_mem_gib, mem_fraction, tp=tp))
        self.pcap, self.dcap = cap(ptp), cap(dtp)
        self.link_pairs = min(ptp, dtp)

    def bind(self, recorder, requests):
        super().bind(recorder, requests)
        cm = self.cost_model
        self.prefill = [_Replica(range(k, k + self.ptp), self.pcap, cm, recorder, "prefill_only")
                        for k in range(0, self.p, self.ptp)]
        self.decode = [_Replica(range(k, k + self.dtp), self.dcap, cm, recorder, "decode_only")
                       for k in range(self.p, self.num_instances, self.dtp)]
        self.of_instance = [r for r in self.prefill + self.decode for _ in range(r.t)]
        self.pending = deque()          # (seq, source replica) waiting for a transfer, FCFS
        self.receiving = set()          # decode replicas with a transfer in flight

    def on_arrival(self, request, now):
        _check_fits(request, self.decode, "decode")
        _check_fits(request, self.prefill, "prefill")
        min(self.prefill, key=_Replica.load).enqueue(_Seq(request))

    def schedule(self, now):
        launches = []
        for r in self.prefill + self.decode:
            if r.busy:
                continue
            preempted = []
            step = r.step(preempted)
            for s in reversed(preempted):
                min(self.prefill, key=_Replica.load).enqueue(s, front=True)
            if step is not None:
                dur, kind, payload = step
                r.busy = True
                launches.append(Launch(r.instances, now, now + dur, kind, (r, payload)))
        while self.pending:
            seq, src = self.pending[0]
            free = [r for r in self.decode if r not in self.receiving
                    and _pages(seq.kv) <= r.free - WATERMARK * r.capacity and len(r.running) < MAX_SEQS]
            if not free:
                break
            dst = max(free, key=lambda r: r.free)
            self.pending.popleft()
            dst.reserved += _pages(seq.kv)           # reserved on arrival of the first byte
            self.receiving.add(dst)
            dur = self.cost_model.migration_time(-(-seq.kv // self.link_pairs))
            launches.append(Launch((), now, now + dur, "transfer", (src, dst, seq)))
        return launches

    def on_complete(self, launch, now):
        if launch.kind == "transfer":
            src, dst, seq = launch.payload
            self.receiving.discard(dst)
            src.handoff.remove(seq)
            src.reserved -= _pages(seq.kv)
            dst.accept(seq)
            return
        r, payload = launch.payload
        r.busy = False
        for seq in r.complete(payload, now):
            self.pending.append((seq, r))

    def kv_used(self, instance):
        r = self.of_instance[instance]
        return r.reserved / r.t

    def kv_capacity(self, instance):
        r = self.of_instance[instance]
        return r.capacity / r.t

    def describe(self):
        return (f"disaggregated(N={self.num_instances}, prefill {self.p // self.ptp}x{self.ptp}, "
                f"decode {(self.num_instances - self.p) // self.dtp}x{self.dtp})")
