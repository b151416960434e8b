"""Tile-shape sweep of the Triton ring step (bench/NOTES.md records the outcome): all P x P
steps of a striped ring, L = 64k, Hq 32 / Hkv 8, D 128, bf16; each config next to one FA3 call
over the sequence (the carried anchors), or SDPA FLASH without them."""

from torch.nn.attention import SDPBackend

from anchors import fa3_prefill
from harness import Recorder, parse_out, time_cuda
from bench_prefill_step import sdpa_call
from ring_cases import StripedRing, causal_flops, random_qkv

from esp_kernels.prefill.triton_step import ring_step_triton

# (BLOCK_M rows, BLOCK_N keys, warps, stages); rows are (token, head) pairs: 128 rows = 32 tokens
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
           (64, 64, 4, 3), (256, 64, 8, 2)]


def main():
    args = parse_out()
    rec = Recorder("triton_step_configs", args.out)
    L, Hq, Hkv, D = (16384 if args.quick else 65536), 32, 8, 128
    q, k, v = random_qkv(L, Hq, Hkv, D)
    flops = causal_flops(L, Hq, D)
    anchor, call = "FA3, one call", fa3_prefill(q, k, v)
    if call is None:
        anchor, call = "SDPA FLASH, one call", sdpa_call(q, k, v, SDPBackend.FLASH_ATTENTION)
    if call is None:
        raise SystemExit("no anchor runs here: neither FA3 (carried anchors) nor SDPA FLASH")
    anchor_tflops = flops / (time_cuda(call, warmup=1, reps=3)["ms"] * 1e-3) / 1e12
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        n = ring.n
        for cfg in CONFIGS:
            def step(qi, kj, vj, cu, n, o, lse, shift, acc, cfg=cfg):
                ring_step_triton(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc, D ** -0.5,
                                 config=cfg)
            try:
                t = time_cuda(lambda: ring.all_steps(step), warmup=1, reps=3)
            except Exception as exc:  # e.g. out of shared memory for a large tile
                print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            rec.add(f"P={P} ({n} tok/rank) M{cfg[0]} N{cfg[1]} w{cfg[2]} s{cfg[3]}",
                    "ring_step[triton]", flops / (t["ms"] * 1e-3) / 1e12, anchor, anchor_tflops,
                    "TFLOP/s", ms=t["ms"])


if __name__ == "__main__":
    main()
