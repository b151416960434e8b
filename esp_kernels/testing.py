"""Helpers shared by tests, benchmarks and the demo.

- Striping helpers, re-exported from `esp_kernels.striping` for older callers.
- A random variable-length batch generator.
- The tolerance table and a relative-error check against a float64/fp32 reference.
- Output poisoning, so an element a kernel forgot to write cannot pass as correct.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from .striping import (last_token_location, stripe, stripe_indices,  # noqa: F401
                       stripe_lengths, stripe_positions, unstripe)


def cu_seqlens(lengths: Sequence[int], device=None) -> torch.Tensor:
    """int32 [B+1] offsets of packed sequences of the given lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


@dataclasses.dataclass
class VarlenBatch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seqlens: list[int]
    cu_seqlens: torch.Tensor


def random_varlen_batch(seqlens: Sequence[int], num_q_heads: int, num_kv_heads: int,
                        head_dim: int, dtype=torch.float32, device="cpu",
                        generator: torch.Generator | None = None) -> VarlenBatch:
    """Random packed q [T, Hq, D], k/v [T, Hkv, D] (standard normal) for the given lengths."""
    T = sum(int(L) for L in seqlens)
    def rnd(h):
        x = torch.randn(T, h, head_dim, generator=generator, dtype=torch.float32)
        return x.to(device=device, dtype=dtype)
    return VarlenBatch(rnd(num_q_heads), rnd(num_kv_heads), rnd(num_kv_heads),
                       [int(L) for L in seqlens], cu_seqlens(seqlens, device))


def random_paged_cache(gen: torch.Generator, lens: Sequence[int], num_pages: int, page_size: int,
                       num_kv_heads: int, head_dim: int, dtype=torch.float32,
                       device="cpu"):
    """A one-layer PagedKVCache holding requests 0..B-1 of the given lengths, K/V standard
    normal (drawn on the CPU from `gen`)."""
    from .kvcache import PagedKVCache
    cache = PagedKVCache(1, num_pages, page_size, num_kv_heads, head_dim, dtype, device)
    for r, n in enumerate(lens):
        cache.allocate(r, range(n))
    k, v = cache.layer(0)
    k.copy_(torch.randn(k.shape, generator=gen))
    v.copy_(torch.randn(v.shape, generator=gen))
    return cache


def random_lengths(batch: int, max_len: int, generator: torch.Generator | None = None,
                   min_len: int = 1) -> list[int]:
    return torch.randint(min_len, max_len + 1, (batch,), generator=generator).tolist()


# Largest allowed ||out - ref|| / ||ref|| against a float64 reference, by the dtype the kernel
# reads and writes. bf16/fp16 values are about 2x the error of the same math done by PyTorch in
# that dtype (docs/DESIGN.md §8); fp32 leaves room for tf32-free fp32 accumulation order.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 over finite reference entries; NaN in out gives inf."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any():
        return math.inf
    both_inf = torch.isinf(ref64) & (out64 == ref64)
    diff = torch.where(both_inf, torch.zeros_like(out64), out64 - ref64)
    ref_f = torch.where(torch.isinf(ref64), torch.zeros_like(ref64), ref64)
    if torch.isinf(diff).any():
        return math.inf
    denom = ref_f.norm().item()
    num = diff.norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "out", factor: float = 1.0):
    """Relative-error check using TOLERANCES[dtype or out.dtype] (times `factor`)."""
    tol = TOLERANCES[dtype or out.dtype] * factor
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e}")
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN (floats) or a large sentinel (ints) before a kernel writes it."""
    if t.dtype.is_floating_point:
        return t.fill_(math.nan)
    return t.fill_(torch.iinfo(t.dtype).min)
