"""Helpers shared by tests, benchmarks and the demo.

- Striping: token g of a request lives on rank g mod P at local index g div P.
- A random variable-length batch generator.
- The tolerance table and a relative-error check against a float64/fp32 reference.
- Output poisoning, so an element a kernel forgot to write cannot pass as correct.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch


def cu_seqlens(lengths: Sequence[int], device=None) -> torch.Tensor:
    """int32 [B+1] offsets of packed sequences of the given lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def stripe_lengths(seqlens: Sequence[int], world: int, rank: int) -> list[int]:
    """Tokens of each request that rank `rank` of `world` holds: #{g < L : g mod P == rank}."""
    return [max(0, (int(L) - rank + world - 1) // world) for L in seqlens]


def stripe_indices(seqlens: Sequence[int], world: int, rank: int, device=None) -> torch.Tensor:
    """Indices into the globally packed batch of the tokens rank `rank` holds, in local order."""
    idx, start = [], 0
    for L in seqlens:
        idx.append(torch.arange(start + min(rank, int(L)), start + int(L), world,
                                dtype=torch.int64))
        start += int(L)
    out = torch.cat(idx) if idx else torch.empty(0, dtype=torch.int64)
    return out.to(device) if device is not None else out


def stripe_positions(seqlens: Sequence[int], world: int, rank: int, device=None) -> torch.Tensor:
    """Global position (within its request) of each token rank `rank` holds, in local order."""
    pos = [torch.arange(min(rank, int(L)), int(L), world, dtype=torch.int64) for L in seqlens]
    out = torch.cat(pos) if pos else torch.empty(0, dtype=torch.int64)
    return out.to(device) if device is not None else out


def stripe(x: torch.Tensor, seqlens: Sequence[int], world: int) -> list[torch.Tensor]:
    """Split a globally packed [T, ...] batch into the `world` ranks' packed stripes."""
    if x.shape[0] != sum(int(L) for L in seqlens):
        raise ValueError(f"x has {x.shape[0]} tokens but seqlens sum to {sum(seqlens)}")
    return [x[stripe_indices(seqlens, world, r, x.device)] for r in range(world)]


def unstripe(parts: Sequence[torch.Tensor], seqlens: Sequence[int]) -> torch.Tensor:
    """Inverse of `stripe`: reassemble the globally packed batch from every rank's stripes."""
    world = len(parts)
    total = sum(int(L) for L in seqlens)
    out = parts[0].new_empty((total,) + tuple(parts[0].shape[1:]))
    for r, part in enumerate(parts):
        out[stripe_indices(seqlens, world, r, part.device)] = part
    return out


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


def random_lengths(batch: int, max_len: int, generator: torch.Generator | None = None,
                   min_len: int = 1) -> list[int]:
    return torch.randint(min_len, max_len + 1, (batch,), generator=generator).tolist()


# Largest allowed ||out - ref|| / ||ref|| against a float64 reference, by the dtype the kernel
# reads and writes. bf16/fp16 values are about 2x the error of the same math done by PyTorch in
# that dtype (DESIGN.md §5); fp32 leaves room for tf32-free fp32 accumulation order.
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
