"""Striped ring prefill on P virtual ranks of one GPU (L = 64k, P = 4 and 8), same run:

- vs one FA3 call (FlashInfer, carried anchors) over the whole sequence: bar >= 0.9x; the ring
  driven two ways: `ring_prefill` in one thread per rank (`run_local`) and `ring_prefill_steps`
  with every rank advanced from one thread (`run_steps`);
- vs its step kernels alone (the P x P steps back to back, no communication): ring overhead,
  bar <= 10% (moonshot <= 3%);
- vs a ring-flash-attention-style loop (bench/ring_flash_style.py) on the same Group, its steps
  FA3 calls (the bar, >= 1.2x), cuDNN calls, or SDPA FLASH calls (secondary), each merged in fp32
  with torch ops; the loop's output is checked against ours;
- with proactive retention vs without (issue 5): bar <= 5% slower.
"""

import torch

from anchors import fa3_prefill, step_attend
from harness import Recorder, parse_out, time_cuda, time_wall
from ring_cases import StripedRing, random_qkv
from ring_flash_style import rfa_style_prefill, sdpa_flash_attend

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local, run_steps
from esp_kernels.prefill.step import ring_step, resolve_backend


def main():
    args = parse_out()
    rec = Recorder("ring_prefill", args.out)
    L = 16384 if args.quick else 65536
    Hq, Hkv, D = 32, 8, 128
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    backend = resolve_backend("auto", q.device)
    fa3 = fa3_prefill(q, k, v)
    t_fa3 = time_cuda(fa3, warmup=2, reps=5) if fa3 is not None else None
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        qs, ks, vs = ring.qs, ring.ks, ring.vs

        def step(qi, kj, vj, cu, n, o, lse, shift, acc):
            ring_step(qi, kj, vj, cu, cu, n, o, lse, mask_shift=shift, accumulate=acc,
                      softmax_scale=D ** -0.5, backend=backend)

        t_steps = time_cuda(lambda: ring.all_steps(step), warmup=1, reps=3)
        groups = local_group(P, "cuda")

        def ours():  # every rank's (out, lse), one thread per rank
            return run_local(groups, lambda gr: esp.ring_prefill(qs[gr.rank], ks[gr.rank],
                                                                vs[gr.rank], [L], gr))

        def ours_one_thread():  # the same ring, every rank's steps driven from this thread
            return run_steps(groups, [esp.prefill.ring_prefill_steps(
                qs[r], ks[r], vs[r], [L], groups[r]) for r in range(P)])

        case = f"L={L} P={P} virtual ranks Hq{Hq}/Hkv{Hkv} D{D} bf16 [{backend}]"
        # Eight threads sharing one GPU vary run to run: more repetitions than the kernels get.
        t_ours = time_wall(ours, warmup=2, reps=7)
        t_one = time_wall(ours_one_thread, warmup=2, reps=7)
        rec.add(case, "ring_prefill_steps, run_steps", t_one["ms"], "ring_prefill, run_local",
                t_ours["ms"], "ms", higher_is_better=False)
        rec.add(case, "ring_prefill_steps, run_steps", t_one["ms"], "its step kernels alone",
                t_steps["ms"], "ms", higher_is_better=False,
                overhead=t_one["ms"] / t_steps["ms"] - 1)
        if t_fa3 is not None:
            rec.add(case, "ring_prefill_steps, run_steps", t_one["ms"],
                    "one FA3 call (FlashInfer)", t_fa3["ms"], "ms", higher_is_better=False)

        # Retention: decode keeps every token on 2 of the P instances (fill-first).
        caches = [esp.PagedKVCache(1, L // 16 + 64, 16, Hkv, D, torch.bfloat16, "cuda")
                  for _ in range(P)]
        plan = esp.RetentionPlan.fill_first([L], {0: L // 32 + 32, 1: L // 32 + 32}, 16)

        def with_retention():
            run_local(groups, lambda gr, c: esp.ring_prefill(
                qs[gr.rank], ks[gr.rank], vs[gr.rank], [L], gr, retain=(plan, c, 0)), caches)

        # Timed right after ours: the host's speed drifts within a call.
        t_ret = time_wall(with_retention, warmup=2, reps=7)
        rec.add(case, "ring_prefill+retention", t_ret["ms"], "ring_prefill", t_ours["ms"], "ms",
                higher_is_better=False, overhead=t_ret["ms"] / t_ours["ms"] - 1,
                retained_bytes=L * 2 * Hkv * D * 2)
        rec.add(case, "ring_prefill", t_ours["ms"], "its step kernels alone", t_steps["ms"],
                "ms", higher_is_better=False, overhead=t_ours["ms"] / t_steps["ms"] - 1)
        if t_fa3 is not None:
            rec.add(case, "ring_prefill", t_ours["ms"], "one FA3 call (FlashInfer)",
                    t_fa3["ms"], "ms", higher_is_better=False)
        ours_out = [o for o, _ in ours()]
        attends = {"SDPA FLASH": sdpa_flash_attend}
        for name in ("FA3", "cuDNN"):
            attend = step_attend(name, qs[0], ks[0], vs[0])
            if attend is not None:
                attends[name] = attend
        for name, attend in attends.items():
            def style(attend=attend):  # every rank's (out, lse)
                return run_local(groups, lambda gr: rfa_style_prefill(
                    qs[gr.rank], ks[gr.rank], vs[gr.rank], gr, attend=attend))
            diff = max((a.float() - b.float()).abs().max().item()
                       for (a, _), b in zip(style(), ours_out))
            t_style = time_wall(style, warmup=2, reps=7)
            rec.add(case, "ring_prefill", t_ours["ms"], f"RFA-style loop, {name} steps",
                    t_style["ms"], "ms", higher_is_better=False, max_abs_diff=diff)
            if name == "FA3":
                rec.add(case, "ring_prefill_steps, run_steps", t_one["ms"],
                        f"RFA-style loop, {name} steps", t_style["ms"], "ms",
                        higher_is_better=False)


if __name__ == "__main__":
    main()
