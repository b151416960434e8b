"""Ring-step kernels: effective TFLOP/s of all P x P steps of a striped ring (useful causal FLOPs /
summed kernel time), against the same steps run by the anchor kernels and against one call over
the whole sequence.

- Same work (the bar, >= 1.0x FA3, moonshot 1.1x): every step as one FA3 call (FlashInfer, from
  the carried anchors) and as one cuDNN call (torch SDPA's cuDNN kernel, LSE on), sliced as
  ring-flash-attention does (bench/ring_flash_style.py), outputs dropped: the anchors' kernels
  alone, without the merge that ours fuses.
- One call over the whole sequence (secondary): FA3, SDPA CUDNN, SDPA FLASH.

L = 64k global tokens, Hq 32, Hkv 8, D 128, bf16, P = 4 and 8 (16k and 8k tokens per rank);
L = 8k (2k and 1k per rank) reports the shortest shapes, also replayed from a CUDA graph (steps
that short are launch-bound). SDPA gets K/V expanded to 32 heads (same FLOPs); FA3 takes GQA as
is. Every contender of one (L, P) is timed round-robin in the same rounds (CUDA events, L2
flushed before each); a row's ratio is the median of the per-round ratios
(`harness.paired_speedup`), its TFLOP/s from the median times.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anchors import fa3_prefill, step_attend
from harness import Recorder, graph_replay, paired_speedup, parse_out, time_cuda_interleaved
from ring_cases import StripedRing, causal_flops, random_qkv

from esp_kernels.prefill.step import ring_step


def sdpa_call(q, k, v, backend):
    """One SDPA call over the whole sequence on `backend` (K/V expanded to Hq heads first), or
    None with a line when the backend cannot run it."""
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    kt = kt.repeat_interleave(G, dim=1)
    vt = vt.repeat_interleave(G, dim=1)

    def call():
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return runs_or_none(f"SDPA {backend.name}", call)


def runs_or_none(name, fn):
    """fn when one call of it runs, else None with a line saying why (e.g. a backend that
    cannot take the shape, a kernel that cannot be captured)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, the other contenders go on
        print(f"  {name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    return fn


def main():
    args = parse_out()
    rec = Recorder("prefill_step", args.out)
    Hq, Hkv, D = 32, 8, 128
    # 64k: 16k / 8k tokens per rank at P = 4 / 8 (the bar); 8k: 2k / 1k, the shortest shapes.
    for L in ((16384, 4096) if args.quick else (65536, 8192)):
        q, k, v = random_qkv(L, Hq, Hkv, D)
        flops = causal_flops(L, Hq, D)
        one_call = {"FA3, one call": fa3_prefill(q, k, v),
                    "SDPA FLASH, one call": sdpa_call(q, k, v, SDPBackend.FLASH_ATTENTION),
                    "SDPA CUDNN, one call": sdpa_call(q, k, v, SDPBackend.CUDNN_ATTENTION)}
        for P in (4, 8):
            ring = StripedRing(q, k, v, P)
            n = ring.n
            # Launched one by one; for the short shapes also replayed from a CUDA graph, which
            # gives the kernels' own rate.
            tags = ("",) if L >= 65536 else ("", " graph")
            contenders = {}  # (tag, name) -> fn
            for name, fn in one_call.items():
                if fn is not None:
                    contenders[("", name)] = fn
            for name in ("FA3", "cuDNN"):
                attend = step_attend(name, ring.qs[0], ring.ks[0], ring.vs[0])
                if attend is not None:
                    contenders[("", f"{name} steps, no merge")] = \
                        lambda attend=attend: ring.anchor_steps(attend)
            for backend in ("triton", "gluon"):
                def steps(backend=backend):
                    ring.all_steps(lambda qi, kj, vj, cu, n, o, lse, shift, acc: ring_step(
                        qi, kj, vj, cu, cu, n, o, lse, mask_shift=shift, accumulate=acc,
                        softmax_scale=D ** -0.5, backend=backend))
                contenders[("", f"ring_step[{backend}]")] = steps
            for key, fn in list(contenders.items()):
                if " one call" in key[1]:  # ran once already, when built
                    continue
                if runs_or_none(f"L={L} P={P} {key[1]}", fn) is None:
                    del contenders[key]
                else:
                    for tag in tags[1:]:
                        try:
                            contenders[(tag, key[1])] = graph_replay(fn)
                        except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot capture
                            print(f"  L={L} P={P} {key[1]}{tag} skipped: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0]}")
            # Round-robin: at the H100's power cap the same kernels run up to 15% slower late
            # in a call than early, more than the margins these ratios are read for.
            t = time_cuda_interleaved(contenders, warmup=2, reps=7)
            tflops = {key: flops / (s["ms"] * 1e-3) / 1e12 for key, s in t.items()}
            for (tag, name), tf in tflops.items():
                print(f"  L={L} P={P} {name}{tag}: {tf:.1f} TFLOP/s ({t[(tag, name)]['ms']:.2f} "
                      "ms)")
            for tag in tags:
                for backend in ("triton", "gluon"):
                    ours = (tag, f"ring_step[{backend}]")
                    if ours not in t:
                        continue
                    anchors = [key for key in t if key[1] not in (ours[1], "ring_step[triton]",
                               "ring_step[gluon]") and (key[0] == tag or "one call" in key[1])]
                    for key in anchors:
                        rec.add(f"L={L} P={P} ({n} tok/rank) Hq{Hq}/Hkv{Hkv} D{D} bf16",
                                f"{ours[1]}{tag}", tflops[ours], key[1], tflops[key], "TFLOP/s",
                                ratio=paired_speedup(t[ours], t[key]), ms=t[ours]["ms"],
                                p10=t[ours]["p10"], p90=t[ours]["p90"])


if __name__ == "__main__":
    main()
