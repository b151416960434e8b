"""Ring-step kernels: effective TFLOP/s of all P x P steps of a striped ring (useful causal FLOPs /
summed kernel time) vs one-call causal attention on the same total work: FA3 (FlashInfer, from
the carried anchors), torch SDPA CUDNN and SDPA FLASH.

Bar: >= 1.0x FA3 (moonshot 1.1x). L = 64k global tokens, Hq 32, Hkv 8, D 128, bf16, P = 4 and 8
(16k and 8k tokens per rank); L = 8k (2k and 1k per rank) reports the shortest shapes. SDPA gets
K/V expanded to 32 heads (same FLOPs; its GQA path is not available on every backend); FA3 takes
GQA as is.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anchors import fa3_prefill
from harness import Recorder, parse_out, time_cuda, time_graph
from ring_cases import StripedRing, causal_flops, random_qkv

from esp_kernels.prefill.step import ring_step


def sdpa_tflops(q, k, v, backend, flops):
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    kt = kt.repeat_interleave(G, dim=1)
    vt = vt.repeat_interleave(G, dim=1)
    try:
        with sdpa_kernel([backend]):
            t = time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True), warmup=2, reps=5)
    except RuntimeError as exc:
        print(f"  SDPA {backend} unavailable: {str(exc).splitlines()[0]}")
        return None, None
    return flops / (t["ms"] * 1e-3) / 1e12, t


def main():
    args = parse_out()
    rec = Recorder("prefill_step", args.out)
    Hq, Hkv, D = 32, 8, 128
    # 64k: 16k / 8k tokens per rank at P = 4 / 8 (the bar); 8k: 2k / 1k, the shortest shapes.
    for L in ((16384, 4096) if args.quick else (65536, 8192)):
        q, k, v = random_qkv(L, Hq, Hkv, D)
        flops = causal_flops(L, Hq, D)
        anchors = {}
        fa3 = fa3_prefill(q, k, v)
        if fa3 is not None:
            t = time_cuda(fa3, warmup=2, reps=5)
            anchors["FA3 (FlashInfer)"] = flops / (t["ms"] * 1e-3) / 1e12
            print(f"  L={L} FA3 (FlashInfer): {anchors['FA3 (FlashInfer)']:.1f} TFLOP/s "
                  f"({t['ms']:.2f} ms)")
        for name, be in (("SDPA FLASH", SDPBackend.FLASH_ATTENTION),
                         ("SDPA CUDNN", SDPBackend.CUDNN_ATTENTION)):
            tf, t = sdpa_tflops(q, k, v, be, flops)
            if tf is not None:
                anchors[name] = tf
                print(f"  L={L} {name}: {tf:.1f} TFLOP/s ({t['ms']:.2f} ms)")
        for P in (4, 8):
            ring = StripedRing(q, k, v, P)
            n = ring.n
            for backend in ("cuda", "triton", "gluon"):
                def step(qi, kj, vj, cu, n, o, lse, shift, acc, backend=backend):
                    ring_step(qi, kj, vj, cu, cu, n, o, lse, mask_shift=shift, accumulate=acc,
                              softmax_scale=D ** -0.5, backend=backend)
                try:
                    t = time_cuda(lambda: ring.all_steps(step), warmup=1, reps=3)
                except Exception as exc:  # report and continue with the other backends
                    print(f"  {backend} step failed: {type(exc).__name__}: {exc}")
                    continue
                timings = [("", t)]
                if L < 65536:
                    # Short steps are launch-bound (P x P launches, each a few µs of GPU work):
                    # the same steps replayed from a CUDA graph give the kernels' own rate.
                    timings.append((" graph", time_graph(lambda: ring.all_steps(step))))
                for tag, t in timings:
                    tf = flops / (t["ms"] * 1e-3) / 1e12
                    print(f"  L={L} P={P} ring_step[{backend}]{tag}: {tf:.1f} TFLOP/s "
                          f"({t['ms']:.2f} ms)")
                    for aname, aval in anchors.items():
                        rec.add(f"L={L} P={P} ({n} tok/rank) Hq{Hq}/Hkv{Hkv} D{D} bf16",
                                f"ring_step[{backend}]{tag}", tf, aname, aval, "TFLOP/s",
                                ms=t["ms"], p10=t["p10"], p90=t["p90"])


if __name__ == "__main__":
    main()
