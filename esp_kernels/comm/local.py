"""Virtual ranks: n ranks inside one process on one device (or the CPU).

Two ways to run a driver on every virtual rank:
  * `run_local(groups, fn, ...)`: **one Python thread per virtual rank**. The drivers are ordinary
    blocking code that only enqueues asynchronous GPU work, so the same code runs on NCCL,
    torch.distributed and virtual ranks. Rank threads contend for the GIL, though: a decode layer
    on 2 / 4 ranks cost 613 / 2207 us of CPU per rank against 28 us on one (H100 host, before
    the matching moved to C++; bench/NOTES.md).
  * `run_steps(groups, steps)`: one *step generator* per rank (e.g.
    `esp.decode.distributed_decode_steps`), all advanced in the calling thread. A step generator
    yields the Work of each exchange it posts; `run_steps` resumes a rank once every message of
    its Work has been posted by both sides, so no thread ever blocks and nothing is contended.
    The same generator runs on any other group through `esp.comm.drive`.

The message protocol (its spec, run case by case on both implementations, is the docstring of
tests/test_local_protocol.py): each virtual rank has its own compute stream (current while its
code runs) and its own communication stream. A message is a device-to-device copy: each side
posts its tensor with an event recorded on its current stream; whichever side posts second
matches it and enqueues the copy on its communication stream after both events (the data is
written and the buffer is free) and records a done event, which both sides' Works wait on. So
the sender's compute never blocks, the receiver's compute waits only on an event, and no
device-wide synchronize happens. Matching follows posting order per (source, destination) pair,
as in NCCL. On the CPU the copy is immediate. Messages both of whose sides were posted with
`consume_at_once=True` (CUDA only) are not copied by the post that matches them: the last poster
of the round (the post after which no consume-at-once half waits for its peer) copies them all on
its own stream, or the first wait that needs one does (on the stream it waits for), or a
synchronize (on the rank's communication stream).

Two implementations of that protocol: the compiled core's mailbox (csrc/comm/local_mailbox.cpp:
one call per post and one per wait; the Python matching of one exchange cost ~19 us per rank on
the H100 host, two exchanges per decode layer against a 30 us budget; an all-to-all round of 4
ranks costs 11 driver calls with consume-at-once instead of 21), and `_LocalWorld.post` below on
torch's stream API for builds without the core.

Failure: `LocalGroup.abort()` (and `run_local` / `run_steps` when a rank raises) aborts the whole
world: every message still waiting for its peer is cut off, so each wait on one raises
CommAborted at once, and every later post on the world raises it too.
"""

from __future__ import annotations

import abc
import collections
import math
import sys
import threading
import time
from typing import Any, Callable, Generator, Sequence

import torch

from .. import _core
from .._checks import as_int, resolve_device
from .group import DEFAULT_TIMEOUT_S, CommAborted, CommError, CommTimeout, Group, Work

# The compiled mailbox class (None without the core); tests swap in None to run the Python
# protocol.
_Mailbox = getattr(_core._C, "LocalMailbox", None) if _core.has_compiled() else None
_MailboxAborted = getattr(_core._C, "MailboxAborted", None) if _core.has_compiled() else None


class _Message:
    """One matched (or half-matched) transfer between two virtual ranks."""

    __slots__ = ("tensor", "ready", "buffer", "buffer_ready", "done", "error", "matched", "src",
                 "dst", "first_at_once", "deferred", "copy_stream")

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.tensor = self.ready = self.buffer = self.buffer_ready = self.done = None
        self.copy_stream = None
        self.error: Exception | None = None
        self.first_at_once = False  # the first side was posted consume_at_once (CUDA)
        self.deferred = False       # both sides posted consume_at_once, copy not enqueued yet
        self.matched = False  # set under the world's lock; waiters use its condition


class _Aborted:
    """A message's error once the world was aborted (each wait raises a fresh CommAborted)."""


class _LocalWorld:
    def __init__(self, n: int, device: torch.device, timeout: float):
        self.n, self.device, self.timeout = n, device, timeout
        self.lock = threading.Lock()
        # Notified whenever messages get matched (one condition per world: a threading.Event
        # per message cost ~2 us to create, a tenth of a decode layer's host budget).
        self.matched = threading.Condition(self.lock)
        self.waiting = 0  # threads blocked on `matched` (run_steps never blocks)
        # (src, dst) -> FIFO of messages posted by exactly one side so far
        self.pending_sends: dict = collections.defaultdict(collections.deque)
        self.pending_recvs: dict = collections.defaultdict(collections.deque)
        # consume-at-once rounds: messages whose copy waits for the round's last poster, and how
        # many halves posted at once still wait for their peer
        self.deferred: list[_Message] = []
        self.pending_at_once = 0
        # (failed world rank or None, reason, the failed rank's exception) once aborted
        self.abort_info: tuple[int | None, str, BaseException | None] | None = None
        cuda = device.type == "cuda"
        self.compute_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        self.comm_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        # The compiled core's mailbox (None: the Python protocol below, e.g. a build without nvcc).
        self.box = None
        if _Mailbox is not None:
            self.box = _Mailbox(n, device.index if cuda else -1,
                                [s.cuda_stream for s in self.comm_streams] if cuda else [])

    # ---- failure ------------------------------------------------------------------------
    def abort(self, failed_rank: int | None = None, cause: BaseException | None = None) -> None:
        """Cut off every message still waiting for its peer and refuse later posts (see the
        module docstring); idempotent: the first abort's rank and cause stay."""
        if failed_rank is None:
            reason = "the virtual-rank world was aborted"
        else:
            what = "" if cause is None else f": {type(cause).__name__}: {cause}"
            reason = f"the virtual-rank world was aborted because rank {failed_rank} failed{what}"
        with self.lock:
            if self.abort_info is not None:
                return
            self.abort_info = (failed_rank, reason, cause)
            if self.box is None:
                for queues in (self.pending_sends, self.pending_recvs):
                    for q in queues.values():
                        for msg in q:
                            msg.error = _Aborted
                            msg.tensor = msg.buffer = None  # never copied: nothing reads them
                            msg.matched = True
                        q.clear()
                self.pending_at_once = 0  # deferred messages are copied by the waits
                self.matched.notify_all()
        if self.box is not None:
            self.box.abort(reason)

    def raise_aborted(self, me: int):
        """Raise the CommAborted of rank `me`, caused by the failed rank's exception (the world
        must have been aborted)."""
        failed, reason, cause = self.abort_info
        raise CommAborted(f"virtual rank {me}: {reason}", failed) from cause

    # ---- the Python protocol ------------------------------------------------------------
    def _copy(self, msgs: list[_Message], stream):
        """Enqueue the copies of matched messages on `stream` after both sides' ready events;
        one done event for them (lock held, CUDA)."""
        with torch.cuda.stream(stream), torch.no_grad():
            for m in msgs:
                stream.wait_event(m.ready)
                stream.wait_event(m.buffer_ready)
                m.buffer.view(-1).copy_(m.tensor.view(-1), non_blocking=True)
                # The copy reads and writes them on `stream`: keep the allocator from reusing them.
                m.tensor.record_stream(stream)
                m.buffer.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        for m in msgs:
            m.done, m.copy_stream = done, stream

    def _flush(self, stream):
        """Copy every deferred message on `stream` (lock held)."""
        if self.deferred:
            msgs, self.deferred = self.deferred, []
            for m in msgs:
                m.deferred = False
            self._copy(msgs, stream)

    def _match(self, msg: _Message, me: int, at_once: bool, batch: list):
        """Both sides have posted: check the message, then copy it (CPU), defer it to the round's
        last poster (both sides consume-at-once), or add it to this post's copy batch."""
        if msg.first_at_once:
            self.pending_at_once -= 1
        t, buf = msg.tensor, msg.buffer
        if t.numel() != buf.numel() or t.dtype != buf.dtype:
            msg.error = ValueError(
                f"message {msg.src}->{msg.dst}: sent {t.numel()} x {t.dtype} but the receive "
                f"buffer holds {buf.numel()} x {buf.dtype}")
        elif self.device.type != "cuda":
            # (as the mailbox's memmove: a buffer that requires grad is written too; a copy that
            # raises anyway is the message's error at both sides' waits, where it left the
            # peer waiting for its timeout)
            try:
                with torch.no_grad():
                    buf.view(-1).copy_(t.view(-1))
            except Exception as exc:  # noqa: BLE001 - reported at both waits
                msg.error = exc
        elif at_once and msg.first_at_once:
            msg.deferred = True
            self.deferred.append(msg)
        else:
            batch.append(msg)
            return  # matched once its copy is enqueued
        msg.matched = True

    def post(self, me: int, sends, recvs, consume_at_once: bool = False) -> list[_Message]:
        """The Python protocol (no compiled core)."""
        msgs = []
        cuda = self.device.type == "cuda"
        at_once = cuda and consume_at_once
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()  # on the current stream
        batch: list[_Message] = []
        with self.lock:
            if self.abort_info is not None:
                self.raise_aborted(me)
            for is_send, items in ((True, sends), (False, recvs)):
                for t, peer in items:
                    src, dst = (me, peer) if is_send else (peer, me)
                    q = (self.pending_recvs if is_send else self.pending_sends)[(src, dst)]
                    if q:
                        msg = q.popleft()
                    else:
                        msg = _Message(src, dst)
                        msg.first_at_once = at_once
                        self.pending_at_once += at_once
                        (self.pending_sends if is_send else self.pending_recvs)[(src, dst)] \
                            .append(msg)
                    if is_send:
                        msg.tensor, msg.ready = t, ready
                    else:
                        msg.buffer, msg.buffer_ready = t, ready
                    if msg.tensor is not None and msg.buffer is not None:
                        self._match(msg, me, at_once, batch)
                    msgs.append(msg)
            if batch:
                # On this rank's communication stream, so its compute overlaps the copies.
                self._copy(batch, self.comm_streams[me])
                for m in batch:
                    m.matched = True
            if at_once and self.pending_at_once == 0:
                self._flush(torch.cuda.current_stream(self.device))
            if self.waiting:
                self.matched.notify_all()
        return msgs


class _VirtualWork(Work):
    """A virtual-rank Work; run_steps resumes its rank once `matched()`."""

    @abc.abstractmethod
    def matched(self) -> bool:
        """Both sides of every message have posted (the copies are done or enqueued)."""


def _timed_out(world, me, src, dst, timeout):
    """The CommTimeout of a wait, after aborting its world (as NCCL's communicator is on a
    timeout): the timed-out half message stayed pending and was matched by the next message of
    the pair, its data in the abandoned buffer; now every peer's wait and later post raises
    CommAborted naming rank `me`."""
    exc = CommTimeout(f"virtual rank message {src}->{dst} was not matched by its peer within "
                      f"{timeout:.1f} s")
    world.abort(me, exc)
    return exc


class _LocalWork(_VirtualWork):
    """Work of the Python protocol."""

    def __init__(self, msgs: list[_Message], world: _LocalWorld, rank: int):
        self.msgs, self.timeout, self.device = msgs, world.timeout, world.device
        self.world, self.rank = world, rank

    def _await_matched(self, timeout):
        if not self.matched():
            world = self.world
            with world.matched:
                world.waiting += 1
                try:
                    ok = world.matched.wait_for(self.matched,
                                                None if math.isinf(timeout) else timeout)
                finally:
                    world.waiting -= 1
            if not ok:
                m = next(m for m in self.msgs if not m.matched)
                raise _timed_out(world, self.rank, m.src, m.dst, timeout)
        for m in self.msgs:
            if m.error is _Aborted:
                self.world.raise_aborted(self.rank)
        for m in self.msgs:
            if m.error is not None:
                raise m.error

    def _flush_deferred(self, stream):
        # Under the lock, like the mailbox: another rank's flush clears `deferred` before it sets
        # `done`, so a message seen without a done event may be mid-copy elsewhere (reading it
        # unlocked let a wait skip the copy's event: late receive buffers on CUDA threads).
        for m in self.msgs:
            if m.done is None:
                with self.world.lock:
                    self.world._flush(stream)
                return

    def matched(self) -> bool:
        for m in self.msgs:
            if not m.matched:
                return False
        return True

    def wait(self, stream=None):
        self._await_matched(self.timeout)
        if self.device.type != "cuda":
            return
        # One stream lookup per wait, not one per message (each costs ~20 us under GIL contention).
        stream = torch.cuda.current_stream(self.device) if stream is None else stream
        self._flush_deferred(stream)
        for m in self.msgs:
            if m.done is not None and m.copy_stream != stream:
                stream.wait_event(m.done)

    def synchronize(self, timeout=None):
        self._await_matched(self.timeout if timeout is None else timeout)
        if self.device.type != "cuda":
            return
        self._flush_deferred(self.world.comm_streams[self.rank])
        for m in self.msgs:
            if m.done is not None:
                m.done.synchronize()


class _CoreWork(_VirtualWork):
    """Work of the compiled mailbox (the C++ LocalWork plus the world's timeout and device)."""

    def __init__(self, work, world: _LocalWorld, rank: int):
        self.work, self.world, self.rank = work, world, rank

    def matched(self) -> bool:
        return self.work.matched()

    def _await_matched(self, timeout):
        if not self.work.wait_matched(timeout):
            src, dst = self.work.first_unmatched()
            raise _timed_out(self.world, self.rank, src, dst, timeout)

    def wait(self, stream=None):
        work, world = self.work, self.world
        if not work.matched():
            self._await_matched(world.timeout)
        try:
            if world.device.type != "cuda":
                work.wait(0)
            elif stream is None:
                work.wait(_core.stream_handle(world.device))
            else:
                work.wait(stream.cuda_stream)
        except _MailboxAborted:
            world.raise_aborted(self.rank)

    def synchronize(self, timeout=None):
        if not self.work.matched():
            self._await_matched(self.world.timeout if timeout is None else timeout)
        try:
            self.work.synchronize()
        except _MailboxAborted:
            self.world.raise_aborted(self.rank)


_VIRTUAL_WORKS = (_LocalWork, _CoreWork)


_cuda_set_stream = getattr(torch._C, "_cuda_setStream", None)  # absent on CPU-only builds


def _set_stream(stream_id, device_index, device_type):
    if _cuda_set_stream is None:  # a torch without the private setter: the public path
        torch.cuda.set_stream(torch.cuda.Stream(stream_id=stream_id, device_index=device_index,
                                                device_type=device_type))
    else:
        _cuda_set_stream(stream_id=stream_id, device_index=device_index, device_type=device_type)


def _message_list(sends, recvs, consume_at_once=False):
    """The core's MessageList of (tensor, world peer) sends and receives."""
    spec = lambda t, peer: (t.data_ptr(), t.numel(), t.element_size(), str(t.dtype), peer)  # noqa: E731
    return _core._C.MessageList([spec(t, p) for t, p in sends], [spec(t, p) for t, p in recvs],
                                consume_at_once)


class LocalGroup(Group):
    """Handle of one virtual rank (see module docstring)."""

    def __init__(self, world: _LocalWorld, world_ranks: tuple[int, ...], rank: int):
        self._world = world
        self.world_ranks = world_ranks
        self.rank = rank
        self.size = len(world_ranks)
        self.device = world.device
        self.timeout = world.timeout

    @property
    def stream(self):
        """This virtual rank's compute stream (None on CPU)."""
        return self._world.compute_streams[self.world_rank]

    @property
    def aborted(self) -> bool:
        """Whether this group's world was aborted (see `abort`)."""
        return self._world.abort_info is not None

    def abort(self, cause: BaseException | None = None) -> None:
        """Abort the whole virtual-rank world from any thread: every wait on a message still
        waiting for its peer raises CommAborted at once (naming this rank as the failed one, with
        `cause` as its __cause__), and so does every later exchange; idempotent. `run_local` and
        `run_steps` call it when a rank raises."""
        self._world.abort(self.world_rank, cause)

    def _with_order(self, world_ranks, rank):
        return LocalGroup(self._world, world_ranks, rank)

    def _world_p2p(self, sends, recvs) -> Work:
        return self._prepare_world_p2p(sends, recvs)()

    def _prepare_world_p2p(self, sends, recvs, consume_at_once=False):
        world, rank = self._world, self.world_rank
        if world.box is None:
            post_py = world.post

            def post(replace=None):
                s = [(replace.get(i, t), p) for i, (t, p) in enumerate(sends)] if replace else sends
                return _LocalWork(post_py(rank, s, recvs, consume_at_once), world, rank)
            return post
        box_post, keep = world.box.post, (sends, recvs)
        msgs = _message_list(sends, recvs, consume_at_once)
        cuda, stream_handle, device = world.device.type == "cuda", _core.stream_handle, \
            world.device

        def post(replace=None):
            stream = stream_handle(device) if cuda else 0
            try:
                if replace:  # the replacements stay referenced with the post's other tensors
                    return _CoreWork(box_post(rank, msgs, stream, (keep, replace),
                                              [(i, t.data_ptr()) for i, t in replace.items()]),
                                     world, rank)
                return _CoreWork(box_post(rank, msgs, stream, keep), world, rank)
            except _MailboxAborted:
                world.raise_aborted(rank)
        return post


def local_group(n: int, device: torch.device | str = "cpu",
                timeout: float = DEFAULT_TIMEOUT_S) -> list[LocalGroup]:
    """n virtual ranks in this process on `device`: returns one Group handle per rank."""
    n = as_int(n, "n")
    if n < 1:
        raise ValueError(f"local_group needs n >= 1 ranks, got {n!r}")
    # (None or a string was taken here and failed at the first wait)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (math.inf: none), got "
                         f"{timeout!r}")
    world = _LocalWorld(n, resolve_device(device), float(timeout))
    ranks = tuple(range(n))
    return [LocalGroup(world, ranks, r) for r in range(n)]


def _fork_streams(groups):
    """Start every CUDA virtual rank's streams after the caller's current stream; return the
    function that makes the caller's stream continue after all of them."""
    worlds = {id(g._world): g._world for g in groups if isinstance(g, LocalGroup)
              and g.device.type == "cuda"}
    callers = {}
    for w in worlds.values():
        caller = callers[id(w)] = torch.cuda.current_stream(w.device)
        for stream in w.compute_streams + w.comm_streams:
            stream.wait_stream(caller)

    def join():
        for w in worlds.values():
            for stream in w.compute_streams + w.comm_streams:
                callers[id(w)].wait_stream(stream)
    return join


class _Failures:
    """The ranks' exceptions in the order they happened; the first one that is not an abort
    aborts every virtual-rank world of the run (so no peer waits for the failed rank)."""

    def __init__(self, groups: Sequence[Group]):
        self.groups = groups
        self.lock = threading.Lock()
        self.order: list[tuple[int, BaseException]] = []

    def add(self, r: int, exc: BaseException) -> None:
        with self.lock:
            self.order.append((r, exc))
        if not isinstance(exc, CommAborted):
            for g in self.groups:
                if isinstance(g, LocalGroup):
                    g._world.abort(getattr(self.groups[r], "world_rank", r), exc)

    def raise_first(self) -> None:
        """Raise the first failure that is not an abort (else the first abort), with a note
        naming its rank and what the other ranks raised; `peer_errors` maps those ranks to
        their exceptions (CommAborted for the ranks the abort cut off)."""
        if not self.order:
            return
        r, exc = next(((r, e) for r, e in self.order if not isinstance(e, CommAborted)),
                      self.order[0])
        others = {q: e for q, e in self.order if q != r}

        def name(q):  # world ranks, as CommAborted names them, and the position where it differs
            w = getattr(self.groups[q], "world_rank", q)
            return f"{w}" if w == q else f"{w} (groups[{q}])"
        note = f"raised on virtual rank {name(r)}"
        if others:
            note += "; the other ranks raised: " + "; ".join(
                f"rank {name(q)}: {type(e).__name__}: {e}" for q, e in sorted(others.items()))
        exc.add_note(note)
        exc.peer_errors = others
        raise exc


_SWITCH_INTERVAL_S = 20e-6


def run_local(groups: Sequence[Group], fn: Callable[..., Any], *per_rank_args: Sequence[Any],
              timeout: float | None = None) -> list[Any]:
    """Run fn(group, *args_r) for every virtual rank in its own thread; return the results.

    `per_rank_args` are sequences indexed by rank. In each thread the rank's compute stream is
    current.

    Failure: when a rank raises, its world is aborted at once (`LocalGroup.abort`), so every
    peer blocked on a message raises CommAborted instead of waiting for its timeout. Once every
    thread has ended, the failing rank's own exception is raised, with a note naming its rank and
    what the peers raised (world ranks, as CommAborted names them), and `peer_errors` ({position
    in `groups`: exception}; each CommAborted has that exception as its __cause__). A run not
    over within `timeout` (the whole run; default: twice the groups' timeout) aborts its worlds,
    releasing the ranks blocked on messages, and raises CommTimeout.

    Stream order on CUDA: the ranks' streams start after the caller's current stream (inputs
    the caller produced are ready), and the caller's current stream continues after every rank's
    streams (results are complete before the caller's next kernel reads them); no host sync.
    """
    n = len(groups)
    for i, a in enumerate(per_rank_args):
        if len(a) != n:
            raise ValueError(f"per_rank_args[{i}] has {len(a)} entries for {n} ranks")
    results: list[Any] = [None] * n
    failures = _Failures(groups)
    join = _fork_streams(groups)

    def body(r):
        g = groups[r]
        try:
            stream = getattr(g, "stream", None)
            if stream is not None:
                with torch.cuda.device(g.device), torch.cuda.stream(stream):
                    results[r] = fn(g, *(a[r] for a in per_rank_args))
            else:
                results[r] = fn(g, *(a[r] for a in per_rank_args))
        except BaseException as exc:  # re-raised in the caller's thread
            failures.add(r, exc)

    # Not daemons: a daemon thread still inside the compiled mailbox's wait when the interpreter
    # finalizes aborts the process ("terminate called without an active exception", seen after a
    # run_local timeout); the abort on a timeout below releases the ranks blocked on messages.
    threads = [threading.Thread(target=body, args=(r,), name=f"esp-vrank-{r}") for r in range(n)]
    # A rank woken by its peer's message must take the GIL from a running rank, which by default
    # lets go only every 5 ms: one decode layer on 4 ranks took 6 ms of host time. While the
    # ranks run, the switch interval drops to 20 us.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _SWITCH_INTERVAL_S))
    try:
        for t in threads:
            t.start()
        limit = timeout if timeout is not None else max(getattr(g, "timeout", DEFAULT_TIMEOUT_S)
                                                         for g in groups) * 2
        deadline = time.monotonic() + limit  # for the whole run, not for each thread in turn
        for t in threads:
            t.join(None if math.isinf(limit) else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                exc = CommTimeout(f"virtual rank thread {t.name} did not finish within {limit} s")
                for g in groups:  # release the ranks blocked on messages
                    if isinstance(g, LocalGroup):
                        g._world.abort(None, exc)
                raise exc
    finally:
        sys.setswitchinterval(interval)
        join()
    failures.raise_first()
    return results


def run_steps(groups: Sequence[LocalGroup], steps: Sequence[Generator]) -> list[Any]:
    """Run one step generator per virtual rank (steps[r] drives groups[r]) in this thread; return
    their return values.

    A step generator posts an exchange and yields its Work instead of waiting on it; it is
    resumed, with the Work waited on, once every message of that Work has been posted by both
    sides (see the module docstring); an error of that wait (e.g. CommAborted) is thrown into the
    generator at its yield. Each rank runs with its compute stream current, and the stream order
    with the caller is as in `run_local`. Failure as in `run_local`: a rank that raises aborts
    the world, the other ranks' pending waits raise CommAborted into their generators, and the
    failing rank's exception is raised once every rank has ended. Ranks that wait on messages
    no rank will post raise CommError.
    """
    n = len(groups)
    if len(steps) != n:
        raise ValueError(f"{len(steps)} step generators for {n} ranks")
    results: list[Any] = [None] * n
    failures = _Failures(groups)
    waiting: list[Work | None] = [None] * n
    streams = [getattr(g, "stream", None) for g in groups]
    # torch.cuda.set_stream's Python wrappers cost ~2.5 us a switch on the H100 host, two
    # switches per rank and decode layer: call torch's setter directly.
    switch = [None if s is None else (s.stream_id, s.device_index, s.device_type)
              for s in streams]
    callers = {s.device: torch.cuda.current_stream(s.device) for s in streams if s is not None}
    device = torch.cuda.current_device() if callers else None  # set_stream switches devices
    join = _fork_streams(groups)
    live = list(range(n))
    try:
        while live:
            progressed, still = False, []
            for r in live:
                w = waiting[r]
                # A class check, not isinstance: ABC instance checks cost ~1 us each.
                if w.__class__ in _VIRTUAL_WORKS and not w.matched():
                    still.append(r)
                    continue
                progressed = True
                if switch[r] is not None:  # every resume: a step may leave another current
                    _set_stream(*switch[r])
                try:
                    try:
                        if w is not None:
                            w.wait()
                    except BaseException as exc:  # the rank's code decides what it means
                        waiting[r] = steps[r].throw(exc)
                    else:
                        waiting[r] = steps[r].send(None)
                    still.append(r)
                except StopIteration as stop:
                    results[r] = stop.value
                except BaseException as exc:  # raised below, once every rank has ended
                    failures.add(r, exc)
            live = still
            if not progressed:
                if failures.order:  # ranks left waiting on a world that is not virtual
                    break
                raise CommError(f"virtual ranks {live} wait on messages that no rank posts "
                                "(the ranks' exchanges do not match)")
    finally:
        for r in live:
            steps[r].close()
        for caller in callers.values():
            torch.cuda.set_stream(caller)
        if device is not None:
            torch.cuda.set_device(device)
        join()
    failures.raise_first()
    return results


__all__ = ["LocalGroup", "local_group", "run_local", "run_steps", "CommAborted", "CommError"]
