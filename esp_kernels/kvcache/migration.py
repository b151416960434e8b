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

Failures. dst out of memory for an entry: that entry is refused in step 2 (its source keeps it),
the batch and the later batches go on, and MigrationError names the refused entries at the end on
both sides, after a closing round over the group (so every other batch has run). Any other
failure, in the metadata round (see `MigrationRunner.run`) or a batch (communication, or any
exception on either side), ends the run on that instance at once: dst
releases what it allocated for the batch, src keeps every token of it (it drops tokens only
after step 4), and the instance raises MigrationError (cause chained) without posting anything
more, since the pair's messages no longer match. Its peer, blocked on it, and the instances
waiting in the closing round raise CommAborted (passed through unchanged) as soon as the world is
aborted: at once on virtual ranks (run_local
aborts the world when a rank raises) and for NCCL communication errors (they abort the world);
on a process backend, a peer of an instance that raised a non-communication error learns it at
its wait's timeout unless the caller aborts the world. Batches finished before stay done. No
token is lost or duplicated.

Batches run in the order of their first entries, the same on every instance, so pairs never
wait on each other in a cycle. A batch costs four synchronous round trips whatever its number
of entries: 0.65 ms on 2xH200 (bench/diag_migration.py), which one round of them per entry
multiplied.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Sequence

import torch

from .._checks import as_int
from ..comm.group import CommAborted, CommError
from .cache import (CacheOutOfMemory, PagedKVCache, _member_mask, plain_request_id,
                    plan_request_id)
from .copy import copy_rows

# Chunks must be large enough that each posted message's host cost (~45 us on a blocking NCCL
# communicator, ~120 us on a nonblocking one; 2xH200, bench/diag_migration.py) hides behind the
# link's ~310 GB/s: 1 GiB over 8 / 32 / 64 / 128 MiB chunks took 11.2 / 6.4 / 6.5 / 6.5 ms per
# direction (blocking communicator, 2xH200). 32 MiB costs 64 MiB of staging per side while it runs.
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
    """Ordered list of (request, global token range [start, end), source, destination).

    Pure data: compares by value and round-trips through `to_dict()` / `from_dict()`; `add`
    appends an entry (a builder's convenience: a plan handed to `migrate_kv` should not change
    while it runs)."""

    __hash__ = None  # mutable through add(): equal by value, not hashable

    def __init__(self, entries: Sequence = ()):
        self.entries: list[MigrationEntry] = []
        for e in entries:
            self.add(*(dataclasses.astuple(e) if isinstance(e, MigrationEntry) else e))

    def add(self, request, start: int, end: int, src: int, dst: int) -> "MigrationPlan":
        request = plain_request_id(request)  # a numpy integer id travels as an int
        start, end = as_int(start, "start"), as_int(end, "end")
        if not 0 <= start <= end:
            raise ValueError(f"bad token range [{start!r}, {end!r}) for request {request!r}")
        src = as_int(src, f"source of request {request!r}", minimum=0)
        dst = as_int(dst, f"destination of request {request!r}", minimum=0)
        if src == dst:
            raise ValueError(f"entry for request {request!r} migrates from {src} to itself")
        self.entries.append(MigrationEntry(request, start, end, src, dst))
        return self

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __eq__(self, other):
        if not isinstance(other, MigrationPlan):
            return NotImplemented
        return self.entries == other.entries

    def to_dict(self) -> dict:
        """Plain ints, strings and lists (JSON-ready); request ids must be ints or strs."""
        for e in self.entries:
            plan_request_id(e.request)
        return {"kind": "MigrationPlan", "entries": [list(dataclasses.astuple(e))
                                                     for e in self.entries]}

    @classmethod
    def from_dict(cls, d) -> "MigrationPlan":
        if d.get("kind") != "MigrationPlan":
            raise ValueError(f"not a MigrationPlan dict (kind {d.get('kind')!r})")
        return cls([tuple(e) for e in d["entries"]])

    def __repr__(self):
        return f"MigrationPlan({len(self.entries)} entries)"


class MigrationRunner:
    """This instance's part of a MigrationPlan, prepared once: its batches (the same order on
    every instance, see the module docstring) and the chunking of the data phase (tokens per
    chunk from `chunk_bytes`; two staging buffers shared by every batch and both directions,
    allocated when first needed). `run()` moves the tokens; call it on every instance of the
    group."""

    def __init__(self, plan: MigrationPlan, group, cache: PagedKVCache, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if not isinstance(plan, MigrationPlan):
            raise TypeError(f"plan must be a MigrationPlan, got {type(plan).__name__}")
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        if cache.device != group.device:
            raise ValueError(f"cache is on {cache.device} but the group communicates on "
                             f"{group.device}")
        chunk_bytes = as_int(chunk_bytes, "chunk_bytes")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.me = group.world_ranks[group.rank]
        self._pos_of = {w: i for i, w in enumerate(group.world_ranks)}
        for e in plan:
            for who in (e.src, e.dst):
                if who not in self._pos_of:
                    raise ValueError(f"migration entry {e} names instance {who}, which is not "
                                     f"in the group {list(group.world_ranks)}")
        self.plan, self.group = plan, group
        self.cache = cache
        self.entries = list(plan.entries)  # a copy: the plan may be added to later
        self.batches = list(_batches(self.entries, self.me))
        self._rows = cache.slot_rows()     # [layers * 2, slots, row] of the whole pool
        token_bytes = self._rows.shape[0] * cache.row_elems * cache.kv.element_size()
        self.chunk_tokens = max(1, math.ceil(chunk_bytes / token_bytes))
        self._bufs: list[torch.Tensor] = []

    def run(self) -> dict:
        """Run the plan on this instance; returns {"sent": tokens, "received": tokens}.

        First one metadata round over the group checks that the source of every entry holds
        some of its tokens (or receives them from an earlier entry): an unknown request, or a
        range the source holds none of, raises MigrationError naming them on every instance,
        with nothing moved. Then the batches run; an entry its destination cannot allocate stays
        on its source, the others go on, and MigrationError names the refused entries at the
        end, after a closing round over the group (every instance has run its batches by then).
        Any other failure ends the run at once (see the module docstring).
        """
        cache = self.cache
        self._check_sources(cache)
        stats = {"sent": 0, "received": 0}
        failures = []
        for batch in self.batches:
            sending = self.me == batch[0].src
            peer = self._pos_of[batch[0].dst if sending else batch[0].src]
            try:
                if sending:
                    moved, failed = self._send_batch(cache, batch, peer)
                else:
                    moved, failed = self._recv_batch(cache, batch, peer)
            except CommAborted:
                raise  # a peer failed: its own error says what; this side kept or released all
            except Exception as exc:
                raise MigrationError("; ".join(failures + [_broken(batch, self.me, exc)])) from exc
            stats["sent" if sending else "received"] += moved
            failures += failed
        # A closing round over the group: an instance with refused entries must not raise while
        # other pairs still move their batches (on virtual ranks, run_local aborts the world when
        # a rank raises: their entries then stopped mid-run, a different set from run to run).
        try:
            self.group.all_gather_ints([len(failures)])
        except CommAborted:
            raise
        except Exception as exc:
            raise MigrationError("; ".join(failures + [
                f"every batch ran, then the closing round failed on instance {self.me}: "
                f"{type(exc).__name__}: {exc}"])) from exc
        if failures:
            raise MigrationError("; ".join(failures))
        return stats

    def _check_sources(self, cache: PagedKVCache):
        """Collective: every entry's source holds tokens of it now or gets some from an earlier
        entry (same request, overlapping range, destination = this source)."""
        held = []
        for e in self.entries:
            n = 0
            if e.src == self.me and e.end > e.start:
                stored = cache.positions(e.request)
                n = int(((stored >= e.start) & (stored < e.end)).sum())
            held.append(n)
        try:
            rows = self.group.all_gather_ints(held)
        except CommAborted:
            raise
        except Exception as exc:
            raise MigrationError(f"nothing was moved: the metadata round failed on instance "
                                 f"{self.me}: {type(exc).__name__}: {exc}") from exc
        counts = [max(col) for col in zip(*rows)] if self.entries else []
        bad = []
        for k, e in enumerate(self.entries):
            fed = any(f.request == e.request and f.dst == e.src and f.start < e.end
                      and e.start < f.end for f in self.entries[:k])
            if counts[k] == 0 and not fed:
                bad.append(f"source {e.src} holds no token of request {e.request!r} in "
                           f"[{e.start}, {e.end})")
        if bad:
            raise MigrationError("nothing was moved: " + "; ".join(bad))

    def _staged(self, chunks, dtype, device):
        """staged(c): chunk c's view [layers * 2, t1 - t0, row] of one of two staging buffers
        (chunk c reuses chunk c - 2's), grown to this batch's chunk size when needed."""
        rows = self._rows
        step = max(t1 - t0 for t0, t1 in chunks)
        need = rows.shape[0] * step * rows.shape[2]
        if not self._bufs or self._bufs[0].numel() < need:
            self._bufs = [torch.empty(need, dtype=dtype, device=device) for _ in range(2)]

        def staged(c: int) -> torch.Tensor:
            t0, t1 = chunks[c]
            return self._bufs[c % 2][: rows.shape[0] * (t1 - t0) * rows.shape[2]].view(
                rows.shape[0], t1 - t0, -1)
        return staged

    def _chunks(self, n: int):
        step = min(n, self.chunk_tokens)
        return [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]

    def _send_batch(self, cache: PagedKVCache, batch: list[MigrationEntry],
                    peer: int) -> tuple[int, list[str]]:
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
        missing = _missing(batch, counts)
        ok = []
        # An exception from here on propagates to run(), which ends the run: nothing is dropped
        # before the destination acknowledged every token of the batch.
        posted = [self.group.send(torch.tensor(counts, dtype=torch.int64, device=dev), peer)]
        if sum(counts):
            posted.append(self.group.send(torch.cat(positions).to(dev), peer))
            status = torch.empty(len(batch), dtype=torch.int64, device=dev)
            self.group.recv(status, peer).synchronize()
            ok = [i for i, st in enumerate(status.tolist()) if st == 0 and counts[i]]
        for w in posted:
            w.synchronize()
        n = sum(counts[i] for i in ok)
        if n:
            works = self._send_chunks(cache, torch.cat([slots[i] for i in ok]), peer)
            ack = torch.empty(1, dtype=torch.int64, device=dev)
            self.group.recv(ack, peer).synchronize()
            for w in works:
                w.synchronize()
            if int(ack.item()) != n:
                return 0, missing + [f"{batch[i]}: destination acknowledged {int(ack.item())} of "
                                     f"{n} tokens of its batch; source kept them" for i in ok]
        for i in ok:
            cache.remove_tokens(batch[i].request, positions[i])
        return n, missing + [f"{e}: destination could not allocate {c} tokens; source kept them"
                             for i, (e, c) in enumerate(zip(batch, counts)) if c and i not in ok]

    def _send_chunks(self, cache: PagedKVCache, slots: torch.Tensor, peer: int) -> list:
        """Pack the tokens at `slots` (all layers) chunk by chunk and send them; returns the sends'
        Works (the last two, still in flight)."""
        rows, chunks = self._rows, self._chunks(slots.numel())
        slot_dev = slots.to(torch.int32).to(cache.device)
        staged = self._staged(chunks, cache.dtype, cache.device)
        works = [None, None]
        for c, (t0, t1) in enumerate(chunks):
            if works[c % 2] is not None:
                works[c % 2].wait()  # chunk c-2 has left this staging buffer
            buf = staged(c)
            copy_rows(rows, slot_dev[t0:t1], buf, None)
            works[c % 2] = self.group.send(buf, peer)
        return [w for w in works if w is not None]


    def _recv_batch(self, cache: PagedKVCache, batch: list[MigrationEntry],
                    peer: int) -> tuple[int, list[str]]:
        """Destination side of one batch: (tokens stored, failure messages)."""
        dev = cache.device
        allocated = []  # (entry index, positions, slots)
        failures = []
        try:
            counts_dev = torch.empty(len(batch), dtype=torch.int64, device=dev)
            self.group.recv(counts_dev, peer).synchronize()
            counts = counts_dev.tolist()
            failures += _missing(batch, counts)
            if not sum(counts):
                return 0, failures
            positions_dev = torch.empty(sum(counts), dtype=torch.int64, device=dev)
            self.group.recv(positions_dev, peer).synchronize()
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
            self.group.send(torch.tensor(status, dtype=torch.int64, device=dev), peer).synchronize()
            n = sum(counts[i] for i, _, _ in allocated)
            if n:
                self._recv_chunks(cache, torch.cat([s for _, _, s in allocated]), peer)
                # Posted after the last unpack on the current stream: stored means stored.
                self.group.send(torch.tensor([n], dtype=torch.int64, device=dev),
                                peer).synchronize()
            return n, failures
        except BaseException:
            # Whatever broke the batch (a failed post before anything was allocated included),
            # the source did not see it acknowledged and keeps its tokens: release ours and let
            # run() end the run, so the source is not left waiting for the rest of the protocol.
            for i, pos, _ in allocated:
                cache.remove_tokens(batch[i].request, pos)
            raise


    def _recv_chunks(self, cache: PagedKVCache, slots: torch.Tensor, peer: int):
        """Receive the chunks _send_chunks sends and unpack each into `slots` as it lands."""
        rows, chunks = self._rows, self._chunks(slots.numel())
        slot_dev = slots.to(torch.int32).to(cache.device)
        staged = self._staged(chunks, cache.dtype, cache.device)
        # Post the first two receives, then unpack each chunk as it lands and re-post into its
        # buffer (the comm stream waits on the unpack before overwriting it).
        works = [self.group.recv(staged(c), peer) for c in range(min(2, len(chunks)))]
        for c, (t0, t1) in enumerate(chunks):
            works[c].wait()
            copy_rows(staged(c), None, rows, slot_dev[t0:t1])
            if c + 2 < len(chunks):
                works.append(self.group.recv(staged(c + 2), peer))


def _broken(batch: list[MigrationEntry], me: int, exc: BaseException) -> str:
    """The failure message of a batch that `exc` broke on instance `me`."""
    e = batch[0]
    what = "communication failed" if isinstance(exc, CommError) else "failed"
    return (f"batch {e.src} -> {e.dst} of requests {[f.request for f in batch]!r} {what} on "
            f"instance {me} ({type(exc).__name__}: {exc}); source {e.src} keeps its tokens, "
            f"destination {e.dst} released its slots; the run stopped there")


def _missing(batch: list[MigrationEntry], counts: list[int]) -> list[str]:
    """Failure messages of the entries whose source holds none of their tokens when their
    batch runs (e.g. an earlier entry that was to bring them failed), other than tokens an
    earlier entry of the same batch takes (overlapping ranges: that entry moves them, or its
    refusal names them)."""
    return [f"{e}: source {e.src} holds no token of request {e.request!r} in [{e.start}, "
            f"{e.end}) beyond those of an earlier entry of its batch; nothing moved"
            for e, c in zip(batch, counts) if not c]


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


def migrate_kv(cache: PagedKVCache, plan: MigrationPlan, group, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Run the plan on this instance (call on every instance of `group`, with the same plan);
    returns {"sent": tokens, "received": tokens}.

    The same as `MigrationRunner(plan, group, cache, chunk_bytes=chunk_bytes).run()`: raises
    MigrationError naming an unknown request or a range its source holds none of (nothing
    moved), or, after every entry of the plan was attempted (a closing round over the group),
    the entries their destinations could not allocate (their sources intact); any other failure
    raises at once (see the module docstring).
    """
    return MigrationRunner(plan, group, cache, chunk_bytes=chunk_bytes).run()
