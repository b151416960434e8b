"""Virtual ranks: n ranks inside one process on one device (or the CPU).

Two ways to run a driver on every virtual rank:
  * `run_local(groups, fn, ...)`: **one Python thread per virtual rank**. The drivers are ordinary
    blocking code that only enqueues asynchronous GPU work, so the same code runs on NCCL,
    torch.distributed and virtual ranks. Rank threads contend for the GIL, though: a decode layer
    on 2 / 4 ranks cost 613 / 2207 us of CPU per rank (run 8) against 28 us on one.
  * `run_steps(groups, steps)`: one *step generator* per rank (e.g.
    `esp.decode.distributed_decode_steps`), all advanced in the calling thread. A step generator
    yields the Work of each exchange it posts; `run_steps` resumes a rank once every message of
    its Work has been posted by both sides, so no thread ever blocks and nothing is contended.
    The same generator runs on any other group through `esp.comm.drive`.

Each virtual rank has its own compute stream (current while its code runs) and its own
communication stream. A message is a device-to-device copy: each side posts its tensor with an
event recorded on its current stream; whichever side arrives second enqueues the copy on its
communication stream after both events (the data is written and the buffer is free) and records
a done-event, which both sides' Works wait on. So the sender's compute never blocks, the
receiver's compute waits only on an event, and no device-wide synchronize happens. Matching
follows posting order per (source, destination) pair, as in NCCL. On the CPU the copy is
immediate.

With the compiled core the matching runs in C++ (csrc/comm/local_mailbox.cpp: one call per post
and one per wait; in Python it cost ~19 us per exchange and rank on the GPU machine's host, run
11): events come from a pool, the messages one post matched are moved by one copy kernel with
one done event, and the tensors of a message stay referenced until its copy has completed on the
GPU, so the caching allocator never hands them out early. Messages both of whose sides were
posted with `consume_at_once=True` are copied together by the last poster of the round on its
own stream (or by the first wait that needs them): an all-to-all round of 4 ranks costs 11
driver calls instead of 21. Without the core, the same protocol runs in Python on torch's stream
API (`_LocalWorld.post`).
"""

from __future__ import annotations

import abc
import collections
import math
import sys
import threading
from typing import Any, Callable, Generator, Sequence

import torch

from .. import _core
from .._checks import as_int, resolve_device
from .group import DEFAULT_TIMEOUT_S, CommError, CommTimeout, Group, Work

# The compiled mailbox class (None without the core); tests swap in None to run the Python
# protocol.
_Mailbox = getattr(_core._C, "LocalMailbox", None) if _core.has_compiled() else None


class _Message:
    """One matched (or half-matched) transfer between two virtual ranks."""

    __slots__ = ("tensor", "ready", "buffer", "buffer_ready", "done", "error", "matched", "src",
                 "dst")

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.tensor = self.ready = self.buffer = self.buffer_ready = self.done = None
        self.error: Exception | None = None
        self.matched = False  # set under the world's lock; waiters use its condition


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
        cuda = device.type == "cuda"
        self.compute_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        self.comm_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        # The compiled core's mailbox (None: the Python protocol below, e.g. a build without nvcc).
        self.box = None
        if _Mailbox is not None:
            self.box = _Mailbox(n, device.index if cuda else -1,
                                [s.cuda_stream for s in self.comm_streams] if cuda else [])

    def _match(self, msg: _Message):
        """Both sides have posted: check the message, then copy it (CPU) or enqueue its copy."""
        t, buf = msg.tensor, msg.buffer
        if t.numel() != buf.numel() or t.dtype != buf.dtype:
            msg.error = ValueError(
                f"message {msg.src}->{msg.dst}: sent {t.numel()} x {t.dtype} but the receive "
                f"buffer holds {buf.numel()} x {buf.dtype}")
        elif self.device.type == "cuda":
            # The copy reads the sender's tensor and overwrites the receiver's buffer: it waits
            # for both owners' streams as they were when each side posted.
            stream = self.comm_streams[msg.dst]
            stream.wait_event(msg.ready)
            stream.wait_event(msg.buffer_ready)
            with torch.cuda.stream(stream):
                buf.view(-1).copy_(t.view(-1), non_blocking=True)
            # The copy reads t and writes buf on `stream`: keep the allocator from reusing them.
            t.record_stream(stream)
            buf.record_stream(stream)
            msg.done = torch.cuda.Event()
            msg.done.record(stream)
        else:
            buf.view(-1).copy_(t.view(-1))
        msg.matched = True

    def post(self, me: int, sends, recvs) -> list[_Message]:
        """The Python protocol (no compiled core)."""
        msgs = []
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # on the current stream
        with self.lock:
            for t, dst in sends:
                q = self.pending_recvs[(me, dst)]
                if q:
                    msg = q.popleft()
                    msg.tensor, msg.ready = t, ready
                    self._match(msg)
                else:
                    msg = _Message(me, dst)
                    msg.tensor, msg.ready = t, ready
                    self.pending_sends[(me, dst)].append(msg)
                msgs.append(msg)
            for buf, src in recvs:
                q = self.pending_sends[(src, me)]
                if q:
                    msg = q.popleft()
                    msg.buffer, msg.buffer_ready = buf, ready
                    self._match(msg)
                else:
                    msg = _Message(src, me)
                    msg.buffer, msg.buffer_ready = buf, ready
                    self.pending_recvs[(src, me)].append(msg)
                msgs.append(msg)
            if self.waiting:
                self.matched.notify_all()
        return msgs


class _VirtualWork(Work):
    """A virtual-rank Work; run_steps resumes its rank once `matched()`."""

    @abc.abstractmethod
    def matched(self) -> bool:
        """Both sides of every message have posted (the copies are done or enqueued)."""


def _timeout_error(src, dst, timeout):
    return CommTimeout(f"virtual rank message {src}->{dst} was not matched by its peer within "
                       f"{timeout:.1f} s")


class _LocalWork(_VirtualWork):
    """Work of the Python protocol."""

    def __init__(self, msgs: list[_Message], world: _LocalWorld):
        self.msgs, self.timeout, self.device = msgs, world.timeout, world.device
        self.world = world

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
                raise _timeout_error(m.src, m.dst, timeout)
        for m in self.msgs:
            if m.error is not None:
                raise m.error

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
        for m in self.msgs:
            if m.done is not None:
                stream.wait_event(m.done)

    def synchronize(self, timeout=None):
        self._await_matched(self.timeout if timeout is None else timeout)
        for m in self.msgs:
            if m.done is not None:
                m.done.synchronize()


class _CoreWork(_VirtualWork):
    """Work of the compiled mailbox (the C++ LocalWork plus the world's timeout and device)."""

    def __init__(self, work, world: _LocalWorld):
        self.work, self.world = work, world

    def matched(self) -> bool:
        return self.work.matched()

    def _await_matched(self, timeout):
        if not self.work.wait_matched(timeout):
            src, dst = self.work.first_unmatched()
            raise _timeout_error(src, dst, timeout)

    def wait(self, stream=None):
        work, world = self.work, self.world
        if not work.matched():
            self._await_matched(world.timeout)
        if world.device.type != "cuda":
            work.wait(0)
        elif stream is None:
            work.wait(_core.stream_handle(world.device))
        else:
            work.wait(stream.cuda_stream)

    def synchronize(self, timeout=None):
        if not self.work.matched():
            self._await_matched(self.world.timeout if timeout is None else timeout)
        self.work.synchronize()


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
    def world_rank(self) -> int:
        return self.world_ranks[self.rank]

    @property
    def stream(self):
        """This virtual rank's compute stream (None on CPU)."""
        return self._world.compute_streams[self.world_rank]

    def _with_order(self, world_ranks, rank):
        return LocalGroup(self._world, world_ranks, rank)

    def _world_p2p(self, sends, recvs) -> Work:
        world = self._world
        if world.box is None:
            return _LocalWork(world.post(self.world_rank, sends, recvs), world)
        return self._prepare_world_p2p(sends, recvs)()

    def _prepare_world_p2p(self, sends, recvs, consume_at_once=False):
        world = self._world
        if world.box is None:
            return super()._prepare_world_p2p(sends, recvs)
        box_post, rank, keep = world.box.post, self.world_rank, (sends, recvs)
        msgs = _message_list(sends, recvs, consume_at_once)
        cuda, stream_handle, device = world.device.type == "cuda", _core.stream_handle, \
            world.device

        def post(replace=None):
            stream = stream_handle(device) if cuda else 0
            if replace:  # the replacements stay referenced with the post's other tensors
                return _CoreWork(box_post(rank, msgs, stream, (keep, replace),
                                          [(i, t.data_ptr()) for i, t in replace.items()]),
                                 world)
            return _CoreWork(box_post(rank, msgs, stream, keep), world)
        return post


def local_group(n: int, device: torch.device | str = "cpu",
                timeout: float = DEFAULT_TIMEOUT_S) -> list[LocalGroup]:
    """n virtual ranks in this process on `device`: returns one Group handle per rank."""
    n = as_int(n, "n")
    if n < 1:
        raise ValueError(f"local_group needs n >= 1 ranks, got {n!r}")
    world = _LocalWorld(n, resolve_device(device), timeout)
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


_SWITCH_INTERVAL_S = 20e-6


def run_local(groups: Sequence[Group], fn: Callable[..., Any], *per_rank_args: Sequence[Any],
              timeout: float | None = None) -> list[Any]:
    """Run fn(group, *args_r) for every virtual rank in its own thread; return the results.

    `per_rank_args` are sequences indexed by rank. In each thread the rank's compute stream is
    current. The first exception (by rank) is re-raised after all threads end.

    Stream order on CUDA: the ranks' streams start after the caller's current stream (inputs
    the caller produced are ready), and the caller's current stream continues after every rank's
    streams (results are complete before the caller's next kernel reads them); no host sync.
    """
    n = len(groups)
    for i, a in enumerate(per_rank_args):
        if len(a) != n:
            raise ValueError(f"per_rank_args[{i}] has {len(a)} entries for {n} ranks")
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n
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
            errors[r] = exc

    threads = [threading.Thread(target=body, args=(r,), name=f"esp-vrank-{r}") for r in range(n)]
    # A rank woken by its peer's message must take the GIL from a running rank, which by default
    # lets go only every 5 ms: one decode layer on 4 ranks took 6 ms of host time (run 1). While
    # the ranks run, the switch interval drops to 20 us.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _SWITCH_INTERVAL_S))
    try:
        for t in threads:
            t.start()
        limit = timeout if timeout is not None else max(getattr(g, "timeout", DEFAULT_TIMEOUT_S)
                                                         for g in groups) * 2
        for t in threads:
            t.join(None if math.isinf(limit) else limit)
            if t.is_alive():
                raise CommTimeout(f"virtual rank thread {t.name} did not finish within {limit} s")
    finally:
        sys.setswitchinterval(interval)
        join()
    for r, e in enumerate(errors):
        if e is not None:
            raise e
    return results


def run_steps(groups: Sequence[LocalGroup], steps: Sequence[Generator]) -> list[Any]:
    """Run one step generator per virtual rank (steps[r] drives groups[r]) in this thread; return
    their return values.

    A step generator posts an exchange and yields its Work instead of waiting on it; it is
    resumed, with the Work waited on, once every message of that Work has been posted by both
    sides (see the module docstring). Each rank runs with its compute stream current, and the
    stream order with the caller is as in `run_local`. Ranks that wait on messages no rank will
    post raise CommError. The first exception (by rank) is re-raised once no rank can go on.
    """
    n = len(groups)
    if len(steps) != n:
        raise ValueError(f"{len(steps)} step generators for {n} ranks")
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n
    waiting: list[Work | None] = [None] * n
    streams = [getattr(g, "stream", None) for g in groups]
    # torch.cuda.set_stream's Python wrappers cost ~2.5 us a switch on the GPU machine's host
    # (run 15 profile), two switches per rank and decode layer: call torch's setter directly.
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
                    if w is not None:
                        w.wait()
                    waiting[r] = steps[r].send(None)
                    still.append(r)
                except StopIteration as stop:
                    results[r] = stop.value
                except BaseException as exc:  # re-raised below, once no rank can go on
                    errors[r] = exc
            live = still
            if not progressed:
                if not any(e is not None for e in errors):
                    raise CommError(f"virtual ranks {live} wait on messages that no rank posts "
                                    "(the ranks' exchanges do not match)")
                break
    finally:
        for r in live:
            steps[r].close()
        for caller in callers.values():
            torch.cuda.set_stream(caller)
        if device is not None:
            torch.cuda.set_device(device)
        join()
    for e in errors:
        if e is not None:
            raise e
    return results


__all__ = ["LocalGroup", "local_group", "run_local", "run_steps", "CommError"]
