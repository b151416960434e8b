"""An analytic H100 model that writes samples in the profiling format: the placeholder profile.

Until bench/profile_cost_model.py has measured a real H100, the shipped profile is fitted from
these samples (its meta.source says "analytic placeholder"). Every constant is a measured rate
from this project or a datasheet:

- GEMMs: 790 TFLOP/s dense bf16 (H100 SXM datasheet) at 75% -> 592 TFLOP/s; weights stream at
  3.0 TB/s (copy rate measured on the H100, /work/shared/anchors README); per-layer time is
  the larger of the two plus 20 us of launches (~10 kernels).
- Prefill attention: causal FLOPs 2·Hq·D·l² at rate(t) = 700 TFLOP/s · t / (t + 1300) for a
  ring step of t = l/P tokens, close to the anchors' FA3 strict-lower step rates (397 / 537 /
  644 TFLOP/s measured at 2k / 4k / 8k; 428 / 531 / 604 here) and their 656-671 full-causal
  rates at 16k-64k (648-686 here); 10 us launch cost per ring step.
- Decode attention: 12 us + KV bytes / 3.0 TB/s + 0.3 us per request, which reproduces the
  anchors' paged decode (B1 L128k 194 us -> 191; B8 L1k 26.2 us -> 25.6).
- Copy: 5 us + bytes / 3.0 TB/s.
- Link: the measured blocking NCCL sends on 2xH200 (bench/results/2026-11-24_h200x2_run4,
  diag_migration.txt), used as they are ("modelled": one GPU has no link).
"""

from __future__ import annotations

from .cost_model import ModelConfig

GEMM_FLOPS = 0.75 * 790e12
HBM_BYTES_PER_S = 3.0e12
ATTN_PEAK_FLOPS = 700e12
ATTN_HALF_TOKENS = 1300
RING_STEP_S = 10e-6
# (bytes, seconds per message): 1 / 8 / 32 / 128 / 1024 MiB messages, blocking communicator.
H200X2_LINK = [(1 << 20, 43.2e-6), (8 << 20, 42.4e-6), (32 << 20, 115.9e-6),
               (128 << 20, 458.2e-6), (1024 << 20, 3193.8e-6)]


def dense_time(m: ModelConfig, n: int) -> float:
    w = m.dense_params_per_layer
    return 20e-6 + max(w * m.dtype_bytes / HBM_BYTES_PER_S, 2 * w * n / GEMM_FLOPS)


def lm_head_time(m: ModelConfig, n: int) -> float:
    w = m.vocab * m.hidden
    return 10e-6 + max(w * m.dtype_bytes / HBM_BYTES_PER_S, 2 * w * n / GEMM_FLOPS)


def ring_attn_time(m: ModelConfig, P: int, seqlens) -> float:
    """All P ranks of one layer, one after another (the virtual-rank measurement)."""
    t = P * P * RING_STEP_S
    for L in seqlens:
        step = L / P
        t += 2 * m.num_q_heads * m.head_dim * L * L * (step + ATTN_HALF_TOKENS) / (
            ATTN_PEAK_FLOPS * step)
    return t


def decode_attn_time(m: ModelConfig, kv_lens) -> float:
    kv_bytes = sum(kv_lens) * m.kv_bytes_per_token_layer
    return 12e-6 + kv_bytes / HBM_BYTES_PER_S + 0.3e-6 * len(kv_lens)


def copy_time(nbytes: int) -> float:
    return 5e-6 + nbytes / HBM_BYTES_PER_S


def analytic_samples(m: ModelConfig | None = None) -> dict:
    """A samples document (SCHED_SPEC.md format) from the analytic model."""
    m = m or ModelConfig()
    S = []
    sizes = sorted({b * 2 ** k for k in range(17) for b in (1, 3) if b * 2 ** k <= 65536})
    S += [{"kind": "dense", "tokens": n, "time_s": dense_time(m, n)} for n in sizes]
    S += [{"kind": "lm_head", "tokens": n, "time_s": lm_head_time(m, n)}
          for n in sizes if n <= 4096]
    batches = [[1024], [4096], [16384], [65536], [131072], [2048] * 8, [8192, 4096, 1024, 512],
               [32768, 16384, 8192], [512] * 32, [100000, 3000]]
    for P in (1, 2, 4, 8):
        for sl in batches:
            S.append({"kind": "ring_attn", "group_size": P, "seqlens": sl,
                      "time_s": ring_attn_time(m, P, sl)})
            S.append({"kind": "prefill_layer", "group_size": P, "seqlens": sl,
                      "time_s": ring_attn_time(m, P, sl) + P * dense_time(m, -(-sum(sl) // P))})
    for B in (1, 4, 16, 64, 128, 256):
        for L in (256, 1024, 4096, 16384, 65536, 131072):
            if B * L <= 1 << 22:
                S.append({"kind": "decode_attn", "kv_lens": [L] * B,
                          "time_s": decode_attn_time(m, [L] * B)})
                S.append({"kind": "decode_layer", "kv_lens": [L] * B,
                          "time_s": decode_attn_time(m, [L] * B) + dense_time(m, B)})
    S += [{"kind": "copy", "bytes": 1 << k, "time_s": copy_time(1 << k)} for k in range(16, 33, 2)]
    S += [{"kind": "link", "bytes": b, "time_s": t, "source": "2xH200 NCCL send (modelled)"}
          for b, t in H200X2_LINK]
    return {"device": "H100 (analytic)", "torch": "none", "commit": "none", "date": "none",
            "source": "analytic placeholder", "model": m.to_dict(), "samples": S}
