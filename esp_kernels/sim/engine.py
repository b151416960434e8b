"""The discrete-event core: one clock, a heap of events, and the policy it drives.

Events are request arrivals and batch completions. After all events of one timestamp are handled
the policy is asked for new batches (`Policy.schedule(now)`), each occupying a set of instances
from now until now + its duration (the cost model's prediction). The engine owns the request
records (first-token and finish times, generated tokens), the busy time of every instance and
the KV occupancy samples, and, with check=True, the invariants: time never goes back, an
instance never runs two batches at once, a request never gets a token after it finished, and no
instance holds more KV than its capacity. Cost per event: O(log events) heap work plus the
policy's own work for that batch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Launch", "Policy", "Recorder", "Simulator", "SimResult", "SimulationError",
           "model_weight_bytes", "kv_capacity_tokens"]


class SimulationError(RuntimeError):
    """An invariant broke or the policy stalled (requests left, nothing running, nothing scheduled)."""


class Launch:
    """A batch in flight: the instances it occupies (may be empty: a KV transfer on links only),
    start and end time (s), its kind ("prefill", "decode", "mixed", "transfer") and the policy's
    own payload."""
    __slots__ = ("instances", "start", "end", "kind", "payload")

    def __init__(self, instances, start, end, kind, payload=None):
        self.instances, self.start, self.end, self.kind, self.payload = instances, start, end, kind, payload


class Recorder:
    """Per-request token accounting, indexed by request id 0..n-1."""

    def __init__(self, requests):
        n = len(requests)
        self.output_len = np.array([r.output_len for r in requests], dtype=np.int64).tolist()
        self.generated = [0] * n
        self.first_token = [math.nan] * n
        self.finish = [math.nan] * n
        self.preemptions = [0] * n
        self.unfinished = n

    def token(self, rid: int, now: float) -> bool:
        """Count one generated token of rid at `now`; True when it was the last one (finished)."""
        g = self.generated[rid] + 1
        if g > self.output_len[rid]:
            raise SimulationError(f"request {rid} got token {g} of {self.output_len[rid]} at t={now}")
        self.generated[rid] = g
        if g == 1:
            self.first_token[rid] = now
        if g == self.output_len[rid]:
            self.finish[rid] = now
            self.unfinished -= 1
            return True
        return False

    def tokens(self, rids, now: float) -> list:
        """One token for each of rids at `now` (a batch step); returns the rids that finished."""
        gen, out, finished = self.generated, self.output_len, []
        for rid in rids:
            g = gen[rid] + 1
            if g > out[rid]:
                raise SimulationError(f"request {rid} got token {g} of {out[rid]} at t={now}")
            gen[rid] = g
            if g == 1:
                self.first_token[rid] = now
            if g == out[rid]:
                self.finish[rid] = now
                finished.append(rid)
        self.unfinished -= len(finished)
        return finished

    def preempted(self, rid: int) -> None:
        self.preemptions[rid] += 1


class Policy:
    """What the engine drives. Subclasses set `name`, `num_instances`, and implement the hooks.

    bind(recorder, requests) once; on_arrival(request, now) per arrival; schedule(now) -> list of
    Launch starting now (only on instances idle at now); on_complete(launch, now) when a launch ends
    (count tokens with recorder.token); kv_used(i) and kv_capacity(i) in tokens (may be fractional
    for tensor-parallel replicas, whose KV is split evenly over their instances)."""

    name = "policy"
    num_instances = 0

    def bind(self, recorder: Recorder, requests) -> None:
        self.rec = recorder

    def on_arrival(self, request, now: float) -> None:
        raise NotImplementedError

    def schedule(self, now: float) -> list:
        raise NotImplementedError

    def on_complete(self, launch: Launch, now: float) -> None:
        raise NotImplementedError

    def kv_used(self, instance: int) -> float:
        raise NotImplementedError

    def kv_capacity(self, instance: int) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass
class SimResult:
    """What one run produced. Arrays are per request (index = request id) or per instance."""
    policy: str
    num_instances: int
    requests: list
    first_token: np.ndarray          # s, nan if never produced
    finish: np.ndarray               # s, nan if unfinished (cut off by max_time)
    generated: np.ndarray            # tokens generated per request
    preemptions: np.ndarray
    end_time: float                  # time of the last event handled
    busy_time: np.ndarray            # s per instance
    num_events: int
    launches: list = field(default_factory=list)   # (start, end, instances, kind) if recorded
    kv_samples: list = field(default_factory=list)  # per instance: list of (t, kv_used)
    kv_capacity: np.ndarray = None                  # tokens per instance
    kv_peak: np.ndarray = None                      # most KV tokens seen per instance (check=True)

    @property
    def unfinished(self) -> int:
        return int(np.isnan(self.finish).sum())


class Simulator:
    """Runs one policy over one list of requests (ids must be 0..n-1 in arrival order).

    max_time: stop handling events after this simulated time (s); requests left then count as
    unfinished (they miss every SLO). check: verify the invariants above on every event.
    record_timeline: keep every launch and KV samples (for plots); off for long benchmarks.
    """

    def __init__(self, policy: Policy, requests, *, max_time: float | None = None, check: bool = True,
                 record_timeline: bool = True):
        for i, r in enumerate(requests):
            if r.rid != i:
                raise ValueError(f"requests must have rid 0..n-1 in order; position {i} has rid {r.rid}")
            if i and r.arrival < requests[i - 1].arrival:
                raise ValueError(f"requests must be sorted by arrival; rid {i} arrives before rid {i - 1}")
        self.policy, self.requests = policy, list(requests)
        self.max_time = math.inf if max_time is None else float(max_time)
        self.check, self.record_timeline = check, record_timeline

    def run(self, progress=None) -> SimResult:
        """progress: optional callable(fraction_done) called as requests finish (about 100 times)."""
        policy, reqs, n = self.policy, self.requests, len(self.requests)
        N = policy.num_instances
        rec = Recorder(reqs)
        policy.bind(rec, reqs)
        caps = np.array([policy.kv_capacity(i) for i in range(N)], dtype=np.float64)
        busy_until = [0.0] * N
        busy_time = [0.0] * N
        launches, kv_samples = [], [[] for _ in range(N)]
        heap: list = []
        seq = 0          # tie-break: events of one time run in creation order (deterministic)
        next_arrival = 0
        now, events = 0.0, 0
        report_every = max(1, n // 100)
        last_reported = n
        check, record = self.check, self.record_timeline
        kv_peak = np.zeros(N)

        def check_kv(i):
            used = policy.kv_used(i)
            if used > caps[i] + 1e-9:
                raise SimulationError(f"instance {i} holds {used} KV tokens > capacity {caps[i]} at t={now} "
                                      f"({policy.name})")
            if used > kv_peak[i]:
                kv_peak[i] = used

        arrivals = [r.arrival for r in reqs] + [math.inf]
        heappop, heappush = heapq.heappop, heapq.heappush
        max_time, inf = self.max_time, math.inf
        while True:
            t = arrivals[next_arrival]
            if heap and heap[0][0] < t:
                t = heap[0][0]
            if t == inf or t > max_time:
                break
            if check and t < now:
                raise SimulationError(f"time went back from {now} to {t}")
            now = t
            while arrivals[next_arrival] <= now:
                policy.on_arrival(reqs[next_arrival], now)
                next_arrival += 1
                events += 1
            while heap and heap[0][0] <= now:
                _, _, launch = heappop(heap)
                policy.on_complete(launch, now)
                events += 1
                for i in launch.instances:
                    if check:
                        check_kv(i)
                    if record:
                        kv_samples[i].append((now, policy.kv_used(i)))
            for launch in policy.schedule(now):
                if check and not launch.end >= now:
                    raise SimulationError(f"{policy.name} launched a batch ending at {launch.end} < now {now}")
                for i in launch.instances:
                    if check:
                        if busy_until[i] > now:
                            raise SimulationError(f"{policy.name} put two batches on instance {i} at t={now} "
                                                  f"(busy until {busy_until[i]})")
                        check_kv(i)         # KV reserved when the batch was planned
                    busy_until[i] = launch.end
                    busy_time[i] += launch.end - now
                if record:
                    launches.append((now, launch.end, tuple(launch.instances), launch.kind))
                heappush(heap, (launch.end, seq, launch))
                seq += 1
            if progress is not None and last_reported - rec.unfinished >= report_every:
                last_reported = rec.unfinished
                progress(1.0 - rec.unfinished / n)
            if not heap and next_arrival >= n and rec.unfinished:
                raise SimulationError(
                    f"{policy.name} stalled at t={now}: {rec.unfinished} requests unfinished, nothing "
                    f"running and nothing scheduled ({policy.describe()})")

        for i in range(N):          # a run cut at max_time counts busy time only up to its end
            if busy_until[i] > now:
                busy_time[i] -= busy_until[i] - now
        if check and rec.unfinished == 0:
            bad = [i for i in range(n) if rec.generated[i] != reqs[i].output_len]
            if bad:
                raise SimulationError(f"requests {bad[:5]} generated a different number of tokens "
                                      "than their output_len")
        return SimResult(
            policy=policy.describe(), num_instances=N, requests=reqs,
            first_token=np.array(rec.first_token), finish=np.array(rec.finish),
            generated=np.array(rec.generated), preemptions=np.array(rec.preemptions),
            end_time=now, busy_time=np.array(busy_time), num_events=events,
            launches=launches, kv_samples=kv_samples, kv_capacity=caps,
            kv_peak=kv_peak if check else None)


# --- KV capacity from the model config ----------------------------------------------------------

def _field(model, *names):
    for name in names:
        if hasattr(model, name):
            return int(getattr(model, name))
    raise AttributeError(f"cost_model.model has none of {names}")


def model_weight_bytes(cost_model) -> int:
    """Bytes of a Llama-shaped model's weights (embedding, layers, final norm, untied lm head) in
    the KV dtype (dtype size = kv_bytes_per_token / (2 x layers x kv heads x head dim))."""
    m = cost_model.model
    layers, hidden = _field(m, "num_layers"), _field(m, "hidden")
    hq, hkv, d = _field(m, "num_q_heads"), _field(m, "num_kv_heads"), _field(m, "head_dim")
    inter, vocab = _field(m, "intermediate"), _field(m, "vocab", "vocab_size")
    dtype_bytes = cost_model.kv_bytes_per_token // (2 * layers * hkv * d)
    per_layer = hidden * (hq * d) * 2 + hidden * (hkv * d) * 2 + 3 * hidden * inter + 2 * hidden
    return (layers * per_layer + 2 * vocab * hidden + hidden) * dtype_bytes


def kv_capacity_tokens(cost_model, gpu_mem_gib: float = 80.0, mem_fraction: float = 0.9, tp: int = 1) -> int:
    """KV token slots of one model replica spread over `tp` GPUs of gpu_mem_gib each, of which
    mem_fraction is usable (activations, CUDA context and fragmentation take the rest: vLLM's
    default gpu_memory_utilization is 0.9); the weights are split over the tp GPUs."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    budget = tp * gpu_mem_gib * 2 ** 30 * mem_fraction - model_weight_bytes(cost_model)
    tokens = int(budget // cost_model.kv_bytes_per_token)
    if tokens < 1:
        raise ValueError(f"gpu_mem_gib={gpu_mem_gib} x mem_fraction={mem_fraction} x tp={tp} does not "
                         "even hold the model weights")
    return tokens
