"""TEST DOUBLES for the simulator tests only (never imported by the package).

FakeCostModel has the CostModel methods of notes SCHED_SPEC (esp_kernels.scheduler, issue 18) with
a closed-form, roughly H100 x Llama-3-8B-shaped timing; FakeScheduler honours the ESPScheduler
interface and token semantics with the simplest possible policy (each request lives on one instance,
its peak KV reserved at placement, so it never preempts or migrates). They let the simulator's event
loop, metrics and baselines be tested while the real scheduler is absent; the ESP-policy tests also
run against the real classes whenever esp_kernels.scheduler imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


class FakeCostModel:
    """Times (s): prefill a + (dense x sum(l) + attn x sum(l^2)) / group; decode a + per-request dense
    / masters + KV bytes read / group; migration latency + bytes / bandwidth. Constants: 16 GFLOP per
    token dense at ~600 TFLOP/s, causal attention of Llama-3-8B at ~400 TFLOP/s, 16 GB of weights read
    at ~3 TB/s per decode step, 50 GB/s between instances."""

    model = SimpleNamespace(num_layers=32, hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                            intermediate=14336, vocab=128256, dtype="bfloat16")
    kv_bytes_per_token = 2 * 8 * 128 * 32 * 2

    def prefill_time(self, group_size, seqlens):
        s1 = sum(seqlens)
        s2 = sum(l * l for l in seqlens)
        return 5e-3 + 1e-3 * (group_size - 1) + (2.7e-5 * s1 + 6.5e-10 * s2) / group_size

    def decode_time(self, kv_lens, group_size=1, num_masters=1):
        return (6e-3 + 2e-5 * len(kv_lens) / num_masters
                + 4.4e-8 * sum(kv_lens) / group_size + 1e-4 * (group_size - 1))

    def migration_time(self, num_tokens):
        return 1e-4 + num_tokens * self.kv_bytes_per_token / 50e9


@dataclass(frozen=True)
class PrefillGroup:
    batch_id: int
    instances: tuple
    requests: tuple
    seqlens: tuple
    retention: tuple
    predicted_time: float


@dataclass(frozen=True)
class DecodeBatch:
    batch_id: int
    instances: tuple
    requests: tuple
    masters: tuple
    shards: tuple
    append_to: tuple
    predicted_time: float


@dataclass(frozen=True)
class IterationPlan:
    index: int
    now: float
    prefills: tuple
    decodes: tuple
    migrations: tuple
    preemptions: tuple
    predicted_time: float

    @property
    def empty(self):
        return not (self.prefills or self.decodes or self.migrations or self.preemptions)


class FakeScheduler:
    """ESPScheduler interface, trivial policy: FCFS placement of each request on the instance with the
    most unreserved KV that holds its peak (prompt + max_new_tokens - 1, page-rounded); an idle
    instance prefills its placed requests (one group of size 1) or else decodes all its decoding ones.
    Stricter than the spec: a request must fit ONE instance (add_request raises otherwise)."""

    def __init__(self, num_instances, kv_slots_per_instance, cost_model, page_size=16):
        self.n, self.slots, self.cm, self.page = num_instances, kv_slots_per_instance, cost_model, page_size
        self.busy = [False] * num_instances
        self.reserved = [0] * num_instances   # peak KV reserved at placement
        self.used = [0] * num_instances       # pages of KV actually held
        self.kv = {}            # rid -> KV tokens held
        self.home = {}          # rid -> instance
        self.req = {}           # rid -> (prompt_len, max_new_tokens)
        self._state, self._gen = {}, {}
        self.queue = []         # FCFS rids not yet placed
        self.placed = [[] for _ in range(num_instances)]   # waiting for prefill
        self.decoding = [[] for _ in range(num_instances)]
        self.next_batch = self.next_index = 0
        self.stats = {"prefills": 0, "decodes": 0}

    def _pages(self, tokens):
        return -(-tokens // self.page) * self.page

    def add_request(self, rid, prompt_len, max_new_tokens, arrival=None):
        if rid in self.req:
            raise ValueError(f"duplicate rid {rid!r}")
        if int(prompt_len) < 1 or int(max_new_tokens) < 1:
            raise ValueError("prompt_len and max_new_tokens must be ints >= 1")
        if self._pages(prompt_len + max_new_tokens - 1) > self.slots:
            raise ValueError(f"request {rid!r} never fits one instance ({self.slots} slots)")
        self.req[rid] = (prompt_len, max_new_tokens)
        self._state[rid], self._gen[rid] = "queued", 0
        self.queue.append(rid)

    def _place(self):
        while self.queue:
            rid = self.queue[0]
            peak = self._pages(sum(self.req[rid]) - 1)
            i = max(range(self.n), key=lambda j: self.slots - self.reserved[j])
            if self.slots - self.reserved[i] < peak:
                return
            self.queue.pop(0)
            self.reserved[i] += peak
            self.home[rid] = i
            self.placed[i].append(rid)

    def schedule(self, now=0.0):
        self._place()
        prefills, decodes = [], []
        for i in range(self.n):
            if self.busy[i]:
                continue
            if self.placed[i]:
                rids, self.placed[i] = tuple(self.placed[i]), []
                lens = tuple(self.req[r][0] + self._gen[r] for r in rids)
                for r in rids:
                    self._state[r] = "prefilling"
                prefills.append(PrefillGroup(self.next_batch, (i,), rids, lens,
                                             tuple(((i, 0, l),) for l in lens),
                                             self.cm.prefill_time(1, lens)))
            elif self.decoding[i]:
                rids = tuple(self.decoding[i])
                kv = [self.kv[r] for r in rids]
                decodes.append(DecodeBatch(self.next_batch, (i,), rids, (i,) * len(rids),
                                           tuple(((i, k),) for k in kv), (i,) * len(rids),
                                           self.cm.decode_time(kv, 1, 1)))
            else:
                continue
            self.busy[i] = True
            self.next_batch += 1
        times = [b.predicted_time for b in prefills + decodes]
        plan = IterationPlan(self.next_index, now, tuple(prefills), tuple(decodes), (), (),
                             max(times, default=0.0))
        self.next_index += 1
        return plan

    def _finish(self, rid):
        i = self.home[rid]
        self.reserved[i] -= self._pages(sum(self.req[rid]) - 1)
        self.used[i] -= self._pages(self.kv.pop(rid))
        self._state[rid] = "finished"
        if rid in self.decoding[i]:
            self.decoding[i].remove(rid)

    def update(self, done, finished=(), now=None):
        batches = (list(done.prefills) + list(done.decodes)) if isinstance(done, IterationPlan) else [done]
        for b in batches:
            for i in b.instances:
                self.busy[i] = False
            if isinstance(b, PrefillGroup):
                self.stats["prefills"] += 1
                for r, l in zip(b.requests, b.seqlens):
                    self.kv[r] = l
                    self.used[self.home[r]] += self._pages(l)
                    self._gen[r] += 1
                    self._state[r] = "decoding"
                    if self._gen[r] == self.req[r][1]:
                        self._finish(r)
                    else:
                        self.decoding[self.home[r]].append(r)
            else:
                self.stats["decodes"] += 1
                for r in b.requests:
                    if self.kv[r] % self.page == 0:
                        self.used[self.home[r]] += self.page
                    self.kv[r] += 1
                    self._gen[r] += 1
                    if self._gen[r] == self.req[r][1]:
                        self._finish(r)
        for r in finished:
            if self._state[r] != "finished":
                self._finish(r)

    def idle_instances(self):
        return [i for i in range(self.n) if not self.busy[i]]

    def kv_used(self, i):
        return self.used[i]

    def kv_free(self, i):
        return self.slots - self.kv_used(i)

    def placement(self, rid):
        return {self.home[rid]: self.kv[rid]} if rid in self.kv else {}

    def state(self, rid):
        return self._state[rid]

    def generated(self, rid):
        return self._gen[rid]
