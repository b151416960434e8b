"""Serving metrics of a simulation: latencies, SLO attainment, the max rate at 90% attainment,
utilization and KV occupancy.

Definitions (times in s, per request; output_len = tokens generated, prompt_len = input tokens):
    TTFT              first token time - arrival
    TPOT              (finish - first token) / (output_len - 1)   (undefined for output_len = 1)
    per-token latency     (finish - arrival) / (prompt_len + output_len)
    input-token latency   TTFT / prompt_len
    output-token latency  (finish - arrival) / output_len
    SLO (LoongServe §6, the issue): TTFT <= max(25 x solo prefill time, 15 s) and TPOT <= 50 ms,
        where the solo prefill time is cost_model.prefill_time(1, [prompt_len]): the request alone
        on one instance, the same yardstick for every policy. A request with output_len = 1 meets
        the TPOT part; an unfinished request (cut off by max_time) meets nothing.
    attainment        fraction of all requests that meet the SLO
    throughput        finished requests / (end of the run - first arrival)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SLO", "solo_prefill_times", "request_latencies", "slo_met", "summarize", "utilization",
           "kv_occupancy", "max_rate_at_attainment", "PERCENTILES"]

PERCENTILES = (50, 90, 99)


class SLO:
    """The paper's SLO; fields may be changed for what-if studies."""

    def __init__(self, ttft_scale: float = 25.0, ttft_floor_s: float = 15.0, tpot_s: float = 0.050):
        self.ttft_scale, self.ttft_floor_s, self.tpot_s = ttft_scale, ttft_floor_s, tpot_s

    def __repr__(self):
        return f"SLO(TTFT <= max({self.ttft_scale} x solo prefill, {self.ttft_floor_s} s), TPOT <= {self.tpot_s} s)"


def solo_prefill_times(requests, cost_model) -> np.ndarray:
    """cost_model.prefill_time(1, [prompt_len]) per request (s, float64 [n]); one call per distinct length."""
    cache = {}
    out = np.empty(len(requests))
    for i, r in enumerate(requests):
        t = cache.get(r.prompt_len)
        if t is None:
            t = cache[r.prompt_len] = cost_model.prefill_time(1, [r.prompt_len])
        out[i] = t
    return out


def request_latencies(result) -> dict:
    """Per-request arrays (float64 [n], nan where undefined or unfinished): ttft, tpot, e2e,
    per_token, input_token, output_token."""
    reqs = result.requests
    arrival = np.array([r.arrival for r in reqs], dtype=np.float64)
    prompt = np.array([r.prompt_len for r in reqs], dtype=np.float64)
    output = np.array([r.output_len for r in reqs], dtype=np.float64)
    ttft = result.first_token - arrival
    e2e = result.finish - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(output > 1, (result.finish - result.first_token) / (output - 1), np.nan)
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "per_token": e2e / (prompt + output),
            "input_token": ttft / prompt, "output_token": e2e / output}


def slo_met(result, solo: np.ndarray, slo: SLO | None = None) -> np.ndarray:
    """bool [n]: which requests met the SLO (see the module docstring)."""
    slo = slo or SLO()
    lat = request_latencies(result)
    finished = ~np.isnan(result.finish)
    ttft_ok = lat["ttft"] <= np.maximum(slo.ttft_scale * solo, slo.ttft_floor_s)
    tpot_ok = np.isnan(lat["tpot"]) | (lat["tpot"] <= slo.tpot_s)
    return finished & ttft_ok & tpot_ok


def utilization(result) -> np.ndarray:
    """Busy fraction per instance over [first arrival, end of run] (float64 [N])."""
    start = result.requests[0].arrival if result.requests else 0.0
    span = result.end_time - start
    return result.busy_time / span if span > 0 else np.zeros_like(result.busy_time)


def kv_occupancy(result):
    """Per instance: (times [k], fraction of KV capacity used [k]) sampled at its batch completions
    (needs record_timeline=True)."""
    out = []
    for i, samples in enumerate(result.kv_samples):
        arr = np.array(samples, dtype=np.float64).reshape(-1, 2)
        out.append((arr[:, 0], arr[:, 1] / result.kv_capacity[i]))
    return out


def _pct(x, name):
    x = x[~np.isnan(x)]
    return {f"{name}_p{p}": (float(np.percentile(x, p)) if x.size else math.nan) for p in PERCENTILES} | \
        {f"{name}_mean": float(x.mean()) if x.size else math.nan}


def summarize(result, solo: np.ndarray, slo: SLO | None = None) -> dict:
    """One flat row of numbers for a run (the table's columns)."""
    reqs = result.requests
    n = len(reqs)
    done = ~np.isnan(result.finish)
    start = reqs[0].arrival if reqs else 0.0
    span = max(result.end_time - start, 1e-12)
    out_tokens = float(np.sum([r.output_len for r, d in zip(reqs, done) if d]))
    lat = request_latencies(result)
    row = {"requests": n, "finished": int(done.sum()), "unfinished": int(n - done.sum()),
           "throughput_rps": float(done.sum()) / span, "output_tok_s": out_tokens / span,
           "attainment": float(slo_met(result, solo, slo).mean()) if n else math.nan,
           "preemptions": int(result.preemptions.sum()),
           "utilization_mean": float(utilization(result).mean()),
           "utilization_min": float(utilization(result).min()), "events": result.num_events}
    if result.kv_peak is not None and result.kv_capacity is not None:
        row["kv_peak_fraction"] = float(np.max(result.kv_peak / result.kv_capacity))
    for name in ("ttft", "tpot", "per_token", "input_token", "output_token"):
        row |= _pct(lat[name], name)
    return row


def max_rate_at_attainment(evaluate, rates, target: float = 0.9, bisect_steps: int = 4, progress=None):
    """Largest request rate whose SLO attainment is >= target.

    evaluate(rate) -> attainment. The ascending `rates` are swept until the first one that misses the
    target; then `bisect_steps` bisections between the last rate that met it and that one narrow the
    answer (attainment is assumed to fall with the rate; the sweep reports every point so a
    non-monotone curve is visible). Returns {"max_rate", "bracket": (met, missed), "points":
    [(rate, attainment), ...]}; max_rate is 0.0 when even the smallest rate misses, and the bracket's
    upper end is inf when every rate met the target (max_rate is then a lower bound).
    """
    rates = sorted(float(r) for r in rates)
    if not rates or rates[0] <= 0:
        raise ValueError(f"rates must be a non-empty list of positive numbers, got {rates}")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    points, lo, hi = [], 0.0, math.inf
    total = len(rates) + bisect_steps
    for r in rates:
        a = evaluate(r)
        points.append((r, a))
        if progress:
            progress(len(points) / total)
        if a >= target:
            lo = r
        else:
            hi = r
            break
    if hi < math.inf and lo > 0:
        for _ in range(bisect_steps):
            mid = 0.5 * (lo + hi)
            a = evaluate(mid)
            points.append((mid, a))
            if progress:
                progress(len(points) / total)
            lo, hi = (mid, hi) if a >= target else (lo, mid)
    return {"max_rate": lo, "bracket": (lo, hi), "points": points}
