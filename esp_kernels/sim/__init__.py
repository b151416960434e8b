"""Discrete-event serving simulator (docs/DESIGN.md §9): the ESP scheduler and the baselines (static SP,
chunked prefill, disaggregation) on the paper's workloads, timed by the cost model.

    from esp_kernels.sim import make_requests, make_policy, run_point
    reqs = make_requests("sharegpt", 1000, rate=10.0, seed=0)
    result, row = run_point(make_policy("esp", cost_model, 8), reqs, cost_model)

Command line: python -m esp_kernels simulate --help. Pure Python + numpy; the `esp` policy imports
esp_kernels.scheduler when it is built, so this package imports without it.
"""

from .baselines import CHUNK_SIZES, ChunkedPrefillPolicy, DisaggregatedPolicy, StaticSPPolicy
from .engine import Launch, Policy, SimResult, SimulationError, Simulator, kv_capacity_tokens
from .esp_policy import ESPPolicy
from .metrics import SLO, max_rate_at_attainment, slo_met, solo_prefill_times, summarize
from .runner import POLICIES, find_max_rate, make_policy, rescale_arrivals, run_point, slo_horizon
from .workloads import WORKLOADS, Request, arrival_times, load_trace, make_requests, sample_lengths, save_trace

__all__ = ["CHUNK_SIZES", "ChunkedPrefillPolicy", "DisaggregatedPolicy", "StaticSPPolicy", "Launch",
           "Policy", "SimResult", "SimulationError", "Simulator", "kv_capacity_tokens", "ESPPolicy", "SLO",
           "max_rate_at_attainment", "slo_met", "solo_prefill_times", "summarize", "POLICIES",
           "find_max_rate", "make_policy", "rescale_arrivals", "run_point", "slo_horizon", "WORKLOADS",
           "Request", "arrival_times", "load_trace", "make_requests", "sample_lengths", "save_trace"]
