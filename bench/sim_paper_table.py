"""The paper-shaped result: ESP vs each baseline, max request rate at 90% SLO attainment, per
workload, 8 instances, next to LoongServe's reported ratios (arXiv 2404.09526: up to 3.85x chunked
prefill and 5.81x prefill/decode disaggregation, best case over its workloads).

Like the paper, each baseline is reported at its best configuration: every configuration below is
simulated and the one with the highest max rate kept (configurations that cannot hold a workload's
longest request on one replica are skipped). Max rate: a doubling sweep from a quarter of the
workload's first default rate (from 1/256 of it if that already misses) until attainment drops
below 90%, then bisection
(esp_kernels.sim.find_max_rate); every point simulates at least --requests requests and --duration
seconds of arrivals (">=" marks a rate that never missed: a lower bound).

Writes OUT/paper_table.md, OUT/paper_table.json and OUT/cost_model.json (the cost model used, so the
table can be reproduced). Needs esp_kernels.scheduler (the esp policy and CostModel); --fake runs the
test doubles of tests/sim_fakes.py instead (a smoke test of this script, not a result).

    PYTHONPATH=$PWD python bench/sim_paper_table.py [--cost-model FILE] [--requests 1000]
        [--workloads sharegpt,leval,lveval,mixed] [--out bench/results/sim_paper_DATE] [--quick] [--fake]
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from esp_kernels.sim import find_max_rate, make_policy  # noqa: E402
from esp_kernels.sim.runner import requests_for_rate  # noqa: E402
from esp_kernels.sim.cli import DEFAULT_RATES  # noqa: E402
from esp_kernels.sim.report import Progress  # noqa: E402

PAPER_RATIO = {"chunked_prefill": 3.85, "disaggregated": 5.81}
N = 8
CONFIGS = {
    "esp": [{}],
    # tp 1: eight independent 1-GPU replicas (vLLM-style data parallelism, each prefilling and
    # decoding its own requests): on ShareGPT they hold 160 req/s at 99.1% attainment, far above
    # the TP 2/4/8 configurations (90 req/s in the v2 table), so a fair table must sweep it.
    "static_sp": [{"tp": t} for t in (1, 2, 4, 8)],
    "chunked_prefill": [{"tp": t} for t in (1, 2, 4, 8)],
    "disaggregated": [{"prefill_instances": p, "prefill_tp": pt, "decode_tp": dt}
                      for p, pt, dt in ((4, 4, 4), (4, 2, 2), (4, 1, 1), (2, 2, 6), (6, 6, 2), (6, 2, 2))],
}


def rate_grid(start, doublings):
    return [start * 2 ** k for k in range(doublings + 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost-model", default=None)
    ap.add_argument("--requests", type=int, default=1000, help="at least this many requests per point")
    ap.add_argument("--duration", type=float, default=120.0, help="and at least this many seconds of "
                    "arrivals per point (s)")
    ap.add_argument("--workloads", default="sharegpt,leval,lveval,mixed")
    ap.add_argument("--out", default=os.path.join("bench", "results",
                                                  f"sim_paper_{datetime.date.today().isoformat()}"))
    ap.add_argument("--quick", action="store_true", help="100 requests, 2 bisection steps, first configs only")
    ap.add_argument("--fake", action="store_true", help="test doubles instead of the real scheduler (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = 100 if args.quick else args.requests
    if args.quick:
        args.duration = 30.0
    steps = 2 if args.quick else 4

    if args.fake:
        from sim_fakes import FakeCostModel, FakeScheduler
        cm, sched_cls, source = FakeCostModel(), FakeScheduler, "TEST DOUBLES (not a result)"
    else:
        from esp_kernels.scheduler import CostModel, ESPScheduler
        cm = CostModel.load(args.cost_model) if args.cost_model else CostModel.default()
        sched_cls, source = ESPScheduler, args.cost_model or "CostModel.default()"
    os.makedirs(args.out, exist_ok=True)
    if hasattr(cm, "save"):
        cm.save(os.path.join(args.out, "cost_model.json"))

    table = []
    for wl in args.workloads.split(","):
        reqs_at = lambda rate, wl=wl: requests_for_rate(wl, rate, args.seed, min_requests=n,
                                                        min_duration_s=args.duration)
        best = {}
        for pol, configs in CONFIGS.items():
            for opts in configs[:1] if args.quick else configs:
                factory = lambda pol=pol, opts=opts: make_policy(pol, cm, N, workload=wl,
                                                                 scheduler_cls=sched_cls, **opts)
                try:
                    desc = factory().describe()
                    bar = Progress(f"{wl} {desc}")
                    start = DEFAULT_RATES[wl][0] / 4
                    found = find_max_rate(factory, reqs_at, cm, rate_grid(start, 10), bisect_steps=steps,
                                          progress=bar)
                    if found["max_rate"] == 0.0:      # even the first rate missed: sweep lower
                        found = find_max_rate(factory, reqs_at, cm, rate_grid(start / 64, 6),
                                              bisect_steps=steps, progress=bar)
                    bar.done()
                except ValueError as e:       # a replica cannot hold the longest request
                    print(f"  skip {wl} {pol} {opts}: {e}", file=sys.stderr)
                    continue
                rec = {"config": desc, "max_rate": found["max_rate"], "bracket": found["bracket"],
                       "points": found["points"]}
                if pol not in best or rec["max_rate"] > best[pol]["max_rate"]:
                    best[pol] = rec
        table.append({"workload": wl, "best": best})

    lines = [f"# ESP vs baselines: max rate at 90% SLO attainment, {N} instances, {n} requests per point",
             "", f"cost model: {source}; SLO: TTFT <= max(25 x solo prefill, 15 s), TPOT <= 50 ms", "",
             "| workload | esp (req/s) | static_sp best | esp / static_sp | chunked_prefill best | "
             "esp / chunked (paper: up to 3.85x) | disaggregated best | esp / disagg (paper: up to 5.81x) |",
             "|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if b > 0 else "inf"
    for row in table:
        b = row["best"]
        esp = b.get("esp", {}).get("max_rate", 0.0)
        lower = ">= " if b.get("esp", {}).get("bracket", (0, 0))[1] == float("inf") else ""
        cells = [row["workload"], f"{lower}{esp:.3g}"]
        for pol in ("static_sp", "chunked_prefill", "disaggregated"):
            if pol in b:
                lower = ">= " if b[pol]["bracket"][1] == float("inf") else ""
                cells += [f"{lower}{b[pol]['max_rate']:.3g} ({b[pol]['config']})", ratio(esp, b[pol]["max_rate"])]
            else:
                cells += ["no config fits", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.out, "paper_table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "paper_table.json"), "w") as f:
        json.dump({"source": source, "instances": N, "requests": n, "paper_ratio": PAPER_RATIO,
                   "table": table}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
