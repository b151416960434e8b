"""Where a ring step's time goes, against FA3 on the same shape (one request, 8k queries, Hq 32 /
Hkv 8, D 128, bf16):

- "1 block": 128 keys, not causal: every tile runs one K/V block, so the time is the per-tile
  fixed cost (Q load, descriptors, barriers, epilogue); per-tile us = time x SMs / tiles;
- "full": 8k keys, not causal: the main loop's rate;
- "diagonal": 8k keys, causal (a ring's first step).

Each with the state written (accumulate off) and merged (on). FA3 has no state: its rows are
the floor of what a step without the merge costs.
"""

import torch

from anchors import fa3_prefill
from harness import parse_out, time_cuda

from esp_kernels.prefill.gluon_step import ring_step_gluon
from esp_kernels.prefill.step import ring_step
from esp_kernels.testing import cu_seqlens


def main():
    parse_out()
    n, Hq, Hkv, D = 8192, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(2, n, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    o = torch.empty(n, Hq, D, device="cuda")
    lse = torch.zeros(n, Hq, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = n * Hq // 128  # 128 (token, head) rows per tile in ours, 128 tokens x 1 head in FA3
    for name, keys, causal in (("1 block", 128, False), ("full", n, False),
                               ("diagonal", n, True)):
        k, v = kv[0, :keys], kv[1, :keys]
        pairs = n * keys - (n * (n - 1) // 2 if causal else 0)
        flops = 4 * D * Hq * pairs
        cu_q, cu_k = cu_seqlens([n], "cuda"), cu_seqlens([keys], "cuda")
        fa3 = fa3_prefill(q, k, v, causal=causal)
        rows = []
        if fa3 is not None:
            rows.append(("FA3", time_cuda(fa3)["ms"]))
        for backend in ("gluon", "gluon no-prefetch", "triton"):
            for acc in (False, True):
                def step(backend=backend, acc=acc):
                    if backend == "triton":
                        ring_step(q, k, v, cu_q, cu_k, n, o, lse, causal=causal,
                                  accumulate=acc, backend=backend)
                    else:
                        ring_step_gluon(q, k, v, cu_q, cu_k, n, o, lse, causal, 0, acc,
                                        D ** -0.5, prefetch_state=backend == "gluon")
                rows.append((f"{backend} acc={int(acc)}", time_cuda(step)["ms"]))
        for label, ms in rows:
            print(f"{name:<9} {label:<24} {ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s "
                  f"per tile {ms * 1e3 * sms / tiles:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
