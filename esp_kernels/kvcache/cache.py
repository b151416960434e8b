"""Paged KV cache of one instance, all layers (`esp.PagedKVCache`).

Storage: `kv` [num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim]. A *slot* is
page * page_size + offset. Pages belong to one request; a request's tokens on this instance are
stored densely in its pages in storage order (token i at page pages[i // page_size], offset
i % page_size), each with its global position, so a request may sit on several instances in any
split and order (token-level placement). Dense storage is what the decode kernel reads; removing
tokens (migration) therefore moves the request's last tokens into the holes (compaction).

The allocator is host-side bookkeeping: all-or-nothing (a request that does not fit raises
CacheOutOfMemory naming it and the shortfall, and nothing changes).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Hashable, Iterable, Mapping

import torch

from .._checks import FLOAT_DTYPES, as_int, as_int_tensor, resolve_device
from .._host import int_tensor
from .copy import copy_rows


def plain_request_id(rid):
    """Integer-like request ids (numpy integers, 0-d integer tensors) as ints, so that plans
    carry plain values; other ids unchanged (they hash and compare alike in a cache)."""
    if isinstance(rid, (int, str)) or not hasattr(rid, "__index__"):
        return rid
    return operator.index(rid)


def plan_request_id(rid, what: str = "request id"):
    """rid itself if it can travel in a plan's dict (an int or a str), else TypeError."""
    if not isinstance(rid, (int, str)) or isinstance(rid, bool):
        raise TypeError(f"{what} {rid!r} must be an int or a str to travel in a plan's dict")
    return rid


class CacheOutOfMemory(MemoryError):
    """An allocation does not fit in the free pages; the cache is unchanged."""


class _Ints:
    """Growable int64 CPU array (amortized O(1) appends for one-token decode steps)."""

    def __init__(self):
        self.buf = torch.empty(16, dtype=torch.int64)
        self.n = 0

    def extend(self, values: torch.Tensor):
        need = self.n + values.numel()
        if need > self.buf.numel():
            grown = torch.empty(max(need, 2 * self.buf.numel()), dtype=torch.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n:need] = values
        self.n = need

    def append(self, value: int):
        if self.n == self.buf.numel():
            self.extend(torch.tensor([value], dtype=torch.int64))
        else:
            self.buf[self.n] = value
            self.n += 1

    def view(self) -> torch.Tensor:
        return self.buf[: self.n]

    def truncate(self, n: int):
        self.n = n


@dataclasses.dataclass
class _Shard:
    pages: list[int]
    positions: _Ints
    top: int = 0    # every stored position is below it (an upper bound: removals keep it)


@dataclasses.dataclass(frozen=True)
class CacheStats:
    used_tokens: int
    used_pages: int
    free_pages: int
    free_tokens: int        # slots a new request could take: free_pages * page_size
    fragmented_slots: int   # free slots inside partly used pages (usable by their request only)
    fragmentation: float    # fragmented_slots / all free slots (0 when nothing is free)


def _positions_tensor(positions, name="positions") -> torch.Tensor:
    # Floats are rejected, not truncated (positions [0.0, 1.5] would store 0 and 1).
    t = as_int_tensor(positions, name, torch.int64, "cpu")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative")
    if _has_duplicates(t):
        raise ValueError(f"{name} has duplicate positions")
    return t


def _table_fits(top: int, n: int) -> bool:
    """Whether a table of one byte per position below `top` stays near the size of n inputs."""
    return top <= 64 * n + (1 << 20)


def _has_duplicates(t: torch.Tensor) -> bool:
    """For non-negative positions; a count table (bincount) where it fits: 0.1 ms for 32k
    positions against 0.5 ms for a sort (torch.unique) on this build machine."""
    if t.numel() < 2:
        return False
    if not _table_fits(int(t.max()) + 1, t.numel()):
        return t.unique().numel() != t.numel()
    return bool(torch.bincount(t).max() > 1)


def _member_mask(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """torch.isin(values, members) for non-negative positions (both unique, CPU int64).

    A lookup table indexed by position where it fits: 0.19 ms for 32k positions against 1.7 ms
    for isin's sort (this build machine); migrating a request removes all of its tokens at once."""
    if not values.numel() or not members.numel():
        return torch.zeros(values.shape, dtype=torch.bool)
    top = int(max(values.max(), members.max())) + 1
    if not _table_fits(top, values.numel() + members.numel()):
        return torch.isin(values, members, assume_unique=True)
    table = torch.zeros(top, dtype=torch.bool)
    table[members] = True
    return table[values]


def block_table_rows(placements) -> tuple[list, int, list]:
    """(flat block table rows, width, kv lengths) of `placement()` values as Python lists:
    row i holds request i's pages, padded with 0 to the widest (at least 1); a request without
    tokens has length 0."""
    width = max(max([len(pages) for pages, _ in placements], default=0), 1)
    flat, lens = [], []
    for pages, n in placements:
        flat.extend(pages)
        flat.extend([0] * (width - len(pages)))
        lens.append(n if pages else 0)
    return flat, width, lens


class PagedKVCache:
    """Paged K/V storage of one instance for all layers (see module docstring)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        # device defaults to the CPU, like torch's factories: a cache never lands on CUDA unless
        # asked to.
        num_layers, num_pages, page_size, num_kv_heads, head_dim = (
            as_int(val, name, minimum=1) for name, val in (
                ("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = resolve_device(device)
        self.kv = torch.empty((num_layers, 2, num_pages, page_size, num_kv_heads, head_dim),
                              dtype=dtype, device=self.device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._shards: dict[Hashable, _Shard] = {}
        self._version = 0

    # ---- views ---------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def row_elems(self) -> int:
        """Elements of one token's K (or V) in one layer: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer, each [num_pages, page_size, num_kv_heads, head_dim]."""
        layer = self._check_layer(layer)
        return self.kv[layer, 0], self.kv[layer, 1]

    def layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of every layer, each [num_layers, num_pages, page_size, num_kv_heads,
        head_dim] (strided views of the pool: layer l of k is `layers()[0][l]`)."""
        return self.kv[:, 0], self.kv[:, 1]

    def slot_rows(self, layer: int | None = None) -> torch.Tensor:
        """[2, num_slots, row] for one layer, or [num_layers * 2, num_slots, row] for all."""
        if layer is None:
            return self.kv.view(self.num_layers * 2, self.num_slots, self.row_elems)
        layer = self._check_layer(layer)
        return self.kv[layer].view(2, self.num_slots, self.row_elems)

    def _check_layer(self, layer) -> int:
        layer = as_int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer!r} is outside [0, {self.num_layers})")
        return layer

    # ---- bookkeeping ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Increases whenever the placement of tokens changes (allocate, free, remove_tokens):
        a runner prepared from the cache's block tables checks it before each launch."""
        return self._version

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def requests(self) -> list:
        return list(self._shards)

    def num_tokens(self, request) -> int:
        shard = self._shards.get(request)
        return 0 if shard is None else shard.positions.n

    def positions(self, request) -> torch.Tensor:
        """Global positions of the request's tokens here, in storage order (int64, CPU)."""
        shard = self._shards.get(request)
        return torch.empty(0, dtype=torch.int64) if shard is None else shard.positions.view().clone()

    def last_token(self, request) -> tuple[int, int] | None:
        """(global position, slot) of the request's last stored token here, or None."""
        shard = self._shards.get(request)
        n = 0 if shard is None else shard.positions.n
        if n == 0:
            return None
        return (int(shard.positions.buf[n - 1]),
                shard.pages[(n - 1) // self.page_size] * self.page_size + (n - 1) % self.page_size)

    def placement(self, request) -> tuple[tuple[int, ...], int]:
        """(pages, number of tokens) of the request here; ((), 0) if it has none."""
        shard = self._shards.get(request)
        return ((), 0) if shard is None else (tuple(shard.pages), shard.positions.n)

    def slots(self, request) -> torch.Tensor:
        """Slot of each of the request's tokens here, in storage order (int64, CPU)."""
        shard = self._shards.get(request)
        if shard is None:
            return torch.empty(0, dtype=torch.int64)
        return self._slots_of(shard, 0, shard.positions.n)

    def _slots_of(self, shard: _Shard, start: int, end: int) -> torch.Tensor:
        # Whole pages' slots, then the slice: no per-token int64 division (0.40 -> 0.1 ms for
        # 32k tokens on this build machine).
        ps = self.page_size
        first = start // ps
        pages = torch.as_tensor(shard.pages[first:(end + ps - 1) // ps], dtype=torch.int64)
        slots = (pages[:, None] * ps + torch.arange(ps, dtype=torch.int64)).flatten()
        return slots[start - first * ps:end - first * ps]

    def pages_needed(self, request, n_new: int) -> int:
        """Pages the request would have to take to store n_new more tokens."""
        shard = self._shards.get(request)
        have = 0 if shard is None else len(shard.pages) * self.page_size - shard.positions.n
        return max(0, math.ceil((n_new - have) / self.page_size))

    def allocate(self, request, positions) -> torch.Tensor:
        """Reserve slots for tokens at the given global positions; returns their slots (int64).

        All-or-nothing: raises CacheOutOfMemory (cache unchanged) if the pages do not suffice.
        """
        return self.allocate_many({request: positions})[request]

    def allocate_many(self, requests: Mapping[Hashable, Iterable[int]]) -> dict:
        """allocate() for several requests at once, all-or-nothing across all of them."""
        if not isinstance(requests, Mapping):
            raise TypeError(f"requests must be a mapping {{request id: positions}}, got "
                            f"{type(requests).__name__}")
        pos = {r: _positions_tensor(p, f"positions of request {r!r}") for r, p in requests.items()}
        need = {r: self.pages_needed(r, p.numel()) for r, p in pos.items()}
        total = sum(need.values())
        if total > len(self._free):
            worst = max(need, key=need.get)
            raise CacheOutOfMemory(
                f"cannot store {sum(p.numel() for p in pos.values())} tokens of requests "
                f"{list(pos)} (request {worst!r} alone needs {need[worst]} pages): {total} pages "
                f"needed, {len(self._free)} free, short by {total - len(self._free)} pages "
                f"({(total - len(self._free)) * self.page_size} tokens of page size "
                f"{self.page_size})")
        for r, p in pos.items():
            shard = self._shards.get(r)
            if shard is not None and p.numel():
                dup = _member_mask(p, shard.positions.view())
                if bool(dup.any()):
                    raise ValueError(f"request {r!r} already stores positions "
                                     f"{p[dup][:8].tolist()} here")
        out = {}
        for r, p in pos.items():
            shard = self._shards.setdefault(r, _Shard([], _Ints()))
            if need[r]:  # the pool's last pages, in pop() order
                shard.pages.extend(reversed(self._free[-need[r]:]))
                del self._free[-need[r]:]
            start = shard.positions.n
            shard.positions.extend(p)
            if p.numel():
                shard.top = max(shard.top, int(p.max()) + 1)
            out[r] = self._slots_of(shard, start, shard.positions.n)
        if out:
            self._version += 1
        return out

    def append_one(self, tokens: Mapping[Hashable, int]) -> dict:
        """A decode step's appends: one new token per request at the given global position
        (request id -> position); returns {request id: slot}. allocate_many's contract
        (all-or-nothing, CacheOutOfMemory, duplicate positions rejected) on plain ints: ~3 us a
        request where allocate_many's tensors take ~50 us (16 requests: 0.8 ms a step on this
        build machine, a tenth of a decode iteration). Positions at or below a request's stored
        ones take allocate_many's checks."""
        ps, new_pages, todo = self.page_size, 0, []
        for r, p in tokens.items():
            p = as_int(p, f"position of request {r!r}")
            shard = self._shards.get(r)
            if p < 0 or (shard is not None and p < shard.top):
                return self.allocate_many({r2: [p2] for r2, p2 in tokens.items()})
            if shard is None or shard.positions.n == len(shard.pages) * ps:
                new_pages += 1
            todo.append((r, p, shard))
        if new_pages > len(self._free):
            return self.allocate_many({r: [p] for r, p in tokens.items()})  # raises, named
        out = {}
        for r, p, shard in todo:
            if shard is None:
                shard = self._shards[r] = _Shard([], _Ints())
            n = shard.positions.n
            if n == len(shard.pages) * ps:
                shard.pages.append(self._free.pop())
            shard.positions.append(p)
            shard.top = p + 1
            out[r] = shard.pages[n // ps] * ps + n % ps
        if out:
            self._version += 1
        return out

    def free(self, request) -> None:
        """Return all of the request's pages here to the free pool."""
        shard = self._shards.pop(request, None)
        if shard is not None:
            self._free.extend(reversed(shard.pages))
            self._version += 1

    def remove_tokens(self, request, positions) -> int:
        """Drop the request's tokens at `positions` here, keeping storage dense.

        The request's last kept tokens move into the holes (one row copy over all layers on the
        current stream); pages left empty return to the pool. Returns the number removed.
        """
        shard = self._shards.get(request)
        if shard is None:
            return 0
        drop = _positions_tensor(positions)
        stored = shard.positions.view()
        gone = _member_mask(stored, drop)
        n, n_rm = stored.numel(), int(gone.sum())
        if n_rm == 0:
            return 0
        n_keep = n - n_rm
        holes = torch.nonzero(gone[:n_keep]).flatten()
        movers = torch.nonzero(~gone[n_keep:]).flatten() + n_keep
        if holes.numel():
            slots = self._slots_of(shard, 0, n)
            rows = self.slot_rows()
            copy_rows(rows, slots[movers].to(torch.int32).to(self.device), rows,
                      slots[holes].to(torch.int32).to(self.device))
            stored[holes] = stored[movers]
        shard.positions.truncate(n_keep)
        keep_pages = math.ceil(n_keep / self.page_size)
        released = shard.pages[keep_pages:]
        del shard.pages[keep_pages:]
        self._free.extend(reversed(released))
        if n_keep == 0:
            del self._shards[request]
        self._version += 1
        return n_rm

    def block_table(self, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table int32 [B, max_pages], kv_lens int32 [B]) on the cache's device.

        Requests without tokens here get length 0 (and no pages).
        """
        return self.block_table_of([self.placement(r) for r in requests])

    def block_table_of(self, placements, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """block_table() of given `placement()` values (pages, tokens), on `device` (default:
        the cache's)."""
        flat, width, lens = block_table_rows(placements)
        device = self.device if device is None else device
        bt = int_tensor(flat, torch.int32).view(len(lens), width)
        return bt.to(device), int_tensor(lens, torch.int32).to(device)

    def gather(self, request, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [n, num_kv_heads, head_dim] of the request's tokens here, storage order."""
        slots = self.slots(request).to(self.device)
        rows = self.slot_rows(layer)[:, slots]
        shape = (slots.numel(), self.num_kv_heads, self.head_dim)
        return rows[0].view(shape), rows[1].view(shape)

    def stats(self) -> CacheStats:
        used_tokens = sum(s.positions.n for s in self._shards.values())
        used_pages = sum(len(s.pages) for s in self._shards.values())
        fragmented = used_pages * self.page_size - used_tokens
        free_tokens = len(self._free) * self.page_size
        all_free = free_tokens + fragmented
        return CacheStats(used_tokens, used_pages, len(self._free), free_tokens, fragmented,
                          fragmented / all_free if all_free else 0.0)

    def __repr__(self):
        s = self.stats()
        return (f"PagedKVCache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, used_tokens={s.used_tokens}, free_pages={s.free_pages})")
