"""Group over an existing torch.distributed process group (gloo on CPU, NCCL for engines that
already own one). Point-to-point messages use the process group's ranks; subgroups only reorder.

With NCCL process groups torch already runs p2p on its own stream and `work.wait()` makes the
current stream wait; with gloo the work completes on the host.

Caller's contract (a process cannot check its peer's buffers without another message): every rank
issues its exchanges in the same order, and a send and its matching receive hold the same number
of bytes (gloo may abort the process on a mismatch; an empty send against a non-empty receive
never completes). Messages to self are copied here, paired in order within one exchange, as on
the other backends.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .group import DEFAULT_TIMEOUT_S, CommError, CommTimeout, Group, Work


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


class _TorchWork(Work):
    def __init__(self, works, timeout: float, keepalive):
        self.works, self.timeout = works, timeout
        self._keepalive = keepalive  # tensors must live until the transfer ends

    def _wait_all(self, timeout: float):
        td = datetime.timedelta(seconds=timeout)
        for w in self.works:
            try:
                w.wait(td)
            except RuntimeError as exc:
                cls = CommTimeout if _is_timeout(exc) else CommError
                raise cls(f"torch.distributed p2p failed: {exc}") from exc

    def wait(self, stream=None):
        if stream is not None:
            with torch.cuda.stream(stream):
                self._wait_all(self.timeout)
        else:
            self._wait_all(self.timeout)

    def synchronize(self, timeout=None):
        self._wait_all(self.timeout if timeout is None else timeout)
        for w in self.works:
            if hasattr(w, "synchronize"):
                w.synchronize()


class TorchGroup(Group):
    def __init__(self, pg, world_ranks: tuple[int, ...], rank: int, device: torch.device,
                 timeout: float):
        self._pg = pg
        self.world_ranks = world_ranks
        self.rank = rank
        self.size = len(world_ranks)
        self.device = device
        self.timeout = timeout

    def _with_order(self, world_ranks, rank):
        return TorchGroup(self._pg, world_ranks, rank, self.device, self.timeout)

    def _world_p2p(self, sends, recvs) -> Work:
        # Messages to self: the process group has no pair to itself ("Pair is not connected")
        me = self.world_ranks[self.rank]
        self_sends = [t for t, dst in sends if dst == me]
        self_recvs = [t for t, src in recvs if src == me]
        if [(t.numel() * t.element_size()) for t in self_sends] != \
                [(t.numel() * t.element_size()) for t in self_recvs]:
            raise ValueError(
                "sends to self and receives from self must pair up in order with equal sizes in "
                f"one exchange; got {[tuple(t.shape) for t in self_sends]} sent and "
                f"{[tuple(t.shape) for t in self_recvs]} received")
        for t, buf in zip(self_sends, self_recvs):  # (contiguous: checked by the Group)
            buf.reshape(-1).view(torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
        sends = [(t, dst) for t, dst in sends if dst != me]
        recvs = [(t, src) for t, src in recvs if src != me]
        ops = []
        for t, dst in sends:
            if t.numel():  # both sides of a matched pair skip empty messages
                ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(self._pg, dst),
                                      group=self._pg))
        for t, src in recvs:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(self._pg, src),
                                      group=self._pg))
        if not ops:
            return _TorchWork([], self.timeout, None)
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise CommError(f"torch.distributed p2p could not be posted: {exc}") from exc
        return _TorchWork(works, self.timeout, (sends, recvs))


def from_torch(process_group=None, device: torch.device | str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> TorchGroup:
    """Wrap a torch.distributed process group (default: the world group) as a Group.

    `device` defaults to the current CUDA device for NCCL groups and the CPU otherwise.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first")
    pg = process_group if process_group is not None else dist.group.WORLD
    backend = dist.get_backend(pg)
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
    device = torch.device(device)
    size = dist.get_world_size(pg)
    return TorchGroup(pg, tuple(range(size)), dist.get_rank(pg), device, timeout)
