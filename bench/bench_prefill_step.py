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
is.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anchors import fa3_prefill, step_attend
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
            anchors["FA3, one call"] = flops / (t["ms"] * 1e-3) / 1e12
            print(f"  L={L} FA3 (FlashInfer), one call: {anchors['FA3, one call']:.1f} TFLOP/s "
                  f"({t['ms']:.2f} ms)")
        for name, be in (("SDPA FLASH", SDPBackend.FLASH_ATTENTION),
                         ("SDPA CUDNN", SDPBackend.CUDNN_ATTENTION)):
            tf, t = sdpa_tflops(q, k, v, be, flops)
            if tf is not None:
                anchors[f"{name}, one call"] = tf
                print(f"  L={L} {name}, one call: {tf:.1f} TFLOP/s ({t['ms']:.2f} ms)")
        for P in (4, 8):
            ring = StripedRing(q, k, v, P)
            n = ring.n
            # Launched one by one; for the short shapes also replayed from a CUDA graph, which
            # gives the kernels' own rate.
            tags = ("",) if L >= 65536 else ("", " graph")
            same_work = {}  # tag -> {anchor: TFLOP/s}
            for name in ("FA3", "cuDNN"):
                attend = step_attend(name, ring.qs[0], ring.ks[0], ring.vs[0])
                if attend is None:
                    continue
                for tag in tags:
                    timer = time_graph if tag else time_cuda
                    try:
                        t = timer(lambda: ring.anchor_steps(attend))
                    except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot capture
                        print(f"  {name} steps{tag} skipped: {type(exc).__name__}: {exc}")
                        continue
                    tf = flops / (t["ms"] * 1e-3) / 1e12
                    same_work.setdefault(tag, {})[f"{name} steps, no merge"] = tf
                    print(f"  L={L} P={P} {name} steps{tag}: {tf:.1f} TFLOP/s ({t['ms']:.2f} ms)")
            for backend in ("triton", "gluon"):
                def step(qi, kj, vj, cu, n, o, lse, shift, acc, backend=backend):
                    ring_step(qi, kj, vj, cu, cu, n, o, lse, mask_shift=shift, accumulate=acc,
                              softmax_scale=D ** -0.5, backend=backend)
                for tag in tags:
                    timer = time_graph if tag else time_cuda
                    try:
                        t = timer(lambda: ring.all_steps(step))
                    except Exception as exc:  # report and continue with the other backends
                        print(f"  {backend} step failed: {type(exc).__name__}: {exc}")
                        break
                    tf = flops / (t["ms"] * 1e-3) / 1e12
                    print(f"  L={L} P={P} ring_step[{backend}]{tag}: {tf:.1f} TFLOP/s "
                          f"({t['ms']:.2f} ms)")
                    for aname, aval in {**same_work.get(tag, {}), **anchors}.items():
                        rec.add(f"L={L} P={P} ({n} tok/rank) Hq{Hq}/Hkv{Hkv} D{D} bf16",
                                f"ring_step[{backend}]{tag}", tf, aname, aval, "TFLOP/s",
                                ms=t["ms"], p10=t["p10"], p90=t["p90"])

if __name__ == "__main__":
    main()
