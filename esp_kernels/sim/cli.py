"""`python -m esp_kernels simulate`: ESP against the baselines on the paper's workloads."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .metrics import SLO
from .report import Progress, format_table, plot_sweep, plot_timeline, write_rows
from .runner import POLICIES, find_max_rate, make_policy, requests_for_rate, rescale_arrivals, run_point
from .workloads import WORKLOADS, load_trace, make_requests

__all__ = ["add_arguments", "run_cli", "load_cost_model", "DEFAULT_RATES"]

# Request rates (req/s, 8 instances) that span light load to overload for each workload under
# the default cost model's scale (a sweep start, not a result).
DEFAULT_RATES = {"sharegpt": (5, 10, 20, 40, 80), "leval": (0.5, 1, 2, 4, 8),
                 "lveval": (0.02, 0.05, 0.1, 0.2, 0.4), "mixed": (0.1, 0.2, 0.5, 1, 2),
                 "zipf1.0": (0.5, 1, 2, 4, 8), "zipf1.2": (1, 2, 4, 8, 16), "zipf1.4": (2, 4, 8, 16, 32)}
QUICK_REQUESTS, QUICK_RATES = 80, 3


def _checked(kind, low, low_ok=False, high=None):
    """An argparse type: `kind` values above `low` (or equal with low_ok), at most `high`,
    finite."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
        if not math.isfinite(v) or v < low or (v == low and not low_ok) or \
                (high is not None and v > high):
            span = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if high else "")
            raise argparse.ArgumentTypeError(f"{text!r}: must be finite and {span}")
        return v
    return parse


_POS_INT = _checked(int, 1, low_ok=True)
_POS_FLOAT = _checked(float, 0.0)


def _csv(kind, choices=None):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            vals = [kind(s) for s in items]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        bad = [v for v in vals if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return vals
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `simulate` options (`python -m esp_kernels simulate --help`)."""
    p.add_argument("--workload", type=_csv(str, WORKLOADS), default=["sharegpt"],
                   help=f"comma list of {', '.join(WORKLOADS)} (default sharegpt)")
    p.add_argument("--trace", default=None, help="CSV/JSONL trace (arrival,prompt_len,output_len) instead "
                   "of --workload; --rates rescales its arrivals, else it runs as recorded")
    p.add_argument("--policy", type=_csv(str, POLICIES + ("all",)), default=["all"],
                   help=f"comma list of {', '.join(POLICIES)} or all (default all)")
    p.add_argument("--instances", type=_POS_INT, default=8, help="number of instances (GPUs), default 8")
    p.add_argument("--rates", type=_csv(_POS_FLOAT), default=None, help="comma list of request rates (req/s); "
                   "default per workload")
    p.add_argument("--requests", type=_POS_INT, default=None, help="requests per run (default 1000; quick 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cv", type=_POS_FLOAT, default=1.0, help="arrival burstiness: 1 = Poisson, >1 Gamma-bursty")
    p.add_argument("--out", default="sim_out", help="directory for results.csv/json and PNGs")
    p.add_argument("--cost-model", default=None, help="cost model JSON (CostModel.load); default: the "
                   "shipped profile (CostModel.default())")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests, the first "
                   f"{QUICK_RATES} default rates: seconds on a CPU")
    p.add_argument("--max-rate", action="store_true", help="also find each policy's max rate at 90%% "
                   "SLO attainment (sweep + bisection; each run spans >= 120 s of arrivals, at least "
                   "--requests requests; not with --trace)")
    p.add_argument("--gpu-mem-gib", type=_POS_FLOAT, default=80.0, help="GPU memory per instance (GiB)")
    p.add_argument("--mem-fraction", type=_checked(float, 0.0, high=1.0), default=0.9, help="usable fraction of it (default 0.9)")
    p.add_argument("--tp", type=_POS_INT, default=None, help="replica size for static_sp / chunked_prefill "
                   "(default all instances)")
    p.add_argument("--chunk-size", type=_POS_INT, default=None, help="chunked_prefill chunk (default per workload)")
    p.add_argument("--prefill-instances", type=_POS_INT, default=None, help="disaggregated prefill pool size "
                   "(default half)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")


def load_cost_model(path=None):
    """CostModel.load(path) or CostModel.default(), from esp_kernels.scheduler (issue 18)."""
    try:
        from esp_kernels.scheduler import CostModel
    except ImportError as e:
        raise SystemExit(f"simulate needs esp_kernels.scheduler (its CostModel): {e}") from e
    return CostModel.load(path) if path else CostModel.default()


def _policy_options(name, args):
    if name in ("static_sp", "chunked_prefill") and args.tp is not None:
        opts = {"tp": args.tp}
    else:
        opts = {}
    if name == "chunked_prefill" and args.chunk_size is not None:
        opts["chunk_size"] = args.chunk_size
    if name == "disaggregated" and args.prefill_instances is not None:
        opts["prefill_instances"] = args.prefill_instances
    return opts


def run_cli(args, cost_model=None, scheduler_cls=None, stream=None) -> int:
    """Run the sweep the arguments describe. cost_model / scheduler_cls: Python-level injection (tests)."""
    stream = stream or sys.stdout
    if args.instances < 1:
        raise SystemExit(f"--instances must be >= 1, got {args.instances}")
    if args.max_rate and args.trace:
        raise SystemExit("--max-rate searches a workload's rates; it does not apply to --trace")
    cm = cost_model if cost_model is not None else load_cost_model(args.cost_model)
    policies = list(POLICIES) if "all" in args.policy else args.policy
    n = args.requests if args.requests is not None else (QUICK_REQUESTS if args.quick else 1000)
    slo = SLO()
    if args.trace:
        trace = load_trace(args.trace)
        workloads = [os.path.splitext(os.path.basename(args.trace))[0]]
        rates = args.rates
    else:
        workloads = args.workload
    # Every policy's configuration, checked before the first run (a bad --tp once failed only
    # after the esp runs had taken their minutes, with nothing written).
    for wl in workloads:
        for pol in policies:
            try:
                make_policy(pol, cm, args.instances, workload=wl, gpu_mem_gib=args.gpu_mem_gib,
                            mem_fraction=args.mem_fraction, scheduler_cls=scheduler_cls,
                            **_policy_options(pol, args))
            except ValueError as e:
                raise SystemExit(f"{pol} on {wl}: {e}") from None
    rows = []
    for wl in workloads:
        if args.trace:
            points = ([(r, rescale_arrivals(trace, r)) for r in rates] if rates
                      else [((len(trace) - 1) / max(trace[-1].arrival - trace[0].arrival, 1e-12), trace)])
        else:
            wl_rates = args.rates or list(DEFAULT_RATES[wl][:QUICK_RATES] if args.quick else DEFAULT_RATES[wl])
            points = [(r, make_requests(wl, n, r, args.seed, args.cv)) for r in wl_rates]
        timeline_rate = points[len(points) // 2][0]
        for pol in policies:
            opts = _policy_options(pol, args)
            factory = lambda: make_policy(pol, cm, args.instances, workload=wl, gpu_mem_gib=args.gpu_mem_gib,
                                          mem_fraction=args.mem_fraction, scheduler_cls=scheduler_cls, **opts)
            for rate, reqs in points:
                policy = factory()
                bar = Progress(f"{wl} {pol} @ {rate:g} req/s")
                result, row = run_point(policy, reqs, cm, slo, record_timeline=(rate == timeline_rate),
                                        check=True, progress=bar)
                bar.done()
                rows.append({"workload": wl, "policy": pol, "config": policy.describe(), "rate": rate} | row)
                if rate == timeline_rate and not args.no_plots:
                    os.makedirs(args.out, exist_ok=True)
                    plot_timeline(result, os.path.join(args.out, f"{wl}_{pol}_timeline.png"))
            if args.max_rate and not args.trace:
                rates = sorted(r for r, _ in points)
                bar = Progress(f"{wl} {pol} max rate")
                found = find_max_rate(factory, lambda r: requests_for_rate(wl, r, args.seed, args.cv, n), cm,
                                      rates, slo=slo, progress=bar)
                bar.done()
                rows.append({"workload": wl, "policy": pol, "config": factory().describe(),
                             "rate": found["max_rate"], "max_rate_at_90": found["max_rate"],
                             "bracket_hi": found["bracket"][1]})
    sweep_rows = [r for r in rows if "max_rate_at_90" not in r]
    print(format_table(sweep_rows), file=stream)
    best = [r for r in rows if "max_rate_at_90" in r]
    if best:
        print("\nmax rate at 90% SLO attainment (" + repr(slo) + ")", file=stream)
        for r in best:
            bound = " (every swept rate met it: a lower bound)" if r["bracket_hi"] == float("inf") else ""
            print(f"  {r['workload']:>10}  {r['config']:<55} {r['max_rate_at_90']:.4g} req/s{bound}", file=stream)
    paths = write_rows(rows, args.out)
    if not args.no_plots:
        for wl in workloads:
            paths += plot_sweep(sweep_rows, args.out, wl)
    print(f"\nwrote {', '.join(paths)}", file=stream)
    return 0
