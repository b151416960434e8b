"""The `esp` policy: the real esp_kernels.scheduler.ESPScheduler driven by the event clock.

Asynchronous, as the scheduler's update() contract allows: every PrefillGroup / DecodeBatch of an
IterationPlan starts now and completes at now + its predicted_time (the scheduler's prediction from
the same cost model); on completion update(batch) frees its instances and schedule() runs again.
schedule() is also called when requests arrive and some instance is idle (a plan only ever uses
idle instances, so with none idle the call is skipped).

Simplified: the migrations of a plan delay the batches whose instances they touch by the sum of
their cost_model.migration_time (a migration touching no batch of the plan costs nothing here: its
instances sit idle until the next plan anyway); preempted requests are recomputed by the scheduler
itself (token semantics of the spec: the recompute prefill produces the next token).
"""

from __future__ import annotations

from .engine import Launch, Policy, SimulationError, kv_capacity_tokens

__all__ = ["ESPPolicy"]


class ESPPolicy(Policy):
    """cost_model: a CostModel; kv_slots_per_instance: KV token slots per instance (default from the
    model config and gpu_mem_gib x mem_fraction); scheduler_cls: the scheduler class (default the
    real esp_kernels.scheduler.ESPScheduler, imported here so this module imports without it);
    scheduler_kwargs: passed to it (page_size and policy knobs)."""

    name = "esp"
    MAX_BATCHLESS_PLANS = 4

    def __init__(self, cost_model, num_instances: int = 8, kv_slots_per_instance: int | None = None,
                 gpu_mem_gib: float = 80.0, mem_fraction: float = 0.9, scheduler_cls=None,
                 check: bool = True, **scheduler_kwargs):
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if scheduler_cls is None:
            from esp_kernels.scheduler import ESPScheduler as scheduler_cls
        self.cost_model, self.num_instances = cost_model, num_instances
        self.kv_slots = (kv_slots_per_instance if kv_slots_per_instance is not None
                         else kv_capacity_tokens(cost_model, gpu_mem_gib, mem_fraction))
        self.sched = scheduler_cls(num_instances, self.kv_slots, cost_model, **scheduler_kwargs)
        self.scheduler_name = scheduler_cls.__name__
        self.check = check
        self.idle = num_instances

    def describe(self) -> str:
        return f"esp({self.scheduler_name}, N={self.num_instances})"

    def on_arrival(self, request, now):
        self.sched.add_request(request.rid, request.prompt_len, request.output_len, arrival=now)

    def schedule(self, now):
        if self.idle == 0:
            return []
        launches = []
        # A plan may hold only migrations / preemptions; its effects can enable batches, so ask again
        # (bounded: a scheduler that keeps answering with batch-less plans is reported as stalled).
        for _ in range(self.MAX_BATCHLESS_PLANS):
            plan = self.sched.schedule(now=now)
            if plan.empty:
                break
            launches += self._launch(plan, now)
            if launches or self.idle == 0:
                break
        return launches

    def _launch(self, plan, now):
        for rid in plan.preemptions:
            self.rec.preempted(rid)
        delay = {}
        for m in plan.migrations:
            t = self.cost_model.migration_time(m.end - m.start)
            delay[m.src] = delay.get(m.src, 0.0) + t
            delay[m.dst] = delay.get(m.dst, 0.0) + t
        launches = []
        for kind, batches in (("prefill", plan.prefills), ("decode", plan.decodes)):
            for b in batches:
                extra = max((delay.get(i, 0.0) for i in b.instances), default=0.0) if delay else 0.0
                launches.append(Launch(b.instances, now, now + extra + b.predicted_time, kind, b))
                self.idle -= len(b.instances)
        return launches

    def on_complete(self, launch, now):
        batch = launch.payload
        self.sched.update(batch, now=now)
        self.idle += len(launch.instances)
        finished = self.rec.tokens(batch.requests, now)
        # Checked at the last token only (one call per request, not per step): a scheduler that
        # finished a request early never schedules it again, so the run ends with it unfinished; one
        # that runs it too long trips the recorder's token-after-finish check.
        if self.check:
            for rid in finished:
                if self.sched.state(rid) != "finished":
                    raise SimulationError(f"request {rid} generated its {self.rec.output_len[rid]} tokens "
                                          f"but the scheduler says {self.sched.state(rid)!r}")

    def kv_used(self, instance):
        return self.sched.kv_used(instance)

    def kv_capacity(self, instance):
        return self.kv_slots
