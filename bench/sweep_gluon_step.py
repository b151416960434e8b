"""The Gluon ring step's knob (how the CTAs share the items: the static snake order or the dynamic
counter) against the Triton kernel and FA3 in one run: effective TFLOP/s of all P x P steps
(L 64k, Hq 32 / Hkv 8, D 128, bf16; L 8k replayed from a CUDA graph, its steps being
launch-bound), and each variant's output state against the Triton kernel's on the same steps.
Decides esp_kernels/prefill/gluon_step.py's defaults. `--only 8k` runs the L 8k rings alone."""

import torch

from anchors import fa3_prefill
from harness import parse_out, Recorder, time_cuda, time_graph
from ring_cases import StripedRing, causal_flops, random_qkv

from esp_kernels.prefill import gluon_step
from esp_kernels.prefill.gluon_step import ring_step_gluon
from esp_kernels.prefill.step import ring_step

# Swept before (bench/NOTES.md): 3 stages, ping-pong of the warpgroups, one CTA per tile, the
# state prefetch off (no win); with the prefetch there is no room for a third stage (Q, two K/V
# stages and the prefetched state fill 224 of the 227 KB).
VARIANTS = [dict(schedule="snake"), dict(schedule="dynamic")]
ROUNDS = 2  # every variant timed once per round, rounds one after the other (drift shows)


def main():
    args = parse_out()
    rec = Recorder("gluon_sweep", args.out)
    if args.only not in (None, "8k"):
        raise SystemExit(f"--only takes 8k (the L 8k rings alone), not {args.only!r}")
    lengths = (16384,) if args.quick else (8192,) if args.only else (65536, 8192)
    for L in lengths:
        sweep(rec, L)


def sweep(rec, L):
    Hq, Hkv, D = 32, 8, 128
    timer = time_cuda if L >= 65536 else time_graph
    q, k, v = random_qkv(L, Hq, Hkv, D)
    flops = causal_flops(L, Hq, D)
    fa3 = fa3_prefill(q, k, v)
    fa3_tf = flops / (time_cuda(fa3, warmup=2, reps=5)["ms"] * 1e-3) / 1e12 if fa3 else None
    print(f"L={L} FA3 (FlashInfer): {fa3_tf} TFLOP/s")
    scale = D ** -0.5
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)

        def triton(qi, kj, vj, cu, n, o, lse, shift, acc):
            ring_step(qi, kj, vj, cu, cu, n, o, lse, mask_shift=shift, accumulate=acc,
                      softmax_scale=scale, backend="triton")
        ring.all_steps(triton)
        ref_o, ref_l = ring.o.clone(), ring.lse.clone()
        t = timer(lambda: ring.all_steps(triton))
        base = flops / (t["ms"] * 1e-3) / 1e12
        print(f"L={L} P={P} triton: {base:.1f} TFLOP/s")
        for rnd, var in [(r, v) for r in range(ROUNDS) for v in VARIANTS]:
            def gluon(qi, kj, vj, cu, n, o, lse, shift, acc, var=var):
                ring_step_gluon(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc, scale, **var)
            try:
                ring.all_steps(gluon)
                torch.cuda.synchronize()
                assert not gluon_step._compile_error, "the variant ran the Triton fallback"
                err_o = (ring.o - ref_o).abs().max().item()
                err_l = (ring.lse - ref_l).abs().max().item()
                t = timer(lambda: ring.all_steps(gluon))
            except Exception as exc:  # report, go on with the next variant
                print(f"L={L} P={P} {var}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            tf = flops / (t["ms"] * 1e-3) / 1e12
            name = "gluon " + ", ".join(f"{k}={v}" for k, v in var.items())
            print(f"L={L} P={P} round {rnd} {name}: {tf:.1f} TFLOP/s ({tf / base:.3f}x triton"
                  + (f", {tf / fa3_tf:.3f}x FA3" if fa3_tf else "")
                  + f"), max |o - triton| {err_o:.2e}, |lse - triton| {err_l:.2e}")
            rec.add(f"L={L} P={P} ({ring.n} tok/rank) Hq{Hq}/Hkv{Hkv} D{D} bf16", name, tf,
                    "ring_step[triton]", base, "TFLOP/s", ms=t["ms"], fa3=fa3_tf,
                    max_abs_o_vs_triton=err_o, max_abs_lse_vs_triton=err_l, round=rnd)


if __name__ == "__main__":
    main()
