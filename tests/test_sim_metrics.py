"""SLO, latency and max-rate math on hand-made cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from esp_kernels.sim.engine import SimResult
from esp_kernels.sim.metrics import (SLO, max_rate_at_attainment, request_latencies, slo_met, summarize,
                                     utilization)
from esp_kernels.sim.runner import slo_horizon
from esp_kernels.sim.workloads import Request

nan = math.nan


def _result(reqs, first, finish, busy=(1.0, 3.0), end=10.0):
    n = len(reqs)
    return SimResult(policy="hand", num_instances=len(busy), requests=reqs,
                     first_token=np.array(first, float), finish=np.array(finish, float),
                     generated=np.array([r.output_len if not math.isnan(f) else 0 for r, f in zip(reqs, finish)]),
                     preemptions=np.zeros(n, int), end_time=end, busy_time=np.array(busy, float),
                     num_events=0)


REQS = [Request(0, 0.0, 100, 11),       # TTFT 1, TPOT (6-1)/10 = 0.5  -> misses TPOT
        Request(1, 1.0, 1000, 1),       # TTFT 19, output 1            -> misses TTFT (bound 15)
        Request(2, 2.0, 4000, 101),     # TTFT 20 <= 25 x 1.0 = 25; TPOT 4/100 = 0.04 -> meets
        Request(3, 3.0, 10, 5)]         # unfinished                   -> misses
FIRST = [1.0, 20.0, 22.0, nan]
FINISH = [6.0, 20.0, 26.0, nan]
SOLO = np.array([0.01, 0.1, 1.0, 0.001])


def test_latencies_by_definition():
    lat = request_latencies(_result(REQS, FIRST, FINISH))
    assert np.allclose(lat["ttft"][:3], [1.0, 19.0, 20.0])
    assert lat["tpot"][0] == pytest.approx(0.5) and math.isnan(lat["tpot"][1])
    assert lat["tpot"][2] == pytest.approx(0.04)
    assert lat["per_token"][0] == pytest.approx(6.0 / 111)
    assert lat["input_token"][2] == pytest.approx(20.0 / 4000)
    assert lat["output_token"][2] == pytest.approx(24.0 / 101)
    assert all(math.isnan(lat[k][3]) for k in lat)


def test_slo_definition():
    met = slo_met(_result(REQS, FIRST, FINISH), SOLO)
    assert met.tolist() == [False, False, True, False]
    # the TTFT floor: 19 s misses max(25 x 0.1, 15) = 15 s but meets a 20 s floor
    assert slo_met(_result(REQS, FIRST, FINISH), SOLO, SLO(ttft_floor_s=20.0)).tolist() == [False, True, True, False]
    # the 25x scale: request 2 with a solo time of 0.7 s (bound 17.5 s) misses
    assert not slo_met(_result(REQS, FIRST, FINISH), np.array([0.01, 0.1, 0.7, 0.001]))[2]
    # the TPOT bound: request 0 meets a 0.5 s TPOT SLO
    assert slo_met(_result(REQS, FIRST, FINISH), SOLO, SLO(tpot_s=0.5))[0]


def test_summary_row():
    row = summarize(_result(REQS, FIRST, FINISH), SOLO)
    assert row["attainment"] == pytest.approx(0.25)
    assert row["finished"] == 3 and row["unfinished"] == 1
    assert row["throughput_rps"] == pytest.approx(3 / 10.0)
    assert row["output_tok_s"] == pytest.approx((11 + 1 + 101) / 10.0)
    assert row["ttft_p50"] == pytest.approx(19.0)
    assert row["tpot_mean"] == pytest.approx((0.5 + 0.04) / 2)
    assert np.allclose(utilization(_result(REQS, FIRST, FINISH)), [0.1, 0.3])


def test_max_rate_bisection():
    calls = []

    def att(rate):
        calls.append(rate)
        return 0.95 if rate <= 3.3 else 0.5

    out = max_rate_at_attainment(att, [1, 2, 4, 8], bisect_steps=6)
    assert calls[:3] == [1, 2, 4]                         # stops at the first miss
    assert out["bracket"][0] <= 3.3 < out["bracket"][1]
    assert out["bracket"][1] - out["bracket"][0] == pytest.approx(2 / 2 ** 6)
    assert out["max_rate"] == out["bracket"][0]
    every = max_rate_at_attainment(lambda r: 1.0, [1, 2])
    assert every["max_rate"] == 2 and every["bracket"][1] == math.inf
    none = max_rate_at_attainment(lambda r: 0.0, [1, 2])
    assert none["max_rate"] == 0.0 and len(none["points"]) == 1
    with pytest.raises(ValueError, match="rates"):
        max_rate_at_attainment(att, [])
    with pytest.raises(ValueError, match="target"):
        max_rate_at_attainment(att, [1], target=1.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(1, 300_000), st.integers(1, 2000)), min_size=1,
                max_size=20),
       st.floats(0, 1), st.floats(0, 1))
def test_a_request_meeting_the_slo_finishes_before_the_horizon(specs, u_ttft, u_tpot):
    """slo_horizon is a safe cut-off: a request that meets its SLO is done by then."""
    specs.sort()
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(specs)]
    solo = np.array([1e-5 * r.prompt_len for r in reqs])
    slo = SLO()
    horizon = slo_horizon(reqs, solo, slo)
    for r, s in zip(reqs, solo):
        ttft = u_ttft * max(slo.ttft_scale * s, slo.ttft_floor_s)      # any TTFT within the bound
        finish = r.arrival + ttft + (r.output_len - 1) * u_tpot * slo.tpot_s
        assert finish < horizon


def test_requests_for_rate_spans_the_duration():
    from esp_kernels.sim.runner import requests_for_rate
    few = requests_for_rate("sharegpt", 0.5, min_requests=50, min_duration_s=120)
    assert len(few) == 60 and few[-1].arrival == pytest.approx(120, rel=0.3)
    assert len(requests_for_rate("sharegpt", 0.1, min_requests=50, min_duration_s=120)) == 50
    assert len(requests_for_rate("sharegpt", 1e6, min_requests=50, max_requests=500)) == 500


def test_rescale_arrivals_keeps_the_pattern():
    from esp_kernels.sim.runner import rescale_arrivals
    reqs = [Request(0, 10.0, 5, 5), Request(1, 11.0, 6, 6), Request(2, 14.0, 7, 7)]
    out = rescale_arrivals(reqs, 2.0)              # 2 gaps over 4 s = 0.5 req/s -> 2 req/s
    assert [r.arrival for r in out] == pytest.approx([0.0, 0.25, 1.0])
    assert [(r.prompt_len, r.output_len) for r in out] == [(5, 5), (6, 6), (7, 7)]
    with pytest.raises(ValueError, match="all arrive at once"):
        rescale_arrivals([Request(0, 1.0, 1, 1), Request(1, 1.0, 1, 1)], 1.0)
