"""Building policies by name and running them over workloads and rates."""

from __future__ import annotations

import numpy as np

from .baselines import CHUNK_SIZES, ChunkedPrefillPolicy, DisaggregatedPolicy, StaticSPPolicy
from .engine import Simulator
from .esp_policy import ESPPolicy
from .metrics import SLO, max_rate_at_attainment, slo_met, solo_prefill_times, summarize
from .workloads import Request, make_requests

__all__ = ["POLICIES", "make_policy", "slo_horizon", "run_point", "rescale_arrivals", "find_max_rate",
           "requests_for_rate"]

# A max-rate search needs runs long against the 15 s TTFT floor of the SLO: with a fixed request count,
# a high rate only sees a burst that drains within the floor and "meets" the SLO at any rate (100
# ShareGPT requests passed at 1280 req/s on the fake cost model). 120 s is 8 floors.
MIN_DURATION_S = 120.0

POLICIES = ("esp", "static_sp", "chunked_prefill", "disaggregated")


def make_policy(name: str, cost_model, num_instances: int = 8, workload: str | None = None,
                gpu_mem_gib: float = 80.0, mem_fraction: float = 0.9, scheduler_cls=None, **options):
    """A fresh policy object. options: esp -> scheduler keyword arguments; static_sp /
    chunked_prefill -> tp (replica size), chunked_prefill also chunk_size (default CHUNK_SIZES of
    the workload); disaggregated -> prefill_instances, prefill_tp, decode_tp."""
    mem = dict(gpu_mem_gib=gpu_mem_gib, mem_fraction=mem_fraction)
    if name == "esp":
        return ESPPolicy(cost_model, num_instances, scheduler_cls=scheduler_cls, **mem, **options)
    if name == "static_sp":
        return StaticSPPolicy(cost_model, num_instances, **mem, **options)
    if name == "chunked_prefill":
        options.setdefault("chunk_size", CHUNK_SIZES.get(workload, 2048))
        return ChunkedPrefillPolicy(cost_model, num_instances, **mem, **options)
    if name == "disaggregated":
        return DisaggregatedPolicy(cost_model, num_instances, **mem, **options)
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")


def slo_horizon(requests, solo, slo: SLO) -> float:
    """A time after which no still-unfinished request can meet the SLO: the latest arrival + the
    largest TTFT bound + the longest output x the TPOT bound. Cutting a run there leaves the SLO
    attainment exact (only the latency percentiles of the cut requests are lost)."""
    if not requests:
        return 0.0
    ttft = float(np.max(np.maximum(slo.ttft_scale * solo, slo.ttft_floor_s)))
    out = max(r.output_len for r in requests)
    return max(r.arrival for r in requests) + ttft + out * slo.tpot_s + 1.0


def rescale_arrivals(requests, rate: float):
    """The same requests with arrival gaps scaled so their mean rate is `rate` requests/s."""
    if len(requests) < 2:
        return list(requests)
    span = requests[-1].arrival - requests[0].arrival
    if span <= 0:
        raise ValueError("cannot rescale a trace whose requests all arrive at once")
    k = (len(requests) - 1) / span / rate
    t0 = requests[0].arrival
    return [Request(r.rid, (r.arrival - t0) * k, r.prompt_len, r.output_len) for r in requests]


def run_point(policy, requests, cost_model, slo: SLO | None = None, cut_at_horizon: bool = True,
              check: bool = True, record_timeline: bool = False, progress=None):
    """Simulate one (policy, requests) point: (SimResult, summary row)."""
    slo = slo or SLO()
    solo = solo_prefill_times(requests, cost_model)
    max_time = slo_horizon(requests, solo, slo) if cut_at_horizon else None
    result = Simulator(policy, requests, max_time=max_time, check=check,
                       record_timeline=record_timeline).run(progress=progress)
    return result, summarize(result, solo, slo)


def find_max_rate(policy_factory, requests_at, cost_model, rates, target=0.9, slo=None,
                  bisect_steps=4, progress=None):
    """max_rate_at_attainment over simulations: policy_factory() -> a fresh policy, requests_at(rate)
    -> the requests at that rate."""
    slo = slo or SLO()

    def attainment(rate):
        reqs = requests_at(rate)
        result = Simulator(policy_factory(), reqs, max_time=None, check=False, record_timeline=False)
        solo = solo_prefill_times(reqs, cost_model)
        result.max_time = slo_horizon(reqs, solo, slo)
        return float(slo_met(result.run(), solo, slo).mean())

    return max_rate_at_attainment(attainment, rates, target, bisect_steps, progress)


def requests_for_rate(workload: str, rate: float, seed: int = 0, cv: float = 1.0, min_requests: int = 200,
                      min_duration_s: float = MIN_DURATION_S, max_requests: int = 20_000):
    """Requests of `workload` at `rate`: enough to span min_duration_s of arrivals (at least
    min_requests, at most max_requests)."""
    n = int(min(max(min_requests, rate * min_duration_s), max_requests))
    return make_requests(workload, n, rate, seed, cv)
