"""Reactive KV migration: move token ranges of requests (all layers) between instances.

`esp.migrate_kv(cache, plan, group)` is called by every instance of `group` with its own cache
and the same plan. Instances are world ranks. Entries (request, [start, end), src, dst) go in
batches: an entry and the later entries of the same (src, dst) pair, up to the next entry that
involves src or dst otherwise (the entries passed over touch neither cache). Per batch:

1. metadata: src tells dst how many of each range's tokens it holds and their positions (two
   messages for the whole batch);
2. dst allocates slots for each entry (all-or-nothing per entry) and answers ok / out of memory
   per entry (one message);
3. data: src packs the accepted tokens of every layer into contiguous chunks (>= chunk_bytes when
   they allow) and sends them; packing chunk i+1 overlaps the transfer of chunk i (two staging
   buffers per side); dst unpacks each chunk into its new pages;
4. dst acknowledges after its last unpack; only then src drops the tokens (compaction).

Any failure (allocation, communication) leaves the source intact and raises MigrationError on
both sides; dst releases whatever it had allocated for the failed entries. No token is lost or
duplicated. Batches run in the order of their first entries, the same on every instance, so
pairs never wait on each other in a cycle. A batch costs four synchronous round trips whatever
its number of entries: 0.65 ms on 2xH200 (bench/diag_migration.py), which one round of them
per entry multiplied.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Sequence

import torch

from .._checks import as_int
from ..comm.group import CommError
from .cache import CacheOutOfMemory, PagedKVCache, _member_mask
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
        start, end = as_int(start, "start"), as_int(end, "end")
        src, dst = as_int(src, "src"), as_int(dst, "dst")
        if not 0 <= start <= end:
            raise ValueError(f"bad token range [{start!r}, {end!r}) for request {request!r}")
        if src == dst:
            raise ValueError(f"entry for request {request!r} migrates from {src} to itself")
        self.entries.append(MigrationEntry(request, int(start), int(end), int(src), int(dst)))
        return self

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


def _chunking(cache: PagedKVCache, slots: torch.Tensor, chunk_bytes: int):
    """What both sides of a batch's data phase share: the cache's slot rows of all layers, the
    slots on the device, the [t0, t1) token range of each chunk, and staged(c), chunk c's view
    [layers * 2, t1 - t0, row] of one of two staging buffers (chunk c reuses chunk c - 2's)."""
    rows = cache.slot_rows()
    n = slots.numel()
    token_bytes = rows.shape[0] * cache.row_elems * cache.kv.element_size()
    step = max(1, min(n, math.ceil(chunk_bytes / token_bytes)))
    bufs = [torch.empty(rows.shape[0] * step * cache.row_elems, dtype=cache.dtype,
                        device=cache.device) for _ in range(2)]
    chunks = [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]

    def staged(c: int) -> torch.Tensor:
        t0, t1 = chunks[c]
        return bufs[c % 2][: rows.shape[0] * (t1 - t0) * cache.row_elems].view(
            rows.shape[0], t1 - t0, -1)
    return rows, slots.to(torch.int32).to(cache.device), chunks, staged


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
    for batch in _batches(plan.entries, me):
        src = batch[0].src
        peer = pos_of[batch[0].dst if me == src else src]
        if me == src:
            moved, failed = _send_batch(cache, batch, group, peer, chunk_bytes)
        else:
            moved, failed = _recv_batch(cache, batch, group, peer, chunk_bytes)
        stats["sent" if me == src else "received"] += moved
        failures += failed
    if failures:
        raise MigrationError("; ".join(failures))
    return stats


def _batches(entries: list[MigrationEntry], me: int):
    """This instance's batches in order (see the module docstring)."""
    taken = [False] * len(entries)
    for i, e in enumerate(entries):
        if taken[i] or me not in (e.src, e.dst):
            continue
        batch = []
        for j in range(i, len(entries)):
            f = entries[j]
            if (f.src, f.dst) == (e.src, e.dst):
                batch.append(f)
                taken[j] = True
            elif {f.src, f.dst} & {e.src, e.dst}:
                break
        yield batch


def _send_batch(cache: PagedKVCache, batch: list[MigrationEntry], group, peer: int,
                chunk_bytes: int) -> tuple[int, list[str]]:
    """Source side of one batch: (tokens moved, failure messages)."""
    dev = cache.device
    picked: dict = {}  # request -> positions earlier entries took (overlapping ranges)
    positions, slots = [], []
    for e in batch:
        stored = cache.positions(e.request)
        take = (stored >= e.start) & (stored < e.end)
        if e.request in picked:
            take &= ~_member_mask(stored, torch.cat(picked[e.request]))
        positions.append(stored[take])
        slots.append(cache.slots(e.request)[take])
        picked.setdefault(e.request, []).append(positions[-1])
    counts = [p.numel() for p in positions]
    ok = []
    try:
        posted = [group.send(torch.tensor(counts, dtype=torch.int64, device=dev), peer)]
        if sum(counts):
            posted.append(group.send(torch.cat(positions).to(dev), peer))
            status = torch.empty(len(batch), dtype=torch.int64, device=dev)
            group.recv(status, peer).synchronize()
            ok = [i for i, st in enumerate(status.tolist()) if st == 0 and counts[i]]
        for w in posted:
            w.synchronize()
        n = sum(counts[i] for i in ok)
        if n:
            works = _send_chunks(cache, torch.cat([slots[i] for i in ok]), group, peer,
                                 chunk_bytes)
            ack = torch.empty(1, dtype=torch.int64, device=dev)
            group.recv(ack, peer).synchronize()
            for w in works:
                w.synchronize()
            if int(ack.item()) != n:
                return 0, [f"{batch[i]}: destination acknowledged {int(ack.item())} of {n} "
                           "tokens of its batch; source kept them" for i in ok]
    except CommError as exc:
        return 0, [f"{e}: communication failed ({exc}); source kept its tokens"
                   for e, c in zip(batch, counts) if c]
    for i in ok:
        cache.remove_tokens(batch[i].request, positions[i])
    return n, [f"{e}: destination could not allocate {c} tokens; source kept them"
               for i, (e, c) in enumerate(zip(batch, counts)) if c and i not in ok]


def _send_chunks(cache: PagedKVCache, slots: torch.Tensor, group, peer: int,
                 chunk_bytes: int) -> list:
    """Pack the tokens at `slots` (all layers) chunk by chunk and send them; returns the sends'
    Works (the last two, still in flight)."""
    rows, slot_dev, chunks, staged = _chunking(cache, slots, chunk_bytes)
    works = [None, None]
    for c, (t0, t1) in enumerate(chunks):
        if works[c % 2] is not None:
            works[c % 2].wait()  # chunk c-2 has left this staging buffer
        buf = staged(c)
        copy_rows(rows, slot_dev[t0:t1], buf, None)
        works[c % 2] = group.send(buf, peer)
    return [w for w in works if w is not None]


def _recv_batch(cache: PagedKVCache, batch: list[MigrationEntry], group, peer: int,
                chunk_bytes: int) -> tuple[int, list[str]]:
    """Destination side of one batch: (tokens stored, failure messages)."""
    dev = cache.device
    allocated = []  # (entry index, positions, slots)
    failures = []
    try:
        counts_dev = torch.empty(len(batch), dtype=torch.int64, device=dev)
        group.recv(counts_dev, peer).synchronize()
        counts = counts_dev.tolist()
        if not sum(counts):
            return 0, []
        positions_dev = torch.empty(sum(counts), dtype=torch.int64, device=dev)
        group.recv(positions_dev, peer).synchronize()
        positions = positions_dev.cpu().split(counts)
        status = [0] * len(batch)
        for i, e in enumerate(batch):
            if not counts[i]:
                continue
            try:
                allocated.append((i, positions[i], cache.allocate(e.request, positions[i])))
            except (CacheOutOfMemory, ValueError) as exc:
                status[i] = 1
                failures.append(f"{e}: destination cannot take {counts[i]} tokens: {exc}")
        group.send(torch.tensor(status, dtype=torch.int64, device=dev), peer).synchronize()
        n = sum(counts[i] for i, _, _ in allocated)
        if n:
            _recv_chunks(cache, torch.cat([s for _, _, s in allocated]), group, peer, chunk_bytes)
            # Posted after the last unpack on the current stream: stored means stored.
            group.send(torch.tensor([n], dtype=torch.int64, device=dev), peer).synchronize()
        return n, failures
    except CommError as exc:
        for i, pos, _ in allocated:
            cache.remove_tokens(batch[i].request, pos)
        return 0, failures + [f"{batch[i]}: communication failed ({exc}); destination released "
                              "its slots, source keeps the tokens" for i, _, _ in allocated]


def _recv_chunks(cache: PagedKVCache, slots: torch.Tensor, group, peer: int, chunk_bytes: int):
    """Receive the chunks _send_chunks sends and unpack each into `slots` as it lands."""
    rows, slot_dev, chunks, staged = _chunking(cache, slots, chunk_bytes)
    # Post the first two receives, then unpack each chunk as it lands and re-post into its
    # buffer (the comm stream waits on the unpack before overwriting it).
    works = [group.recv(staged(c), peer) for c in range(min(2, len(chunks)))]
    for c, (t0, t1) in enumerate(chunks):
        works[c].wait()
        copy_rows(staged(c), None, rows, slot_dev[t0:t1])
        if c + 2 < len(chunks):
            works.append(group.recv(staged(c + 2), peer))
