"""The serving loop: arrivals -> scheduler -> iteration plans -> engines -> scheduler.

`serve(executor, scheduler, workload)` is lock-step: each iteration the scheduler plans for the
instances (all idle, since the previous iteration completed), the executor runs the plan on every
instance (a VirtualCluster, or an Engine in a process per GPU, each process running the same
deterministic scheduler on the same arrivals), and the scheduler learns what completed and which
requests stopped at EOS. Arrivals are in seconds from the start on the wall clock (or `clock`).
When every request has finished and the next has not arrived, the loop sleeps until it does;
with a clock that does not advance by itself (a logical one), time then jumps to that arrival
(pass `sleep=lambda s: None` to skip the wall-clock wait).

With a process per instance, every process must execute the same plans in the same order:
either every process runs the same deterministic scheduler on a shared logical clock (pass
`clock`, e.g. one that counts iterations: the wall clocks of processes differ), or one
process schedules and sends the plans (their to_dict() is plain JSON) to the others, which call
`Engine.execute` on each.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from .sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Arrival:
    rid: object
    prompt: tuple        # token ids
    max_new_tokens: int
    arrival: float = 0.0  # seconds from the start
    sampling: SamplingParams | None = None


@dataclasses.dataclass
class RequestRecord:
    arrival: float
    first_token: float | None = None   # seconds from the start
    finish: float | None = None
    tokens: list = dataclasses.field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        n = len(self.tokens)
        return (self.finish - self.first_token) / (n - 1) if n > 1 else None


@dataclasses.dataclass
class IterationRecord:
    plan: object
    start: float
    end: float
    result: object


@dataclasses.dataclass
class ServeResult:
    requests: dict           # rid -> RequestRecord
    iterations: list         # IterationRecord
    wall: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests.values())


def serve(executor, scheduler, workload: Sequence[Arrival], *,
          on_iteration: Callable[[IterationRecord], None] | None = None,
          clock: Callable[[], float] = time.perf_counter,
          sleep: Callable[[float], None] = time.sleep,
          max_iterations: int = 1_000_000) -> ServeResult:
    pending = sorted(workload, key=lambda a: a.arrival)
    records = {a.rid: RequestRecord(a.arrival) for a in pending}
    if len(records) != len(pending):
        raise ValueError("workload request ids must be distinct")
    open_rids: set = set()
    iterations = []
    start = clock()
    skipped = 0.0  # idle time jumped over: a clock that did not advance while the loop waited

    def elapsed():
        return clock() - start + skipped

    for _ in range(max_iterations):
        now = elapsed()
        while pending and pending[0].arrival <= now:
            a = pending.pop(0)
            scheduler.add_request(a.rid, len(a.prompt), a.max_new_tokens, arrival=a.arrival)
            executor.add_request(a.rid, a.prompt, a.max_new_tokens, a.sampling)
            open_rids.add(a.rid)
        if not open_rids and not pending:
            break
        plan = scheduler.schedule(now=now)
        if plan.empty:
            if open_rids:
                raise RuntimeError(f"the scheduler planned nothing for requests "
                                   f"{sorted(map(str, open_rids))[:8]} with every instance idle")
            sleep(max(0.0, pending[0].arrival - elapsed()))
            # what the clock did not cover while sleeping (all of the gap on a logical clock)
            skipped += max(0.0, pending[0].arrival - elapsed())
            continue
        t0 = elapsed()
        result = executor.execute(plan)
        t1 = elapsed()
        scheduler.update(plan, finished=result.eos, now=t1)
        for rid, tok in result.tokens.items():
            rec = records[rid]
            rec.tokens.append(tok)
            if rec.first_token is None:
                rec.first_token = t1
        for rid in result.finished:
            records[rid].finish = t1
            open_rids.discard(rid)
        it = IterationRecord(plan, t0, t1, result)
        iterations.append(it)
        if on_iteration is not None:
            on_iteration(it)
    else:
        raise RuntimeError(f"serving did not finish within {max_iterations} iterations")
    return ServeResult(records, iterations, elapsed())
