"""Issue 21 sweep: the Triton ring-step variants (esp_kernels/prefill/triton_step_tma.py) against
the default kernel (triton_step.py) and FA3 (FlashInfer) measured in the same run.

All P x P steps of a striped ring, L = 64k, Hq 32 / Hkv 8, D 128, bf16, P = 4 and 8 (bench
ring_cases.StripedRing, effective TFLOP/s = useful causal FLOPs / summed kernel time). Before
timing, each (variant, config) runs two steps of rank P-1 (shift 0 without accumulate, then
shift -1 accumulating) next to the default kernel: the max abs error of o and lse is printed
and a row with error > 1e-2 is marked BAD and not timed. A time budget (--budget, default 140 s)
skips what is left, in priority order (the variants least likely to fail at run time first;
tma_ws, whose Hopper warp-specialization pass is the least proven, last).

    python3 bench/sweep_ring_step.py --out $OUT/sweep.jsonl [--only tma,tma_lazy] [--quick]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchors import fa3_prefill  # noqa: E402
from harness import Recorder, time_cuda  # noqa: E402
from ring_cases import StripedRing, causal_flops, random_qkv  # noqa: E402

from esp_kernels.prefill.triton_step import ring_step_triton  # noqa: E402
from esp_kernels.prefill.triton_step_tma import (SWEEP_CONFIGS, VARIANTS,  # noqa: E402
                                                 ring_step_triton_v2)

ORDER = ["tma", "tma_lazy", "fold", "tma_pipe", "tma_ws"]
MAX_ERR = 1e-2


def plan(only):
    """(variant, config) in priority order: each variant's first config, then the rest."""
    names = [v for v in ORDER if v in VARIANTS and (not only or v in only)]
    first = [(v, SWEEP_CONFIGS[v][0]) for v in names]
    rest = [(v, c) for v in names for c in SWEEP_CONFIGS[v][1:]]
    # tma_ws last in both groups: a fault there must not cost the others' rows
    key = lambda vc: vc[0] == "tma_ws"  # noqa: E731
    return sorted(first, key=key) + sorted(rest, key=key)


def make_step(variant, cfg, D):
    if variant == "default":
        def step(qi, kj, vj, cu, n, o, lse, shift, acc):
            ring_step_triton(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc, D ** -0.5)
    else:
        def step(qi, kj, vj, cu, n, o, lse, shift, acc):
            ring_step_triton_v2(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc, D ** -0.5,
                                variant=variant, config=cfg)
    return step


def check(ring, step, ref):
    """Two steps of the last rank (its own block, shift 0, written; the previous rank's block,
    shift -1, merged) vs the default kernel's; returns the max abs error of o and lse."""
    i, P = ring.P - 1, ring.P
    o = torch.empty_like(ring.o)
    lse = torch.empty_like(ring.lse)
    for s in (0, 1):
        j = (i - s) % P
        step(ring.qs[i], ring.ks[j], ring.vs[j], ring.cu, ring.n, o, lse, 0 if j <= i else -1,
             s > 0)
    torch.cuda.synchronize()
    ro, rl = ref
    err_o = (o - ro).abs().max().item()
    err_l = (lse - rl).abs().max().item()
    if torch.isnan(o).any() or torch.isnan(lse).any():
        err_o = float("nan")
    return err_o, err_l


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="L = 16k")
    p.add_argument("--only", default=None, help="comma-separated variants")
    p.add_argument("--budget", type=float, default=140.0, help="seconds; the rest is skipped")
    args = p.parse_args()
    t_start = time.time()
    only = set(args.only.split(",")) if args.only else None

    def elapsed():
        return time.time() - t_start

    rec = Recorder("ring_step_sweep", args.out)
    L, Hq, Hkv, D = (16384 if args.quick else 65536), 32, 8, 128
    q, k, v = random_qkv(L, Hq, Hkv, D)
    flops = causal_flops(L, Hq, D)
    fa3_tf = None
    fa3 = fa3_prefill(q, k, v)
    if fa3 is not None:
        t = time_cuda(fa3, warmup=2, reps=5)
        fa3_tf = flops / (t["ms"] * 1e-3) / 1e12
        print(f"  FA3 (FlashInfer): {fa3_tf:.1f} TFLOP/s ({t['ms']:.2f} ms)  [{elapsed():.0f} s]",
              flush=True)
    rings = {P: StripedRing(q, k, v, P) for P in (4, 8)}

    # The default kernel: the reference output and the baseline time.
    ref_step = make_step("default", None, D)
    refs, base_tf = {}, {}
    for P, ring in rings.items():
        i = P - 1
        o = torch.empty_like(ring.o)
        lse = torch.empty_like(ring.lse)
        for s in (0, 1):
            j = (i - s) % P
            ref_step(ring.qs[i], ring.ks[j], ring.vs[j], ring.cu, ring.n, o, lse,
                     0 if j <= i else -1, s > 0)
        refs[P] = (o, lse)
        t = time_cuda(lambda: ring.all_steps(ref_step), warmup=1, reps=3)
        base_tf[P] = flops / (t["ms"] * 1e-3) / 1e12
        anchor = ("FA3 (FlashInfer)", fa3_tf) if fa3_tf else ("default", base_tf[P])
        rec.add(f"P={P} ({ring.n} tok/rank) default M128N64w8s3", "ring_step[default]",
                base_tf[P], anchor[0], anchor[1], "TFLOP/s", ms=t["ms"], p10=t["p10"],
                p90=t["p90"], variant="default", config=[128, 64, 8, 3], P=P)
    print(f"  [{elapsed():.0f} s] baseline done", flush=True)

    results = []
    for variant, cfg in plan(only):
        if elapsed() > args.budget:
            print(f"  budget {args.budget:.0f} s reached: skipping {variant} {cfg}", flush=True)
            continue
        tag = f"M{cfg[0]}N{cfg[1]}w{cfg[2]}s{cfg[3]}"
        step = make_step(variant, cfg, D)
        try:
            err_o, err_l = check(rings[4], step, refs[4])
        except Exception as exc:  # noqa: BLE001 - report and go on (compile errors, OOM smem)
            print(f"  {variant} {tag} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        ok = err_o <= MAX_ERR and err_l <= MAX_ERR
        print(f"  {variant} {tag}: max abs err vs default o {err_o:.2e} lse {err_l:.2e}"
              f"{'' if ok else '  BAD (not timed)'}  [{elapsed():.0f} s]", flush=True)
        if not ok:
            continue
        for P, ring in rings.items():
            try:
                t = time_cuda(lambda: ring.all_steps(step), warmup=1, reps=3)
            except Exception as exc:  # noqa: BLE001
                print(f"  {variant} {tag} P={P} FAILED: {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
                continue
            tf = flops / (t["ms"] * 1e-3) / 1e12
            anchor = ("FA3 (FlashInfer)", fa3_tf) if fa3_tf else ("default", base_tf[P])
            rec.add(f"P={P} ({ring.n} tok/rank) {variant} {tag}", f"ring_step[{variant}]", tf,
                    anchor[0], anchor[1], "TFLOP/s", ms=t["ms"], p10=t["p10"], p90=t["p90"],
                    variant=variant, config=list(cfg), P=P, vs_default=tf / base_tf[P],
                    err_o=err_o, err_lse=err_l)
            results.append((P, tf, variant, tag))
        print(f"  [{elapsed():.0f} s]", flush=True)

    print("\n== summary: TFLOP/s (x default, x FA3) ==")
    for P in rings:
        rows = sorted((r for r in results if r[0] == P), key=lambda r: -r[1])
        fa3_s = f"{fa3_tf:.1f}" if fa3_tf else "n/a"
        print(f"  P={P}: default {base_tf[P]:.1f}, FA3 {fa3_s}")
        for _, tf, variant, tag in rows:
            x_fa3 = f"{tf / fa3_tf:.3f}" if fa3_tf else "n/a"
            print(f"    {variant:<9} {tag:<14} {tf:7.1f}  x{tf / base_tf[P]:.3f}  FA3 x{x_fa3}")
    print(f"  total {elapsed():.0f} s")


if __name__ == "__main__":
    main()
