"""Workload generators reproduce their documented statistics; arrivals; trace files round-trip."""

import json

import numpy as np
import pytest

from esp_kernels.sim import workloads as W
from esp_kernels.sim.workloads import (DOCUMENTED_STATS, WORKLOADS, Request, arrival_times, load_trace,
                                       make_requests, sample_lengths, save_trace)

N = 100_000


@pytest.mark.parametrize("workload", WORKLOADS)
def test_deterministic_for_a_seed(workload):
    p1, o1 = sample_lengths(workload, 2000, seed=7)
    p2, o2 = sample_lengths(workload, 2000, seed=7)
    p3, _ = sample_lengths(workload, 2000, seed=8)
    assert np.array_equal(p1, p2) and np.array_equal(o1, o2)
    assert not np.array_equal(p1, p3)
    assert p1.dtype == np.int64 and (p1 >= 1).all() and (o1 >= 1).all()


def test_sharegpt_turns_and_filters():
    rng = np.random.default_rng(0)
    human = W._sharegpt_turns(rng, N, W.SHAREGPT_HUMAN_TURN_MEAN, W.SHAREGPT_HUMAN_SIGMA)
    gpt = W._sharegpt_turns(rng, N, W.SHAREGPT_GPT_TURN_MEAN, W.SHAREGPT_GPT_SIGMA)
    stats = DOCUMENTED_STATS["sharegpt"]
    assert human.mean() == pytest.approx(stats["human_turn_mean"], rel=0.03)
    assert gpt.mean() == pytest.approx(stats["gpt_turn_mean"], rel=0.02)
    p, o = sample_lengths("sharegpt", N, seed=1)
    assert o.max() < stats["output_max_exclusive"] and (p + o).max() < stats["total_max_exclusive"]
    assert min(p.min(), o.min()) >= stats["min_len"]
    # prompts join k >= 1 turns, so they are longer on average than one human turn
    assert p.mean() > stats["human_turn_mean"]


def test_leval_matches_published_range_and_mean():
    p, o = sample_lengths("leval", N, seed=2)
    s = DOCUMENTED_STATS["leval"]
    assert p.mean() == pytest.approx(s["prompt_mean"], rel=0.03)
    assert s["prompt_range"][0] <= p.min() and p.max() <= s["prompt_range"][1]
    assert o.mean() == pytest.approx(s["output_mean"], rel=0.03)
    assert s["output_range"][0] <= o.min() and o.max() <= s["output_range"][1]


def test_lveval_levels_mean_and_range():
    p, o = sample_lengths("lveval", N, seed=3)
    s = DOCUMENTED_STATS["lveval"]
    assert p.mean() == pytest.approx(s["prompt_mean"], rel=0.02)
    lo, hi = s["prompt_range"]
    assert lo - 1 <= p.min() and p.max() <= hi + 1
    levels = np.array(s["level_medians"])
    nearest = np.abs(np.log(p[:, None] / levels[None, :])).argmin(axis=1)
    share = np.bincount(nearest, minlength=levels.size) / p.size
    assert np.allclose(share, 0.2, atol=0.01), share          # equal counts per level
    for k, level in enumerate(levels):                          # each level centred near its size
        assert np.median(p[nearest == k]) == pytest.approx(level, rel=0.05)
    assert o.mean() == pytest.approx(s["output_mean"], rel=0.03)
    assert s["output_range"][0] <= o.min() and o.max() <= s["output_range"][1]


def test_mixed_is_equal_parts():
    n = 30_000
    p, o = sample_lengths("mixed", n, seed=4)
    parts = [sample_lengths(w, n, seed=4) for w in ("sharegpt", "leval", "lveval")]
    assert p.mean() == pytest.approx(np.mean([q.mean() for q, _ in parts]), rel=0.03)
    assert o.mean() == pytest.approx(np.mean([q.mean() for _, q in parts]), rel=0.03)
    # a third of the requests are LV-Eval-long (> L-Eval's 200k-token maximum is rarer; use the
    # LV-Eval minimum, which only a few L-Eval prompts exceed)
    lv_min = DOCUMENTED_STATS["lveval"]["prompt_range"][0]
    frac_long = (p >= lv_min).mean()
    leval_long = (parts[1][0] >= lv_min).mean()
    assert frac_long == pytest.approx(1 / 3 + leval_long / 3, abs=0.01)


@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.4])
def test_zipf_prompt_cdf(alpha):
    p, _ = sample_lengths(f"zipf{alpha}", N, seed=5)
    lo, hi = DOCUMENTED_STATS["zipf"]["prompt_range"]
    x = np.arange(lo, hi, dtype=np.float64)
    cdf = np.cumsum(x ** -alpha)
    cdf /= cdf[-1]
    for length in (100, 1000, 10_000, 100_000):
        assert (p <= length).mean() == pytest.approx(cdf[length - lo], abs=0.01)


def test_bad_workload_and_n():
    with pytest.raises(ValueError, match="workload"):
        sample_lengths("alpaca", 10)
    with pytest.raises(ValueError, match="n must"):
        sample_lengths("sharegpt", -1)


def test_poisson_and_gamma_arrivals():
    rate = 4.0
    t = arrival_times(N, rate, seed=0)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)
    g = np.diff(np.concatenate([[0.0], arrival_times(N, rate, seed=0, cv=3.0)]))
    assert g.mean() == pytest.approx(1 / rate, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(3.0, rel=0.05)
    # common random numbers: the same seed at twice the rate halves every arrival time
    assert np.allclose(arrival_times(100, 2 * rate, seed=9), arrival_times(100, rate, seed=9) / 2)
    with pytest.raises(ValueError, match="rate"):
        arrival_times(10, 0.0)
    with pytest.raises(ValueError, match="cv"):
        arrival_times(10, 1.0, cv=0)


def test_make_requests_same_lengths_at_every_rate():
    a, b = make_requests("leval", 50, 1.0, seed=3), make_requests("leval", 50, 5.0, seed=3)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert [r.rid for r in a] == list(range(50))
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_trace_round_trip(tmp_path, ext):
    reqs = make_requests("mixed", 300, 0.7, seed=11)
    path = str(tmp_path / f"t.{ext}")
    save_trace(reqs, path)
    assert load_trace(path) == reqs


def test_trace_sorted_and_validated(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"arrival": 2.5, "prompt_len": 10, "output_len": 3}, {"arrival": 0.5, "prompt_len": 7, "output_len": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_trace(str(path)) == [Request(0, 0.5, 7, 1), Request(1, 2.5, 10, 3)]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,prompt_len\n0.1,5\n")
    with pytest.raises(ValueError, match="line 2"):
        load_trace(str(bad))
    neg = tmp_path / "neg.csv"
    neg.write_text("arrival,prompt_len,output_len\n0.1,0,5\n")
    with pytest.raises(ValueError, match="lengths >= 1"):
        load_trace(str(neg))
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        load_trace(str(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        save_trace([], str(tmp_path / "t.parquet"))
