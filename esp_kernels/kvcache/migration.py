"""Reactive KV migration: move token ranges of requests (all layers) between instances.

`esp.migrate_kv(cache, plan, group)` is called by every instance of `group` with its own cache
and the same plan. Instances are world ranks. For each entry (request, [start, end), src, dst):

1. metadata: src tells dst how many of the range's tokens it holds and their positions;
2. dst allocates slots for all of them (all-or-nothing) and answers ok / out of memory;
3. data: src packs the tokens of every layer into contiguous chunks (>= chunk_bytes when the range
   allows) and sends them; packing chunk i+1 overlaps the transfer of chunk i (two staging
   buffers per side); dst unpacks each chunk into its new pages;
4. dst acknowledges after its last unpack; only then src drops the tokens (compaction).

Any failure (allocation, communication) leaves the source intact and raises MigrationError on
both sides; dst releases whatever it had allocated for that entry. No token is lost or
duplicated. Entries are processed in plan order; instances not in an entry skip it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Sequence

import torch

from ..comm.group import CommError
from .cache import CacheOutOfMemory, PagedKVCache
from .copy import copy_rows

# Chunks must be large enough that each posted message's host cost (~45 us on a blocking NCCL
# communicator, ~120 us on a nonblocking one; 2xH200, bench/diag_migration.py) hides behind the
# link's ~310 GB/s: 1 GiB over 8 / 32 / 64 / 128 MiB chunks took 11.2 / 6.4 / 6.5 / 6.5 ms per
# direction (blocking, h200x2 run 4). 32 MiB costs 64 MiB of staging per side while it runs.
DEFAULT_CHUNK_BYTES = 32 << 20


class MigrationError(RuntimeError):
    """A migration entry failed; the source still holds every token of it."""


@dataclasses.dataclass(frozen=True)
class MigrationEntry:
    request: Hashable
    start: int   # first global position of the range
    end: int     # one past the last
    src: int     # world rank
    dst: int     # world rank


class MigrationPlan:
    """Ordered list of (request, global token range [start, end), source, destination)."""

    def __init__(self, entries: Sequence = ()):
        self.entries: list[MigrationEntry] = []
        for e in entries:
            self.add(*(dataclasses.astuple(e) if isinstance(e, MigrationEntry) else e))

    def add(self, request, start: int, end: int, src: int, dst: int) -> "MigrationPlan":
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"bad token range [{start!r}, {end!r}) for request {request!r}")
        if src == dst:
            raise ValueError(f"entry for request {request!r} migrates from {src} to itself")
        self.entries.append(MigrationEntry(request, int(start), int(end), int(src), int(dst)))
        return self

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


def _token_bytes(cache: PagedKVCache) -> int:
    return cache.num_layers * 2 * cache.row_elems * cache.kv.element_size()


def migrate_kv(cache: PagedKVCache, plan: MigrationPlan, group, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Run the plan on this instance; returns {"sent": tokens, "received": tokens}.

    Raises MigrationError (after every entry this instance takes part in was attempted) if an
    entry failed; the failed entries leave their source intact.
    """
    if not isinstance(plan, MigrationPlan):
        raise TypeError(f"plan must be a MigrationPlan, got {type(plan).__name__}")
    if cache.device != group.device:
        raise ValueError(f"cache is on {cache.device} but the group communicates on "
                         f"{group.device}")
    me = group.world_ranks[group.rank]
    pos_of = {w: i for i, w in enumerate(group.world_ranks)}
    for e in plan:
        for who in (e.src, e.dst):
            if who not in pos_of:
                raise ValueError(f"migration entry {e} names instance {who}, which is not in the "
                                 f"group {list(group.world_ranks)}")
    stats = {"sent": 0, "received": 0}
    failures = []
    for e in plan:
        if me not in (e.src, e.dst):
            continue
        peer = pos_of[e.dst if me == e.src else e.src]
        try:
            if me == e.src:
                stats["sent"] += _send_entry(cache, e, group, peer, chunk_bytes)
            else:
                stats["received"] += _recv_entry(cache, e, group, peer, chunk_bytes)
        except MigrationError as exc:
            failures.append(str(exc))
    if failures:
        raise MigrationError("; ".join(failures))
    return stats


def _chunk_tokens(cache: PagedKVCache, n: int, chunk_bytes: int) -> int:
    return max(1, min(n, math.ceil(chunk_bytes / _token_bytes(cache))))


def _staging(cache: PagedKVCache, tokens: int) -> list[torch.Tensor]:
    return [torch.empty(cache.num_layers * 2 * tokens * cache.row_elems, dtype=cache.dtype,
                        device=cache.device) for _ in range(2)]


def _send_entry(cache: PagedKVCache, e: MigrationEntry, group, peer: int, chunk_bytes: int) -> int:
    dev = cache.device
    stored = cache.positions(e.request)
    in_range = (stored >= e.start) & (stored < e.end)
    positions = stored[in_range]
    slots = cache.slots(e.request)[in_range]
    n = positions.numel()
    try:
        group.send(torch.tensor([n], dtype=torch.int64, device=dev), peer).synchronize()
        if n == 0:
            return 0
        group.send(positions.to(dev), peer).synchronize()
        status = torch.empty(1, dtype=torch.int64, device=dev)
        group.recv(status, peer).synchronize()
        if int(status.item()) != 0:
            raise MigrationError(f"{e}: destination could not allocate {n} tokens; source kept "
                                 "them")
        rows = cache.slot_rows()
        step = _chunk_tokens(cache, n, chunk_bytes)
        bufs = _staging(cache, step)
        slot_dev = slots.to(torch.int32).to(dev)
        works = [None, None]
        for c, t0 in enumerate(range(0, n, step)):
            t1 = min(n, t0 + step)
            buf = bufs[c % 2]
            if works[c % 2] is not None:
                works[c % 2].wait()  # chunk c-2 has left this staging buffer
            staged = buf[: rows.shape[0] * (t1 - t0) * cache.row_elems]
            copy_rows(rows, slot_dev[t0:t1], staged.view(rows.shape[0], t1 - t0, -1), None)
            works[c % 2] = group.send(staged, peer)
        ack = torch.empty(1, dtype=torch.int64, device=dev)
        group.recv(ack, peer).synchronize()
        for w in works:
            if w is not None:
                w.synchronize()
        if int(ack.item()) != n:
            raise MigrationError(f"{e}: destination acknowledged {int(ack.item())} of {n} "
                                 "tokens; source kept them")
    except CommError as exc:
        raise MigrationError(f"{e}: communication failed ({exc}); source kept its tokens") from exc
    cache.remove_tokens(e.request, positions)
    return n


def _recv_entry(cache: PagedKVCache, e: MigrationEntry, group, peer: int, chunk_bytes: int) -> int:
    dev = cache.device
    positions = None
    allocated = False
    try:
        count = torch.empty(1, dtype=torch.int64, device=dev)
        group.recv(count, peer).synchronize()
        n = int(count.item())
        if n == 0:
            return 0
        positions_dev = torch.empty(n, dtype=torch.int64, device=dev)
        group.recv(positions_dev, peer).synchronize()
        positions = positions_dev.cpu()
        try:
            slots = cache.allocate(e.request, positions)
            allocated = True
            status = 0
        except (CacheOutOfMemory, ValueError) as exc:
            status, reason = 1, exc
        group.send(torch.tensor([status], dtype=torch.int64, device=dev), peer).synchronize()
        if status:
            raise MigrationError(f"{e}: destination cannot take {n} tokens: {reason}")
        rows = cache.slot_rows()
        step = _chunk_tokens(cache, n, chunk_bytes)
        bufs = _staging(cache, step)
        slot_dev = slots.to(torch.int32).to(dev)
        # Post the first two receives, then unpack each chunk as it lands and re-post into its
        # buffer (the comm stream waits on the unpack before overwriting it).
        chunks = [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]
        views, works = [], []
        for c, (t0, t1) in enumerate(chunks[:2]):
            v = bufs[c][: rows.shape[0] * (t1 - t0) * cache.row_elems]
            views.append(v)
            works.append(group.recv(v, peer))
        for c, (t0, t1) in enumerate(chunks):
            works[c].wait()
            copy_rows(views[c].view(rows.shape[0], t1 - t0, -1), None, rows, slot_dev[t0:t1])
            if c + 2 < len(chunks):
                u0, u1 = chunks[c + 2]
                v = bufs[c % 2][: rows.shape[0] * (u1 - u0) * cache.row_elems]
                views.append(v)
                works.append(group.recv(v, peer))
        # The ack is posted after the last unpack on the current stream: stored means stored.
        group.send(torch.tensor([n], dtype=torch.int64, device=dev), peer).synchronize()
        return n
    except CommError as exc:
        if allocated:
            cache.remove_tokens(e.request, positions)
        raise MigrationError(f"{e}: communication failed ({exc}); destination released its "
                             "slots, source keeps the tokens") from exc
