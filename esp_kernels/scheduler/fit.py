"""Fit a cost-model profile from profiled samples:

    python -m esp_kernels.scheduler.fit SAMPLES.json -o PROFILE.json [--holdout-every 5]
    python -m esp_kernels.scheduler.fit --analytic -o PROFILE.json     # the placeholder profile

Every `holdout-every`-th sample of each kind is held out: the model is fitted on the rest and its
error on the held-out samples printed; then the profile written is fitted on all samples. To
replace the shipped profile: -o esp_kernels/scheduler/profiles/h100_llama3_8b.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cost_model import CostModel


def split(doc: dict, every: int) -> tuple[dict, dict]:
    """(train, held-out) documents: per kind, samples k·every + every-1 are held out."""
    train, held, seen = [], [], {}
    for s in doc["samples"]:
        i = seen.get(s["kind"], 0)
        seen[s["kind"]] = i + 1
        (held if every > 1 and i % every == every - 1 else train).append(s)
    return {**doc, "samples": train}, {**doc, "samples": held}


def format_report(rep: dict) -> str:
    lines = [f"  {'kind':<14} {'n':>4} {'mean rel err':>13} {'max rel err':>12}"]
    for k, r in rep.items():
        lines.append(f"  {k:<14} {r['n']:>4} {100 * r['mean_rel_err']:>12.2f}% "
                     f"{100 * r['max_rel_err']:>11.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esp_kernels.scheduler.fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="?",
                    help="samples JSON written by bench/profile_cost_model.py")
    ap.add_argument("-o", "--output", required=True, help="profile JSON to write")
    ap.add_argument("--holdout-every", type=int, default=5,
                    help="hold out every N-th sample of each kind for the report (default 5)")
    ap.add_argument("--analytic", action="store_true",
                    help="fit the analytic H100 placeholder instead of measured samples")
    args = ap.parse_args(argv)
    if args.analytic == bool(args.samples):
        ap.error("give either SAMPLES.json or --analytic")
    if args.holdout_every < 2:  # (1 or less held nothing out: a profile with an empty report)
        ap.error(f"--holdout-every must be >= 2, got {args.holdout_every}")
    if args.analytic:
        from .analytic import analytic_samples
        doc = analytic_samples()
    else:
        with open(args.samples) as f:
            doc = json.load(f)
    train, held = split(doc, args.holdout_every)
    print(f"fitting on {len(train['samples'])} samples, {len(held['samples'])} held out")
    held_out = CostModel.fit(train).report(held)
    print("held-out relative error:")
    print(format_report(held_out))
    cm = CostModel.fit(doc)
    cm.meta["held_out_report"] = held_out
    cm.save(args.output)
    print(f"wrote {args.output} ({cm!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
