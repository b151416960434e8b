"""Native NCCL backend (esp_kernels.comm.nccl).

CPU tier: library discovery, argument checks, the clear error without a GPU, and (when the
compiled extension is present) loading libnccl, its version and unique ids, which need no GPU.
GPU tier (`pytest -m gpu`): a world of one rank through torch.distributed.HashStore: sends to self,
empty messages, stream ordering, record_stream, subgroups, barrier / all_gather_ints, finalize /
abort, bad peers; timeouts and cross-thread abort run in a subprocess so a hang or a device fault
cannot take the test session down.
"""

import inspect
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from esp_kernels import _core
from esp_kernels.comm import nccl as espnccl
from esp_kernels.comm.group import CommError, CommTimeout
from esp_kernels.testing import poison_

needs_core = pytest.mark.skipif(not _core.has_compiled(),
                                reason=f"esp_kernels._C unavailable: {_core._C_ERROR}")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="checks the behaviour on a machine without a GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- CPU tier ---------------------------------------------------------------------------------

def test_find_nccl_library_in_wheel():
    nvidia_nccl = pytest.importorskip("nvidia.nccl")
    path = espnccl.find_nccl_library()
    assert os.path.basename(path) == "libnccl.so.2"
    assert os.path.isfile(path), path
    wheel_dirs = [os.path.realpath(os.path.join(p, "lib")) for p in nvidia_nccl.__path__]
    assert os.path.realpath(os.path.dirname(path)) in wheel_dirs


def test_find_nccl_library_fallbacks(monkeypatch, tmp_path):
    # A wheel folder without the library is skipped.
    monkeypatch.setattr(espnccl, "_wheel_lib_dirs", lambda: [str(tmp_path)])
    monkeypatch.setenv(espnccl.NCCL_LIBRARY_ENV, "/opt/custom/libnccl.so.2")
    assert espnccl.find_nccl_library() == "/opt/custom/libnccl.so.2"
    monkeypatch.delenv(espnccl.NCCL_LIBRARY_ENV)
    assert espnccl.find_nccl_library() == "libnccl.so.2"
    lib = tmp_path / "libnccl.so.2"
    lib.write_bytes(b"")
    assert espnccl.find_nccl_library() == str(lib)


def test_init_nccl_bad_arguments():
    store = torch.distributed.HashStore()
    with pytest.raises(ValueError, match="outside the world"):
        espnccl.init_nccl(2, 2, store)
    with pytest.raises(ValueError, match="outside the world"):
        espnccl.init_nccl(-1, 2, store)
    with pytest.raises(ValueError, match="world_size"):
        espnccl.init_nccl(0, 0, store)
    with pytest.raises(ValueError, match="timeout"):
        espnccl.init_nccl(0, 1, store, timeout=0)
    with pytest.raises(TypeError, match="rank"):
        espnccl.init_nccl("0", 1, store)
    with pytest.raises(TypeError, match="rank"):
        espnccl.init_nccl(True, 1, store)


def test_check_in_waits_for_every_rank():
    store = torch.distributed.HashStore()
    errors = []

    def rank(r):
        try:
            espnccl._check_in(store, "join", r, 3, timeout=30)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert store.add("join", 0) == 3


def test_check_in_times_out_naming_the_count():
    store = torch.distributed.HashStore()
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match=r"only 1 of 2 ranks called init_nccl within the 0.2 s"):
        espnccl._check_in(store, "join", 0, 2, timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_check_in_store_failure_is_a_comm_error():
    class BrokenStore:
        def add(self, key, value):
            raise RuntimeError("connection reset")
    with pytest.raises(CommError, match="store error.*connection reset"):
        espnccl._check_in(BrokenStore(), "join", 1, 2, timeout=1)


@needs_no_cuda
def test_init_nccl_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        espnccl.init_nccl(0, 1, torch.distributed.HashStore())


@needs_core
def test_core_requires_load_first():
    # A fresh process: nothing has loaded NCCL yet.
    code = textwrap.dedent("""
        from esp_kernels import _core
        C = _core._C
        assert not C.nccl_is_loaded()
        for call in (C.nccl_version, C.nccl_unique_id):
            try:
                call()
            except C.NcclError as e:
                assert "init_nccl" in str(e) and "not loaded" in str(e), str(e)
            else:
                raise SystemExit("no error before nccl_load")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


@needs_core
def test_core_load_version_and_unique_id():
    path = espnccl.load_nccl()
    assert espnccl.load_nccl() == path                 # same library again: no-op
    C = _core._C
    assert C.nccl_is_loaded()
    version = espnccl.nccl_version()
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    assert m, version
    assert (int(m[1]), int(m[2])) >= (2, 14)
    uid = C.nccl_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    assert C.nccl_unique_id() != uid
    other = "/lib/x86_64-linux-gnu/libc.so.6"
    if os.path.exists(other):
        with pytest.raises(CommError, match="already loaded"):
            espnccl.load_nccl(other)
    with pytest.raises(ValueError, match="128 bytes"):
        C.NcclComm(b"abc", 0, 1, 0, 5.0)
    with pytest.raises(ValueError, match="outside the world"):
        C.NcclComm(uid, 1, 1, 0, 5.0)


@needs_core
def test_one_blocking_default_everywhere():
    """init_nccl, the compiled communicator and its binding default to blocking alike."""
    assert inspect.signature(espnccl.init_nccl).parameters["blocking"].default is True
    assert "blocking: bool = True" in _core._C.NcclComm.__init__.__doc__


@needs_core
@needs_no_cuda
def test_core_comm_without_gpu_is_a_clear_error():
    espnccl.load_nccl()
    C = _core._C
    with pytest.raises(C.NcclError, match="CUDA device"):
        C.NcclComm(C.nccl_unique_id(), 0, 1, 0, 5.0)


# ---- GPU tier ---------------------------------------------------------------------------------

@pytest.fixture
def world():
    g = espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=torch.cuda.current_device(),
                          timeout=120)
    yield g
    g.close()


def _rand(gen, shape, dtype, device):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
    return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(dtype) \
        .to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (1000, 37)), (torch.bfloat16, (3, 5, 128)),
                                         (torch.int64, (1,)), (torch.uint8, (1 << 20) + 3)])
def test_send_to_self(world, gen, dtype, shape):
    assert world.size == 1 and world.rank == 0 and world.world_ranks == (0,)
    x = _rand(gen, shape, dtype, world.device)
    y = poison_(torch.empty_like(x))
    work = world.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    work.wait()
    torch.cuda.current_stream(world.device).synchronize()
    assert torch.equal(y, x)
    world.check()


@pytest.mark.gpu
def test_send_to_self_several_messages(world, gen):
    dev = world.device
    xs = [_rand(gen, (n,), torch.float32, dev) for n in (17, 0, 4096, 1)]
    ys = [poison_(torch.empty_like(x)) for x in xs]
    work = world.exchange(sends=[(x, 0) for x in xs], recvs=[(y, 0) for y in ys])
    work.synchronize(60)
    for x, y in zip(xs, ys):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_zero_size_message(world):
    x = torch.empty(0, device=world.device)
    y = torch.empty(0, device=world.device)
    work = world.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    work.wait()
    work.synchronize(60)
    assert y.numel() == 0
    # An empty message next to a real one in the same exchange.
    a = torch.arange(10.0, device=world.device)
    b = torch.zeros(10, device=world.device)
    world.exchange(sends=[(x, 0), (a, 0)], recvs=[(y, 0), (b, 0)]).synchronize(60)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("blocking", [False, True])
def test_receive_consumed_on_compute_stream(blocking, gen):
    """Ordering on both communicator kinds. Not blocking the host is asserted for blocking
    communicators only: with a nonblocking one NCCL 2.28 reported the group launch in progress
    until the queued producer had finished (H100), so exchange() waited for it."""
    world = espnccl.init_nccl(0, 1, torch.distributed.HashStore(),
                              device=torch.cuda.current_device(), timeout=120,
                              prefix=f"order{int(blocking)}", blocking=blocking)
    dev = world.device
    a = torch.randn(4096, 4096, generator=gen).to(dev) / 64
    torch.cuda.synchronize(dev)
    # Produce x with a long chain of kernels on the current stream; exchange without any host sync.
    x = a
    for _ in range(20):
        x = torch.tanh(x @ a)
    y = poison_(torch.empty_like(x))
    work = world.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    work.wait()
    z = y * 2 + 1                                   # consumes the receive on the compute stream
    pending = not torch.cuda.current_stream(dev).query()
    # The same on a side stream waited through Work.wait(stream).
    side = torch.cuda.Stream(device=dev)
    work.wait(side)
    with torch.cuda.stream(side):
        w = y - 1
    torch.cuda.synchronize(dev)
    world.close()
    if blocking:
        assert pending, "exchange()/wait() blocked the host until the producer finished"
    assert torch.equal(y, x)
    assert torch.equal(z, x * 2 + 1)
    assert torch.equal(w, x - 1)


@pytest.mark.gpu
def test_record_stream_keeps_freed_send_buffer(world, gen):
    dev = world.device
    a = torch.randn(4096, 4096, generator=gen).to(dev) / 64
    x = torch.randn(1 << 22, generator=gen).to(dev)
    expected = x.clone()
    y = torch.empty_like(x)
    torch.cuda.synchronize(dev)
    b = a
    for _ in range(20):                             # keep the comm stream waiting a while
        b = torch.tanh(b @ a)
    work = world.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    del x                                           # caller frees its buffer at once
    junk = [torch.full((1 << 22,), 7.0, device=dev) for _ in range(4)]  # may reuse freed blocks
    work.wait()
    torch.cuda.synchronize(dev)
    assert torch.equal(y, expected)
    del junk, b


@pytest.mark.gpu
def test_subgroup_shares_the_world(world, gen):
    sub = world.subgroup([0])
    assert isinstance(sub, espnccl.NcclGroup)
    assert sub.world_ranks == (0,) and sub.rank == 0 and sub.size == 1
    assert sub.comm is world.comm and sub.comm_stream is world.comm_stream
    x = _rand(gen, (333,), torch.float16, world.device)
    y = poison_(torch.empty_like(x))
    sub.exchange(sends=[(x, 0)], recvs=[(y, 0)]).synchronize(60)
    assert torch.equal(x, y)
    assert sub.subgroup([0]).comm is world.comm


@pytest.mark.gpu
def test_world_rank(world):
    assert world.world_rank == 0 and world.subgroup([0]).world_rank == 0


@pytest.mark.gpu
def test_barrier_and_all_gather_ints(world):
    world.barrier()
    assert world.all_gather_ints([3, -4, 1 << 40]) == [[3, -4, 1 << 40]]
    sub = world.subgroup([0])
    sub.barrier()
    assert sub.all_gather_ints([5]) == [[5]]


@pytest.mark.gpu
def test_finalize_then_use_raises(world):
    sub = world.subgroup([0])
    x = torch.ones(8, device=world.device)
    y = torch.zeros(8, device=world.device)
    world.exchange(sends=[(x, 0)], recvs=[(y, 0)]).synchronize(60)
    world.close()
    assert world.closed and sub.closed and not world.comm.valid
    with pytest.raises(CommError, match="finalized"):
        world.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    with pytest.raises(CommError, match="finalized"):
        sub.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    with pytest.raises(CommError):
        world.check()
    world.close()                                   # idempotent
    world.abort()                                   # a no-op after finalize


@pytest.mark.gpu
def test_abort_then_use_raises_and_context_manager():
    dev = torch.cuda.current_device()
    x = torch.ones(8, device=dev)
    y = torch.zeros(8, device=dev)
    with espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=dev, timeout=120) as g:
        g.exchange(sends=[(x, 0)], recvs=[(y, 0)]).synchronize(60)
    assert g.closed and not g.comm.valid
    with pytest.raises(CommError):
        g.exchange(sends=[(x, 0)], recvs=[(y, 0)])

    with pytest.raises(KeyError):
        with espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=dev, timeout=120) as g2:
            raise KeyError("boom")                  # an exception in the block aborts the world
    assert g2.closed
    with pytest.raises(CommError, match="aborted"):
        g2.exchange(sends=[(x, 0)], recvs=[(y, 0)])
    g2.abort()
    g2.close()


@pytest.mark.gpu
def test_bad_peer_raises_value_error(world):
    x = torch.ones(8, device=world.device)
    with pytest.raises(ValueError, match="not in this group"):
        world.exchange(sends=[(x, 1)])
    with pytest.raises(ValueError, match="not in this group"):
        world.exchange(recvs=[(x, -1)])
    C = _core._C
    with pytest.raises(ValueError, match="peer 1"):     # the core checks world ranks too
        world.comm.group_p2p([C.P2POp(True, x.data_ptr(), 32, 1)], world.comm_stream.cuda_stream)
    # Unpaired or mismatched sends to self would hang the comm stream: refused up front.
    with pytest.raises(ValueError, match="pair up"):
        world.exchange(sends=[(x, 0)])
    with pytest.raises(ValueError, match="pair up"):
        world.exchange(sends=[(x, 0)], recvs=[(x[:4].clone(), 0)])
    assert world.comm.valid
    y = torch.zeros_like(x)
    world.exchange(sends=[(x, 0)], recvs=[(y, 0)]).synchronize(60)
    assert torch.equal(x, y)


@pytest.mark.gpu
def test_two_worlds_in_one_process(gen):
    dev = torch.cuda.current_device()
    store = torch.distributed.HashStore()
    g1 = espnccl.init_nccl(0, 1, store, device=dev, timeout=120, prefix="twice")
    g2 = espnccl.init_nccl(0, 1, store, device=dev, timeout=120, prefix="twice")
    try:
        assert g1.comm is not g2.comm
        for g in (g1, g2):
            x = _rand(gen, (100,), torch.float32, g.device)
            y = poison_(torch.empty_like(x))
            g.exchange(sends=[(x, 0)], recvs=[(y, 0)]).synchronize(60)
            assert torch.equal(x, y)
    finally:
        g1.close()
        g2.close()


_TIMEOUT_SCRIPT = r"""
import threading, time, torch
from esp_kernels.comm import nccl as espnccl
from esp_kernels.comm.group import CommError, CommTimeout

dev = torch.cuda.current_device()
cycles = int(5e9)                  # torch.cuda._sleep spins this many clocks: ~2.5-3.5 s

# 1. A host wait shorter than the queued work: CommTimeout, the world is aborted.
g = espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=dev, timeout=120,
                      blocking=BLOCKING)
x = torch.ones(1024, device=dev)
y = torch.zeros(1024, device=dev)
torch.cuda._sleep(cycles)
work = g.exchange(sends=[(x, 0)], recvs=[(y, 0)])
t0 = time.time()
try:
    work.synchronize(0.2)
except CommTimeout as e:
    print("timeout after %.2f s: %s" % (time.time() - t0, e))
    assert "timed out after 0.2 s" in str(e), str(e)
else:
    raise SystemExit("no CommTimeout")
assert not g.comm.valid
try:
    g.exchange(sends=[(x, 0)], recvs=[(y, 0)])
except CommError as e:
    assert "aborted" in str(e), str(e)
else:
    raise SystemExit("exchange after abort did not raise")
torch.cuda.synchronize()           # the device must still be healthy after the abort
print("device ok after timeout abort")

# 2. abort() from another thread interrupts a long host wait.
g = espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=dev, timeout=120,
                      blocking=BLOCKING)
torch.cuda._sleep(cycles)
work = g.exchange(sends=[(x, 0)], recvs=[(y, 0)])
threading.Timer(0.3, g.abort).start()
t0 = time.time()
try:
    work.synchronize(60)
except CommError as e:
    dt = time.time() - t0
    print("interrupted after %.2f s: %s" % (dt, e))
    assert not isinstance(e, CommTimeout) and dt < 30
else:
    raise SystemExit("abort from another thread did not interrupt synchronize")
torch.cuda.synchronize()
print("device ok after cross-thread abort")

# 3. A fresh world still works afterwards.
g = espnccl.init_nccl(0, 1, torch.distributed.HashStore(), device=dev, timeout=120,
                      blocking=BLOCKING)
z = torch.zeros(1024, device=dev)
g.exchange(sends=[(x, 0)], recvs=[(z, 0)]).synchronize(60)
assert torch.equal(x, z)
g.close()
print("OK")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("blocking", [True, False])
def test_timeout_and_cross_thread_abort_in_subprocess(blocking):
    out = subprocess.run([sys.executable, "-c", f"BLOCKING = {blocking}\n" + _TIMEOUT_SCRIPT],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(out.stdout)
    print(out.stderr[-4000:])
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK"), out.stdout + out.stderr
