"""N virtual instances on one device: one Engine each, one shared copy of the weights.

`VirtualCluster.execute(plan)` runs an iteration on every engine with the same phases as
`Engine.execute` (which a process per GPU calls instead): the blocking phases (migration, ring
prefill) in one thread per instance (esp.comm.run_local), the decode and token exchange as step
generators of all instances in the calling thread (esp.comm.run_steps: rank threads would
contend for the GIL on every decode layer).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .. import comm
from ..comm.group import DEFAULT_TIMEOUT_S, CommError
from .engine import Engine, IterationResult
from .sampling import sample


@dataclasses.dataclass
class PhaseTimes:
    """Host wall seconds of each phase of one iteration (the last ends with a device sync:
    the token exchange reads the sampled tokens)."""
    migrate: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    exchange: float = 0.0

    @property
    def total(self) -> float:
        return self.migrate + self.prefill + self.decode + self.exchange


class VirtualCluster:
    """num_instances engines on `adapter.device` sharing `adapter`; each has a cache of
    kv_slots_per_instance token slots in pages of page_size; timeout: seconds an instance may
    wait on another before CommTimeout; cuda_graphs: decode steps' dense work as CUDA graphs
    (runtime.graphs; CUDA only)."""

    def __init__(self, adapter, num_instances: int, kv_slots_per_instance: int,
                 page_size: int = 16, sampler=sample, timeout: float = DEFAULT_TIMEOUT_S,
                 cuda_graphs: bool = True):
        if not isinstance(num_instances, int) or num_instances < 1:
            raise ValueError(f"num_instances must be an int >= 1, got {num_instances!r}")
        self.adapter = adapter
        self.groups = comm.local_group(num_instances, adapter.device, timeout)
        self.engines = [Engine.create(g, adapter, kv_slots_per_instance, page_size, sampler,
                                      cuda_graphs) for g in self.groups]
        self.page_size = page_size
        self.last_times = PhaseTimes()

    @property
    def num_instances(self) -> int:
        return len(self.engines)

    def add_request(self, rid, prompt, max_new_tokens, sampling=None):
        for e in self.engines:
            e.add_request(rid, prompt, max_new_tokens, sampling)

    def state(self, rid):
        """The request's state (identical on every engine; engine 0's copy)."""
        return self.engines[0].requests[rid]

    def _run_local(self, fn) -> None:
        """fn(engine) on every instance, a thread each. An instance that fails leaves its peers
        waiting until they time out, and run_local raises the first error by rank, maybe a
        peer's timeout: the failure itself is raised instead."""
        causes: list = []

        def body(group, engine):
            try:
                fn(engine)
            except CommError:
                raise
            except BaseException as exc:
                causes.append(exc)
                raise
        try:
            comm.run_local(self.groups, body, self.engines)
        except CommError as exc:
            if causes:
                raise causes[0] from exc
            raise

    def execute(self, plan) -> IterationResult:
        times = self.last_times = PhaseTimes()
        for e in self.engines:
            e.begin(plan)
        t = time.perf_counter()
        if plan.migrations:
            self._run_local(lambda e: e.migrate(plan))
            times.migrate = time.perf_counter() - t
            t = time.perf_counter()
        if plan.prefills:
            self._run_local(lambda e: e.prefill(plan))
            times.prefill = time.perf_counter() - t
            t = time.perf_counter()
        if plan.decodes:
            comm.run_steps(self.groups, [e.decode_steps(plan) for e in self.engines])
            times.decode = time.perf_counter() - t
            t = time.perf_counter()
        results = comm.run_steps(self.groups, [e.exchange_steps(plan) for e in self.engines])
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        times.exchange = time.perf_counter() - t
        first = results[0]
        for r, res in enumerate(results[1:], 1):
            if res.tokens != first.tokens:   # the exchange replicates state: a bug otherwise
                raise RuntimeError(f"instance {r} saw tokens {res.tokens} after the exchange, "
                                   f"instance 0 {first.tokens}")
        return first
