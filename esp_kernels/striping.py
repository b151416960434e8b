"""Striping: where each token of a request lives in a prefill ring of P ranks.

Token ``g`` (0-based global position within its request) of a request lives on ring rank
``g mod P`` at local index ``g div P`` of that request's stripe. A rank's input to
``esp.ring_prefill`` is the concatenation, request by request, of its stripes ("packed stripes").
An engine needs these helpers to cut its batch into stripes, to give RoPE the global position of
every stripe token, and to find the rank and row holding each request's last prompt token (where
the first output token is sampled).

Ranks here are *ring ranks* (positions in the ordered ESP group), not world ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import as_int, as_lengths

__all__ = ["stripe_lengths", "stripe_indices", "stripe_positions", "stripe", "unstripe",
           "last_token_location"]


def _check_world(world: int, rank: int | None = None) -> tuple[int, int | None]:
    world = as_int(world, "world")
    if world < 1:
        raise ValueError(f"world (ring size) must be >= 1, got {world}")
    if rank is not None:
        rank = as_int(rank, "rank")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the ring of {world} ranks")
    return world, rank


def stripe_lengths(seqlens: Sequence[int], world: int, rank: int) -> list[int]:
    """Tokens of each request that ring rank `rank` of `world` holds: #{g < L : g mod P == rank}."""
    world, rank = _check_world(world, rank)
    return [max(0, (L - rank + world - 1) // world) for L in as_lengths(seqlens)]


def stripe_indices(seqlens: Sequence[int], world: int, rank: int, device=None) -> torch.Tensor:
    """int64 indices into the globally packed batch of the tokens `rank` holds, in local order."""
    world, rank = _check_world(world, rank)
    idx, start = [], 0
    for L in as_lengths(seqlens):
        idx.append(torch.arange(start + min(rank, L), start + L, world, dtype=torch.int64))
        start += L
    out = torch.cat(idx) if idx else torch.empty(0, dtype=torch.int64)
    return out.to(device) if device is not None else out


def stripe_positions(seqlens: Sequence[int], world: int, rank: int, device=None) -> torch.Tensor:
    """int64 global position (within its request) of each token `rank` holds, in local order:
    what an engine feeds RoPE for the rank's packed stripes."""
    world, rank = _check_world(world, rank)
    pos = [torch.arange(min(rank, L), L, world, dtype=torch.int64) for L in as_lengths(seqlens)]
    out = torch.cat(pos) if pos else torch.empty(0, dtype=torch.int64)
    return out.to(device) if device is not None else out


def stripe(x: torch.Tensor, seqlens: Sequence[int], world: int) -> list[torch.Tensor]:
    """Split a globally packed ``[T, ...]`` batch into the `world` ranks' packed stripes."""
    world, _ = _check_world(world)
    seqlens = as_lengths(seqlens)
    total = sum(seqlens)
    if x.shape[0] != total:
        raise ValueError(f"x has {x.shape[0]} tokens but seqlens sum to {total}")
    return [x[stripe_indices(seqlens, world, r, x.device)] for r in range(world)]


def unstripe(parts: Sequence[torch.Tensor], seqlens: Sequence[int]) -> torch.Tensor:
    """Inverse of `stripe`: reassemble the globally packed batch from every rank's stripes."""
    world = len(parts)
    _check_world(world)
    seqlens = as_lengths(seqlens)
    total = sum(seqlens)
    for r, part in enumerate(parts):
        want = sum(stripe_lengths(seqlens, world, r))
        if part.shape[0] != want:
            raise ValueError(f"part {r} has {part.shape[0]} tokens, its stripes hold {want}")
    out = parts[0].new_empty((total,) + tuple(parts[0].shape[1:]))
    for r, part in enumerate(parts):
        out[stripe_indices(seqlens, world, r, part.device)] = part
    return out


def last_token_location(seqlens: Sequence[int], world: int) -> list[tuple[int, int]]:
    """For each request, ``(ring rank, row)`` of its last token (position L-1) in that rank's
    packed stripes: the row of the prefill output from which the first new token is sampled."""
    world, _ = _check_world(world)
    offsets = [0] * world
    out = []
    for L in as_lengths(seqlens):
        if L < 1:
            raise ValueError(f"a request of length {L} has no last token")
        r = (L - 1) % world
        out.append((r, offsets[r] + (L - 1) // world))
        for j in range(world):
            offsets[j] += max(0, (L - j + world - 1) // world)
    return out
