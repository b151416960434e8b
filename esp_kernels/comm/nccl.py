"""Native NCCL backend: one world communicator, ESP groups as ordered subsets of its ranks.

    g = esp.comm.init_nccl(rank, world_size, store)     # store: any torch.distributed Store
    ring = g.subgroup([3, 0, 5])                         # no new communicator
    work = ring.exchange(sends=[(k, nxt)], recvs=[(k_next, prv)])
    work.wait()                                          # current stream waits; host does not

How it works:
- libnccl.so.2 is dlopen'ed by the compiled core (`esp_kernels._C.nccl_load`) from the
  nvidia-nccl-cu13 wheel (else $ESP_NCCL_LIBRARY, else the loader's search path); nothing links it.
- Rank 0 makes the NCCL unique id and publishes it in the store; every rank checks in under a
  store counter (bounded by the timeout) and then creates the world communicator on its device
  (blocking by default: see `init_nccl`).
- Every exchange of every handle of a world runs on one dedicated comm stream: that stream first
  waits on the caller's current stream (so the tensors are ready), the sends/receives are posted in
  one ncclGroupStart/End (sends to self included), each tensor is `record_stream`'ed on the comm
  stream (the caching allocator does not hand its memory out before the transfer is done), and an
  event is recorded. `Work.wait()` makes a stream wait on that event; `Work.synchronize()` host-waits
  on it with a timeout while watching NCCL for errors. No device-wide synchronize anywhere.

Caller's contract (NCCL cannot check it across processes): every rank issues its exchanges on a
world in the same order, and a send and its matching receive have the same size in bytes. A size
mismatch or a missing counterpart hangs the comm stream until a host wait times out (or corrupts
the receive). Within one process the sends to self are checked against the receives from self.

Errors: every NCCL failure or timeout aborts the world communicator and surfaces as
`esp_kernels.comm.group.CommError` (`CommTimeout` for timeouts) carrying NCCL's message; every
handle of that world then raises CommError. Bad arguments raise ValueError / TypeError.
"""

from __future__ import annotations

import atexit
import operator
import os
import threading
import time
import weakref
from typing import Sequence

import torch

from .. import _core
from .._checks import resolve_device
from .group import DEFAULT_TIMEOUT_S, CommError, CommTimeout, Group, Work

__all__ = ["NcclGroup", "init_nccl", "find_nccl_library", "load_nccl", "nccl_version"]

#: environment variable naming a libnccl.so.2 to use when the nvidia-nccl-cu13 wheel is absent
NCCL_LIBRARY_ENV = "ESP_NCCL_LIBRARY"
_LIB_NAME = "libnccl.so.2"
_UID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


# ---- locating and loading libnccl -----------------------------------------------------------

def _wheel_lib_dirs() -> list[str]:
    """lib/ folders of the installed nvidia-nccl-cu13 wheel (empty when it is not installed)."""
    try:
        import nvidia.nccl  # the nvidia-nccl-cu13 wheel
    except ImportError:
        return []
    return [os.path.join(base, "lib") for base in getattr(nvidia.nccl, "__path__", [])]


def find_nccl_library() -> str:
    """Path of the libnccl.so.2 to load.

    In order: the nvidia-nccl-cu13 wheel's ``nvidia/nccl/lib/libnccl.so.2``; the path in
    ``$ESP_NCCL_LIBRARY``; the bare name ``libnccl.so.2`` (resolved by the dynamic loader).
    """
    for d in _wheel_lib_dirs():
        path = os.path.join(d, _LIB_NAME)
        if os.path.isfile(path):
            return path
    env = os.environ.get(NCCL_LIBRARY_ENV)
    if env:
        return env
    return _LIB_NAME


def _comm_error(exc: BaseException, what: str) -> CommError:
    """CommError (CommTimeout for timeouts) for an esp_kernels._C.NcclError, keeping its text."""
    text = str(exc)
    # The core words its own timeouts "NCCL timed out after X s ..."; NCCL's code is ncclTimeout.
    timed_out = "NCCL timed out after" in text or "ncclTimeout [" in text
    cls = CommTimeout if timed_out else CommError
    return cls(f"{what}: {text}")


def _nccl_error_type(C):
    return getattr(C, "NcclError", RuntimeError)


def load_nccl(path: str | None = None) -> str:
    """dlopen libnccl in the compiled core (once per process) and return the path used.

    Loading again with the same library is a no-op; another library after one was loaded raises.
    """
    C = _core.require_compiled("comm.init_nccl")
    path = path or find_nccl_library()
    try:
        C.nccl_load(path)
    except _nccl_error_type(C) as exc:
        raise _comm_error(exc, "loading NCCL") from exc
    return path


def nccl_version() -> str:
    """Version ("major.minor.patch") of the libnccl the core uses (loads it if needed)."""
    C = _core.require_compiled("comm.nccl_version")
    if not C.nccl_is_loaded():
        load_nccl()
    return C.nccl_version()


# ---- the world and its handles --------------------------------------------------------------

class _NcclWorld:
    """What every handle of one world shares: the communicator, device, comm stream, issue lock."""

    def __init__(self, C, comm, device: torch.device):
        self.C = C
        self.comm = comm
        self.device = device
        self.rank = comm.rank
        self.size = comm.size
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device=device)
        # Keeps (wait_stream, group_p2p, record) atomic w.r.t. other threads of this process, so
        # the comm stream sees exchanges in the order they were issued to NCCL.
        self.lock = threading.Lock()
        self.state = "open"  # "open" / "finalized" / "aborted"

    def close(self):
        """Flush and destroy the communicator (ncclCommFinalize + ncclCommDestroy); idempotent."""
        if self.state != "open":
            return
        try:
            self.comm.finalize()
        except _nccl_error_type(self.C) as exc:
            self.state = "aborted"
            raise _comm_error(exc, f"finalizing the NCCL world (rank {self.rank})") from exc
        self.state = "finalized"

    def abort(self):
        """Abort the communicator (pending NCCL work is cancelled); idempotent."""
        if self.state == "open":
            self.state = "aborted"
        self.comm.abort()


_LIVE_WORLDS: "weakref.WeakSet[_NcclWorld]" = weakref.WeakSet()


@atexit.register
def _abort_live_worlds():
    # At exit, abort (never finalize: a clean finalize may wait forever on peers that are gone)
    # while CUDA is still up, so no communicator is torn down during interpreter finalization.
    for world in list(_LIVE_WORLDS):
        try:
            world.abort()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class _NcclWork(Work):
    """An exchange posted on the comm stream, completed when `event` is reached."""

    __slots__ = ("_world", "_event", "_timeout")

    def __init__(self, world: _NcclWorld, event: torch.cuda.Event, timeout: float):
        self._world = world
        self._event = event
        self._timeout = timeout

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        if stream is None:
            stream = torch.cuda.current_stream(self._world.device)
        stream.wait_event(self._event)

    def synchronize(self, timeout: float | None = None) -> None:
        t = self._timeout if timeout is None else float(timeout)
        try:
            self._world.comm.wait_event(self._event.cuda_event, t)
        except _nccl_error_type(self._world.C) as exc:
            if not self._world.comm.valid and self._world.state == "open":
                self._world.state = "aborted"
            raise _comm_error(exc, f"waiting for an NCCL exchange (rank {self._world.rank})") \
                from exc


class NcclGroup(Group):
    """Ordered group of ranks of a native NCCL world (see the module docstring).

    Made by `init_nccl`; `subgroup(order)` returns another handle on the same communicator and
    comm stream. `close()` / `abort()` act on the world communicator, i.e. on every handle.
    """

    def __init__(self, world: _NcclWorld, world_ranks: Sequence[int], rank: int,
                 timeout: float = DEFAULT_TIMEOUT_S):
        self._world = world
        self.world_ranks = tuple(int(r) for r in world_ranks)
        self.rank = int(rank)
        self.size = len(self.world_ranks)
        self.device = world.device
        self.timeout = float(timeout)
        if not 0 <= self.rank < self.size or self.world_ranks[self.rank] != world.rank:
            raise ValueError(f"rank {rank} of {list(self.world_ranks)} is not this process's world "
                             f"rank {world.rank}")

    # ---- properties of the world ------------------------------------------------------
    @property
    def comm(self):
        """The compiled communicator (esp_kernels._C.NcclComm) shared by every handle."""
        return self._world.comm

    @property
    def comm_stream(self) -> torch.cuda.Stream:
        """The stream every exchange of this world runs on."""
        return self._world.stream

    @property
    def world_size(self) -> int:
        return self._world.size

    @property
    def closed(self) -> bool:
        return self._world.state != "open"

    # ---- Group hooks ------------------------------------------------------------------
    def _with_order(self, world_ranks: tuple[int, ...], rank: int) -> "NcclGroup":
        return NcclGroup(self._world, world_ranks, rank, timeout=self.timeout)

    def _world_p2p(self, sends: list[tuple[torch.Tensor, int]],
                   recvs: list[tuple[torch.Tensor, int]]) -> Work:
        world = self._world
        C = world.C
        me = world.rank
        # A send to self and its receive must both be in this group call (or the comm stream
        # hangs), with the same size. Matching across processes is the caller's contract.
        self_sends = [t.numel() * t.element_size() for t, dst in sends if dst == me]
        self_recvs = [t.numel() * t.element_size() for t, src in recvs if src == me]
        if self_sends != self_recvs:
            raise ValueError(
                "sends to self and receives from self must pair up in order with equal sizes in "
                f"one exchange; got send sizes {self_sends} and receive sizes {self_recvs} (bytes)")
        ops = [C.P2POp(True, t.data_ptr(), t.numel() * t.element_size(), dst)
               for t, dst in sends]
        ops += [C.P2POp(False, t.data_ptr(), t.numel() * t.element_size(), src)
                for t, src in recvs]
        stream = world.stream
        with world.lock:
            if world.state != "open":
                raise CommError(f"the NCCL world communicator was {world.state}; create a new one "
                                "with esp_kernels.comm.init_nccl")
            stream.wait_stream(torch.cuda.current_stream(world.device))
            try:
                world.comm.group_p2p(ops, stream.cuda_stream)
            except _nccl_error_type(C) as exc:
                if not world.comm.valid:
                    world.state = "aborted"
                raise _comm_error(exc, f"NCCL exchange on rank {self.rank} of {self!r}") from exc
            for t, _ in sends:
                if t.numel():
                    t.record_stream(stream)
            for t, _ in recvs:
                if t.numel():
                    t.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return _NcclWork(world, event, self.timeout)

    # ---- lifetime ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise CommError if NCCL reported an asynchronous error (the world is then aborted)."""
        try:
            self._world.comm.check()
        except _nccl_error_type(self._world.C) as exc:
            if not self._world.comm.valid and self._world.state == "open":
                self._world.state = "aborted"
            raise _comm_error(exc, f"NCCL world (rank {self._world.rank})") from exc

    def close(self) -> None:
        """Finalize the world communicator (flushes posted work); idempotent. Every handle of
        the world is closed by this; later exchanges raise CommError."""
        self._world.close()

    def abort(self) -> None:
        """Abort the world communicator now (any thread; interrupts a host wait); idempotent."""
        self._world.abort()

    def __enter__(self) -> "NcclGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # after a failure peers may be gone: finalizing could wait forever


# ---- creation -------------------------------------------------------------------------------

# prefix -> how many worlds this process created with it, so a second init_nccl with the same
# store and prefix never reads the previous world's unique id (every rank counts the same way).
_GENERATIONS: dict[str, int] = {}
_GEN_LOCK = threading.Lock()


def _as_int(x, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def _resolve_device(device) -> torch.device:
    if isinstance(device, int):
        device = torch.device("cuda", device)
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        raise ValueError(f"init_nccl needs a CUDA device, got {dev}")
    dev = resolve_device(dev)
    if not 0 <= dev.index < torch.cuda.device_count():
        raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA "
                         "device(s) visible)")
    return dev


def init_nccl(rank: int, world_size: int, store, device=None,
              timeout: float | None = DEFAULT_TIMEOUT_S, prefix: str = "esp_nccl",
              blocking: bool = True) -> NcclGroup:
    """Create the native NCCL world communicator and return its full group (rank = world rank).

    Call on every rank with the same `world_size`, `store` (any torch.distributed Store: TCPStore,
    FileStore, HashStore) and `prefix`. `device`: CUDA device (index, "cuda:i", torch.device;
    default the current one). `timeout`: seconds for creation, finalize and host waits (None:
    the default).
    Rank 0 publishes the NCCL unique id under ``{prefix}/uid`` (``{prefix}/uid/{n}`` for the n-th
    later world made in this process with the same prefix; after a rank restarts, use a fresh
    prefix on every rank).

    Every point-to-point connection is set up here (one tiny exchange with each peer, self
    included): NCCL otherwise connects lazily inside the first exchange with a peer, which waited
    on work already queued on the device and blocked the host (seen on H100, NCCL 2.28).

    `blocking=True` (default): exchanges are launched directly. Before NCCL's creation (which
    would wait forever for a missing rank) every rank checks in under a store counter, so a rank
    that never calls init_nccl makes the others raise CommTimeout after `timeout`; only a rank
    that dies between checking in and finishing creation can still hang the others. Host waits
    (`Work.synchronize`) honour their timeouts in both modes.
    `blocking=False`: NCCL's own calls honour `timeout` too, but NCCL hands every group launch
    to a helper thread. On 2xH200 (bench/diag_migration.py) an exchange of 4 bytes plus its
    synchronize took 138 us instead of 50 us, and one decode layer over 2 GPUs (B1, 256k
    tokens) 0.325 instead of 0.209 ms.
    """
    rank = _as_int(rank, "rank")
    world_size = _as_int(world_size, "world_size")
    prefix = str(prefix)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of size {world_size}")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if not torch.cuda.is_available():
        raise RuntimeError("esp_kernels.comm.init_nccl needs a CUDA device, but "
                           "torch.cuda.is_available() is False (CPU-only torch, no GPU, or "
                           "CUDA_VISIBLE_DEVICES hides them); use esp_kernels.comm.from_torch "
                           "with a gloo process group or local_group on CPU")
    C = _core.require_compiled("comm.init_nccl")
    dev = _resolve_device(device)
    load_nccl()

    with _GEN_LOCK:
        gen = _GENERATIONS.get(prefix, 0)
        _GENERATIONS[prefix] = gen + 1
    key = f"{prefix}/uid" if gen == 0 else f"{prefix}/uid/{gen}"
    if rank == 0:
        try:
            uid = C.nccl_unique_id()
        except _nccl_error_type(C) as exc:
            raise _comm_error(exc, "creating the NCCL unique id") from exc
        store.set(key, uid)
    else:
        try:
            uid = store.get(key)
        except Exception as exc:  # store timeouts and errors (DistStoreError, RuntimeError, ...)
            raise CommError(f"rank {rank}: could not read the NCCL unique id from store key "
                            f"{key!r} (is rank 0 running init_nccl with the same store and "
                            f"prefix?): {exc}") from exc
    uid = bytes(uid)
    if len(uid) != _UID_BYTES:
        raise CommError(f"store key {key!r} holds {len(uid)} bytes, not an NCCL unique id "
                        f"({_UID_BYTES} bytes)")
    _check_in(store, f"{key}/joined", rank, world_size, timeout)

    try:
        comm = C.NcclComm(uid, rank, world_size, dev.index, timeout, bool(blocking))
    except _nccl_error_type(C) as exc:
        raise _comm_error(exc, f"init_nccl(rank={rank}, world_size={world_size}, device={dev})") \
            from exc
    world = _NcclWorld(C, comm, dev)
    _LIVE_WORLDS.add(world)
    group = NcclGroup(world, tuple(range(world_size)), rank, timeout=timeout)
    _connect_all(group)
    return group


def _check_in(store, key: str, rank: int, world_size: int, timeout: float) -> None:
    """Count this rank in under `key` and return once all `world_size` ranks have; CommTimeout
    after `timeout` seconds, naming how many came."""
    try:
        joined = store.add(key, 1)
        deadline = time.monotonic() + timeout
        pause = 1e-4
        while joined < world_size:
            if time.monotonic() > deadline:
                raise CommTimeout(f"rank {rank}: only {joined} of {world_size} ranks called "
                                  f"init_nccl within the {timeout} s timeout (store key {key!r}); "
                                  "every rank must call it with the same store and prefix")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
            joined = store.add(key, 0)
    except CommError:
        raise
    except Exception as exc:  # store failures (DistStoreError, RuntimeError, ...)
        raise CommError(f"rank {rank}: store error while the ranks check in under {key!r}: "
                        f"{exc}") from exc


def _connect_all(group: "NcclGroup") -> None:
    """One byte to and from every rank (self included), completed before init returns."""
    peers = range(group.size)
    with torch.cuda.device(group.device):
        out = torch.zeros(group.size, dtype=torch.uint8, device=group.device)
        inc = torch.empty(group.size, dtype=torch.uint8, device=group.device)
        work = group.exchange(sends=[(out[p:p + 1], p) for p in peers],
                              recvs=[(inc[p:p + 1], p) for p in peers])
        work.synchronize(group.timeout)
