"""Virtual ranks: n ranks inside one process on one device (or the CPU).

How drivers run per rank: **one Python thread per virtual rank** (`run_local`). The drivers are
ordinary blocking code that only enqueues asynchronous GPU work, so the same code runs on NCCL,
torch.distributed and virtual ranks. Each virtual rank has its own compute stream (made current in
its thread by `run_local`) and its own communication stream.

A message is a device-to-device copy: each side posts its tensor with an event recorded on its
current stream; whichever side arrives second enqueues `buffer.copy_(tensor)` on the receiver's
communication stream after both events (the data is written and the buffer is free) and records a
done-event, which both sides' Works wait on. So the
sender's compute never blocks, the receiver's compute waits only on an event, and no device-wide
synchronize happens. Matching follows posting order per (source, destination) pair, as in NCCL.
On the CPU the copy is immediate.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Callable, Sequence

import torch

from .._checks import resolve_device
from .group import DEFAULT_TIMEOUT_S, CommError, CommTimeout, Group, Work


class _Message:
    """One matched (or half-matched) transfer between two virtual ranks."""

    __slots__ = ("tensor", "ready", "buffer", "buffer_ready", "done", "error", "matched", "src",
                 "dst")

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.tensor = self.ready = self.buffer = self.buffer_ready = self.done = None
        self.error: Exception | None = None
        self.matched = threading.Event()


class _LocalWorld:
    def __init__(self, n: int, device: torch.device, timeout: float):
        self.n, self.device, self.timeout = n, device, timeout
        self.lock = threading.Lock()
        # (src, dst) -> FIFO of messages posted by exactly one side so far
        self.pending_sends: dict = collections.defaultdict(collections.deque)
        self.pending_recvs: dict = collections.defaultdict(collections.deque)
        cuda = device.type == "cuda"
        self.compute_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]
        self.comm_streams = [torch.cuda.Stream(device) if cuda else None for _ in range(n)]

    def _transfer(self, msg: _Message):
        """Called once both sides have posted: check and enqueue the copy."""
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
        msg.matched.set()

    def post(self, me: int, sends, recvs) -> list[_Message]:
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
                    self._transfer(msg)
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
                    self._transfer(msg)
                else:
                    msg = _Message(src, me)
                    msg.buffer, msg.buffer_ready = buf, ready
                    self.pending_recvs[(src, me)].append(msg)
                msgs.append(msg)
        return msgs


class _LocalWork(Work):
    def __init__(self, msgs: list[_Message], timeout: float, device: torch.device):
        self.msgs, self.timeout, self.device = msgs, timeout, device

    def _await_matched(self, timeout):
        for m in self.msgs:
            if not m.matched.wait(timeout):
                raise CommTimeout(f"virtual rank message {m.src}->{m.dst} was not matched by its "
                                  f"peer within {timeout:.1f} s")
            if m.error is not None:
                raise m.error

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
        return _LocalWork(self._world.post(self.world_rank, sends, recvs), self.timeout,
                          self.device)


def local_group(n: int, device: torch.device | str = "cpu",
                timeout: float = DEFAULT_TIMEOUT_S) -> list[LocalGroup]:
    """n virtual ranks in this process on `device`: returns one Group handle per rank."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"local_group needs n >= 1 ranks, got {n!r}")
    world = _LocalWorld(n, resolve_device(device), timeout)
    ranks = tuple(range(n))
    return [LocalGroup(world, ranks, r) for r in range(n)]


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
    worlds = {id(g._world): g._world for g in groups if isinstance(g, LocalGroup)
              and g.device.type == "cuda"}
    callers = {}
    for w in worlds.values():
        caller = callers[id(w)] = torch.cuda.current_stream(w.device)
        for stream in w.compute_streams + w.comm_streams:
            stream.wait_stream(caller)

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
            t.join(limit)
            if t.is_alive():
                raise CommTimeout(f"virtual rank thread {t.name} did not finish within {limit} s")
    finally:
        sys.setswitchinterval(interval)
        for w in worlds.values():
            for stream in w.compute_streams + w.comm_streams:
                callers[id(w)].wait_stream(stream)
    for r, e in enumerate(errors):
        if e is not None:
            raise e
    return results


__all__ = ["LocalGroup", "local_group", "run_local", "CommError"]
