"""The Group interface every driver (ring prefill, decode, migration) talks to.

A Group is an ordered set of ranks of one *world* of instances. `subgroup(order)` makes an ESP
group out of any ordered subset of a group's ranks without creating a communicator: it only maps
positions to world ranks, and every message still goes through the world's backend.

Backends implement two things at the world level: `_world_p2p(sends, recvs)` (post several sends
and receives together, return a Work) and the attributes below. Everything else (subgroups,
send/recv, metadata all-gather, barrier, argument checks) lives here, once for all backends.

Streams: a backend issues communication on its own stream after the caller's current stream
(so tensors are ready), and a Work's `wait()` makes the caller's current stream wait on an event:
no device-wide synchronize anywhere. CPU backends complete or block on the host instead.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from .._checks import as_int

DEFAULT_TIMEOUT_S = 300.0


class CommError(RuntimeError):
    """A communication failure (peer error, aborted communicator)."""


class CommTimeout(CommError):
    """A communication did not complete within the group's timeout."""


class CommAborted(CommError):
    """The world was aborted because one of its ranks failed (or `abort()` was called): raised
    by every wait cut off by the abort and by every later exchange on that world.

    `failed_rank` is the world rank that failed (None when aborted without one); `__cause__` is
    that rank's exception when it is known.
    """

    def __init__(self, message: str, failed_rank: int | None = None):
        super().__init__(message)
        self.failed_rank = failed_rank


class Work(abc.ABC):
    """Handle of posted communication."""

    @abc.abstractmethod
    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order `stream` (default: the current stream) after the communication.

        On GPU backends this enqueues an event wait and returns at once; CPU backends block the
        host until the data is there (raising CommTimeout after the group's timeout).
        """

    @abc.abstractmethod
    def synchronize(self, timeout: float | None = None) -> None:
        """Block the host until the communication has completed (CommTimeout on timeout)."""


class CompletedWork(Work):
    """A Work with nothing left to do (e.g. an exchange with no messages)."""

    def wait(self, stream=None):
        return None

    def synchronize(self, timeout=None):
        return None


def drive(steps):
    """Run a step generator (one that yields the Work of each exchange it posts instead of
    waiting on it, e.g. `esp.decode.distributed_decode_steps`) to its end on any group, waiting
    on each Work at once; return its return value. `run_steps` runs one per virtual rank in one
    thread instead. A wait that raises is thrown into the generator at its yield, as `run_steps`
    does, so its cleanup (`finally`) runs before the error reaches the caller (a runner that
    did not clean up refused its next call as still running)."""
    try:
        work = next(steps)
        while True:
            try:
                work.wait()
            except BaseException as exc:
                work = steps.throw(exc)
            else:
                work = steps.send(None)
    except StopIteration as stop:
        return stop.value


class PreparedExchange:
    """Sends and receives checked by `Group.prepare_exchange`, posted by each `start()`."""

    __slots__ = ("group", "sends", "recvs", "_post")

    def __init__(self, group: "Group", sends, recvs, consume_at_once: bool = False):
        self.group, self.sends, self.recvs = group, sends, recvs  # peers as world ranks
        self._post = (group._prepare_world_p2p(sends, recvs, consume_at_once)
                      if sends or recvs else None)

    def __bool__(self) -> bool:
        return self._post is not None

    def start(self, replace: dict[int, torch.Tensor] | None = None) -> Work:
        """Post the exchange; `replace` maps send indices to tensors posted in place of the
        prepared ones for this call (same numel and dtype, same device, contiguous), e.g. a
        driver's per-call input sent without copying it into the prepared buffer first."""
        if self._post is None:
            return CompletedWork()
        if not replace:
            return self._post()
        checked = set()  # a driver may stand one tensor in for several sends
        for i, t in replace.items():
            if type(i) is not int or not 0 <= i < len(self.sends):
                raise ValueError(f"replace maps {i!r}, not a send index of this exchange "
                                 f"(0..{len(self.sends) - 1})")
            if id(t) not in checked:  # (its kind, device and layout: once)
                self.group._check_buffer(t, f"replace[{i}]")
                checked.add(id(t))
            # ...but its size and dtype against every send it stands in for: a tensor shorter
            # than one of them was read past its end
            ref = self.sends[i][0]
            if t.numel() != ref.numel() or t.dtype != ref.dtype:
                raise ValueError(f"replace[{i}]: {t.numel()} x {t.dtype} does not stand in for "
                                 f"the prepared {ref.numel()} x {ref.dtype}")
        return self._post(replace)


class Group(abc.ABC):
    """Ordered group of ranks. Attributes: rank, size, device, world_ranks, timeout; property
    world_rank.

    Ranks: `rank` and the peers of `exchange`/`send`/`recv` are positions in this group (ring
    ranks for an ESP group); `world_ranks[i]` is the world rank of position i and `world_rank`
    this member's own (what plans name instances by).
    """

    #: this process's (or virtual rank's) position in the group
    rank: int
    #: number of ranks in the group
    size: int
    #: device the group's tensors must live on
    device: torch.device
    #: world rank of each group position
    world_ranks: tuple[int, ...]
    #: seconds a blocking wait may take before CommTimeout
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def world_rank(self) -> int:
        """This member's rank in the world (the rank plans name it by)."""
        return self.world_ranks[self.rank]

    # ---- backend hook -------------------------------------------------------------------
    @abc.abstractmethod
    def _world_p2p(self, sends: list[tuple[torch.Tensor, int]],
                   recvs: list[tuple[torch.Tensor, int]]) -> Work:
        """Post sends (tensor, world dst) and receives (buffer, world src) together."""

    def _prepare_world_p2p(self, sends: list[tuple[torch.Tensor, int]],
                           recvs: list[tuple[torch.Tensor, int]], consume_at_once: bool = False):
        """A function post(replace=None) posting these checked messages, with the sends whose
        index `replace` maps swapped for its tensors (a backend may convert the messages once
        here; `consume_at_once`: see `prepare_exchange`)."""
        def post(replace=None):
            if replace:
                return self._world_p2p([(replace.get(i, t), p) for i, (t, p) in enumerate(sends)],
                                       recvs)
            return self._world_p2p(sends, recvs)
        return post

    @abc.abstractmethod
    def _with_order(self, world_ranks: tuple[int, ...], rank: int) -> "Group":
        """A handle on the same world restricted to `world_ranks` (this process at `rank`)."""

    # ---- derived API --------------------------------------------------------------------
    def subgroup(self, order: Sequence[int]) -> "Group":
        """Ordered subset of this group: position i of `order` becomes rank i of the new group.

        No communicator is created. The calling rank must be a member of `order`.
        """
        order = [as_int(r, f"subgroup order[{i}]") for i, r in enumerate(order)]
        if not order:
            raise ValueError("subgroup order must not be empty")
        if len(set(order)) != len(order):
            raise ValueError(f"subgroup order has duplicate ranks: {order}")
        bad = [r for r in order if not 0 <= r < self.size]
        if bad:
            raise ValueError(f"subgroup order names ranks {bad} outside this group of size "
                             f"{self.size}")
        if self.rank not in order:
            raise ValueError(f"rank {self.rank} is not a member of subgroup {order}; only members "
                             "may create a subgroup handle")
        world = tuple(self.world_ranks[r] for r in order)
        return self._with_order(world, order.index(self.rank))

    def _check_peer(self, peer: int, what: str) -> int:
        peer = as_int(peer, f"{what} rank")
        if not 0 <= peer < self.size:
            raise ValueError(f"{what} rank {peer!r} is not in this group of size {self.size}")
        return self.world_ranks[peer]

    def _check_buffer(self, t: torch.Tensor, what: str):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device} but this group communicates on "
                             f"{self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous (shape {tuple(t.shape)}, strides "
                             f"{t.stride()})")
        if t.is_conj() or t.is_neg():  # a lazy view: its memory does not hold its values
            raise ValueError(f"{what} is a lazily conjugated or negated view: pass "
                             "t.resolve_conj().resolve_neg()")

    def prepare_exchange(self, sends: Sequence[tuple[torch.Tensor, int]] = (),
                         recvs: Sequence[tuple[torch.Tensor, int]] = (), *,
                         consume_at_once: bool = False) -> "PreparedExchange":
        """Check an exchange's tensors and peers once; `start()` then posts it as often as
        needed (a driver's fixed buffers, e.g. a decode plan's, skip the per-call checks). The
        tensors' storage must stay where it is (their pointers are taken here).

        consume_at_once: the caller waits on each start()'s Work before it enqueues other work
        on its stream (as the decode driver does), so a backend may run the copies on that
        stream instead of a communication stream (virtual ranks: one copy per round of such
        exchanges, made by its last poster)."""
        ws, wr = [], []
        for i, (t, dst) in enumerate(sends):
            self._check_buffer(t, f"sends[{i}] tensor")
            ws.append((t, self._check_peer(dst, f"sends[{i}] destination")))
        for i, (t, src) in enumerate(recvs):
            self._check_buffer(t, f"recvs[{i}] buffer")
            wr.append((t, self._check_peer(src, f"recvs[{i}] source")))
        return PreparedExchange(self, ws, wr, consume_at_once)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]] = (),
                 recvs: Sequence[tuple[torch.Tensor, int]] = ()) -> Work:
        """Post several sends and receives together (one ring step: send to next, receive from
        previous). Peers are ranks of this group. Returns one Work for all of them."""
        return self.prepare_exchange(sends, recvs).start()

    def send(self, tensor: torch.Tensor, dst: int) -> Work:
        return self.exchange(sends=[(tensor, dst)])

    def recv(self, tensor: torch.Tensor, src: int) -> Work:
        return self.exchange(recvs=[(tensor, src)])

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of a few integers (same count on every rank), by group rank.

        Host-blocking; for metadata before a loop, never inside one.
        """
        values = [as_int(v, f"all_gather_ints values[{i}]") for i, v in enumerate(values)]
        n = len(values)
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        bufs = {r: torch.empty(n, dtype=torch.int64, device=self.device)
                for r in range(self.size) if r != self.rank}
        others = list(bufs)
        work = self.exchange(sends=[(mine, r) for r in others],
                             recvs=[(bufs[r], r) for r in others])
        work.synchronize(self.timeout)
        out = []
        for r in range(self.size):
            out.append(values if r == self.rank else [int(x) for x in bufs[r].tolist()])
        return out

    def barrier(self) -> None:
        """Return once every rank of this group has entered the barrier."""
        self.all_gather_ints([self.rank])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"world_ranks={list(self.world_ranks)}, device={self.device})")
