"""Group semantics on every CPU backend: gloo processes (torch.distributed) and virtual ranks."""

import math
import time

import pytest
import torch

from esp_kernels import _core
from esp_kernels.comm import CommError, CommTimeout, drive, from_torch, local_group, run_local, run_steps
from esp_kernels.comm import local as local_mod
from dist_utils import run_gloo


@pytest.fixture(params=["core", "python"])
def protocol(request, monkeypatch):
    """Virtual ranks on the compiled mailbox, then on the Python protocol (builds without it)."""
    if request.param == "core":
        if not _core.has_compiled():
            pytest.skip(f"esp_kernels._C unavailable: {_core._C_ERROR}")
        assert local_mod._Mailbox is not None
    else:
        monkeypatch.setattr(local_mod, "_Mailbox", None)
    return request.param


def ring_cases(world):
    """Ring exchanges with orders unlike world order, per-rank sizes, zero-size messages, and a
    subgroup of a subgroup. Returns a list of (name, ok) checked by the caller on every rank."""
    n = world.size
    results = []
    for order in ([*range(n)][::-1], [*range(1, n), 0], [*range(n)]):
        ring = world.subgroup(order)
        P, r = ring.size, ring.rank
        size = lambda rank: 3 * rank + (0 if rank == 1 else 5)  # noqa: E731 (rank 1 sends 0)
        mine = torch.arange(size(r), dtype=torch.float32) + 100 * r
        buf = torch.full((size((r - 1) % P),), -1.0)
        ring.exchange(sends=[(mine, (r + 1) % P)], recvs=[(buf, (r - 1) % P)]).wait()
        prev = (r - 1) % P
        results.append((f"ring {order}", torch.equal(
            buf, torch.arange(size(prev), dtype=torch.float32) + 100 * prev)))
    if n >= 3:
        sub = world.subgroup([n - 1, 0, 1]) if world.rank in (n - 1, 0, 1) else None
        if sub is not None:
            subsub = sub.subgroup([2, 0])  if sub.rank in (2, 0) else None
            if subsub is not None:
                # world ranks: subsub rank 0 = world 1, rank 1 = world n-1
                assert subsub.world_ranks == (1, n - 1), subsub.world_ranks
                x = torch.tensor([float(world.rank)] * 4)
                y = torch.empty(4)
                other = 1 - subsub.rank
                subsub.exchange(sends=[(x, other)], recvs=[(y, other)]).wait()
                results.append(("subsub", bool(torch.all(y == subsub.world_ranks[other]))))
    gathered = world.all_gather_ints([world.rank, 7, -world.rank])
    results.append(("all_gather", gathered == [[r, 7, -r] for r in range(n)]))
    world.barrier()
    return results


def error_cases(world):
    out = []
    for bad in ([0, 0], [world.size], []):
        try:
            world.subgroup(bad)
            out.append((f"subgroup {bad}", False))
        except ValueError:
            out.append((f"subgroup {bad}", True))
    others = [r for r in range(world.size) if r != world.rank]
    try:
        world.subgroup(others)
        out.append(("non-member subgroup", False))
    except ValueError:
        out.append(("non-member subgroup", True))
    x = torch.zeros(4, 4)
    for label, call in (("peer", lambda: world.send(torch.zeros(2), world.size)),
                        ("noncontig", lambda: world.send(x.t(), 0)),
                        ("device", lambda: world.send(torch.zeros(2, device="meta"), 0))):
        try:
            call()
            out.append((label, False))
        except (ValueError, TypeError):
            out.append((label, True))
    return out


def timeout_case(world):
    """Rank 0 sends to rank 1, which never posts the receive: rank 0 raises within ~2 s."""
    if world.rank == 0:
        short = from_torch(world._pg, device=world.device, timeout=2.0)
        t0 = time.time()
        try:
            short.send(torch.zeros(1 << 20), 1).synchronize()
            return ("no timeout", time.time() - t0)
        except CommTimeout:
            return ("timeout", time.time() - t0)
    time.sleep(6)
    return ("idle", 0.0)


def _check(per_rank):
    for rank, results in enumerate(per_rank):
        for name, ok in results:
            assert ok, f"rank {rank}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4])
def test_gloo_ring_exchange(n):
    _check(run_gloo(n, ring_cases))


@pytest.mark.slow
def test_gloo_errors_and_timeout():
    _check(run_gloo(2, error_cases))
    res = run_gloo(2, timeout_case)
    assert res[0][0] == "timeout" and res[0][1] < 10, res


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_local_ring_exchange(n, protocol):
    groups = local_group(n)
    assert (groups[0]._world.box is not None) == (protocol == "core")
    _check(run_local(groups, ring_cases))
    _check(run_local(groups, error_cases))


def test_local_size_mismatch_and_timeout(protocol):
    g = local_group(2, timeout=1.0)

    def mismatch(group):
        if group.rank == 0:
            group.send(torch.zeros(3), 1).synchronize()
        else:
            group.recv(torch.zeros(4), 0).synchronize()

    with pytest.raises(ValueError, match=r"message 0->1: sent 3 x torch.float32 but the receive "
                                         r"buffer holds 4 x torch.float32"):
        run_local(g, mismatch)

    def never(group):
        if group.rank == 0:
            group.send(torch.zeros(3), 1).synchronize()

    t0 = time.time()
    with pytest.raises(CommTimeout, match="message 0->1 was not matched"):
        run_local(local_group(2, timeout=1.0), never)
    assert time.time() - t0 < 5

    def late(group):  # rank 0 blocks in its wait until rank 1 posts, with no deadline
        if group.rank == 1:
            time.sleep(0.2)
            group.recv(y := torch.zeros(3), 0).synchronize()
            return y.tolist()
        group.send(torch.ones(3), 1).synchronize()

    assert run_local(local_group(2, timeout=math.inf), late)[1] == [1.0, 1.0, 1.0]


def ring_steps(group, rounds, device="cpu", consume_at_once=False):
    """Step generator: `rounds` ring exchanges (message sizes vary by rank and round), each
    round's payload derived from what the previous round received."""
    r, P = group.rank, group.size
    x = torch.full((r + 1,), float(r), device=device)
    for k in range(rounds):
        buf = torch.empty((r - 1 - k) % P + 1, device=device)
        mine = torch.full(((r - k) % P + 1,), float(x[0]) + 1, device=device)
        yield group.prepare_exchange(sends=[(mine, (r + 1) % P)], recvs=[(buf, (r - 1) % P)],
                                     consume_at_once=consume_at_once).start()
        x = buf * 1  # consumed on this rank's stream after the wait
    return x.cpu()


def expected_ring(P, rounds):
    vals = [float(r) for r in range(P)]
    for _ in range(rounds):
        vals = [vals[(r - 1) % P] + 1 for r in range(P)]
    return vals


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_run_steps_ring(n, protocol):
    groups = local_group(n)
    res = run_steps(groups, [ring_steps(g, 3) for g in groups])
    assert [float(x[0]) for x in res] == expected_ring(n, 3)
    assert [x.numel() for x in res] == [(r - 3) % n + 1 for r in range(n)]
    # The same generator on each rank's own thread, driven by `drive`.
    res = run_local(groups, lambda g: drive(ring_steps(g, 3)))
    assert [float(x[0]) for x in res] == expected_ring(n, 3)


def test_run_steps_mismatch_and_errors(protocol):
    """Each case on a fresh world: a message left unmatched stays queued in its world."""
    g = local_group(3)

    def one_sided(group):
        if group.rank == 0:
            yield group.send(torch.zeros(2), 1)
        return group.rank

    with pytest.raises(CommError, match=r"virtual ranks \[0\] wait"):
        run_steps(g, [one_sided(x) for x in g])

    def failing(group):
        if group.rank == 2:
            raise KeyError("rank 2 fails")
        yield group.exchange(sends=[(torch.zeros(1), 1 - group.rank)],
                             recvs=[(torch.zeros(1), 1 - group.rank)])

    g = local_group(3)
    with pytest.raises(KeyError, match="rank 2"):
        run_steps(g, [failing(x) for x in g])

    def mismatch(group):
        if group.rank == 0:
            yield group.send(torch.zeros(3), 1)
        elif group.rank == 1:
            yield group.recv(torch.zeros(4), 0)

    g = local_group(3)
    with pytest.raises(ValueError, match="sent 3"):
        run_steps(g, [mismatch(x) for x in g])
    with pytest.raises(ValueError, match="2 step generators for 3"):
        run_steps(g, [ring_steps(x, 1) for x in g[:2]])


def test_local_group_arguments():
    with pytest.raises(ValueError):
        local_group(0)
    with pytest.raises(ValueError, match="per_rank_args"):
        run_local(local_group(2), lambda g, x: x, [1])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
def test_local_gpu_stream_ordering(n, protocol):
    """Receives consumed on each rank's compute stream after work.wait(), no device sync."""
    groups = local_group(n, "cuda")

    def body(group):
        r, P = group.rank, group.size
        a = torch.randn(2048, 2048, device="cuda")
        x = (a @ a).sum(1)  # long producer on the compute stream
        y = torch.empty_like(x)
        w = group.exchange(sends=[(x, (r + 1) % P)], recvs=[(y, (r - 1) % P)])
        w.wait()
        return x.cpu(), (y * 1).cpu()

    res = run_local(groups, body)
    for r in range(n):
        assert torch.equal(res[r][1], res[(r - 1) % n][0])


@pytest.mark.gpu
@pytest.mark.parametrize("consume_at_once", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_run_steps_gpu_stream_ordering(n, consume_at_once, protocol):
    """run_steps on CUDA: each round's payload is made on the rank's stream from what the last
    round received (the copies must be ordered after both ranks' streams), no device sync; with
    consume_at_once each round is copied by its last poster on that rank's own stream."""
    groups = local_group(n, "cuda")
    res = run_steps(groups, [ring_steps(g, 5, "cuda", consume_at_once) for g in groups])
    assert [float(x[0]) for x in res] == expected_ring(n, 5)


def _late_full(value, n=1000):
    """A tensor of `value` written ~1 ms late on the current stream (a copy that does not wait
    for this stream reads, or is overwritten by, what was there before)."""
    torch.cuda._sleep(2_000_000)
    return torch.full((n,), float(value), device="cuda")


def all_to_all_rounds(group, rounds, finish):
    """Step generator: `rounds` all-to-all exchanges posted consume_at_once (self-message
    included), every payload and receive buffer written late on the rank's stream. `finish(work)`
    completes each Work: a yield (run_steps / drive) or a host synchronize. Returns whether every
    round received 100 * p + 10 * round + rank from every p."""
    r, P = group.rank, group.size
    ok = True
    for k in range(rounds):
        sends = [(_late_full(100 * r + 10 * k + p), p) for p in range(P)]
        bufs = [_late_full(-1) for _ in range(P)]
        work = group.prepare_exchange(sends=sends, recvs=[(b, p) for p, b in enumerate(bufs)],
                                      consume_at_once=True).start()
        yield from finish(work)
        ok &= all(bool((b == 100 * p + 10 * k + r).all()) for p, b in enumerate(bufs))
    return ok


def _yield(work):
    yield work


def _synchronize(work):
    work.synchronize()
    return
    yield  # noqa: unreachable (makes this a generator)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 3, 4])
def test_consume_at_once_rounds_gpu(n, protocol):
    """Consume-at-once rounds: the compiled mailbox copies each round once, in its last post
    (run_steps), or in whichever post or wait comes last (a thread per rank)."""
    groups = local_group(n, "cuda")
    assert run_steps(groups, [all_to_all_rounds(g, 4, _yield) for g in groups]) == [True] * n
    assert run_local(groups, lambda g: drive(all_to_all_rounds(g, 4, _yield))) == [True] * n
    assert run_local(groups, lambda g: drive(all_to_all_rounds(g, 4, _synchronize))) == [True] * n


@pytest.mark.gpu
@pytest.mark.parametrize("finish", ["wait", "synchronize"])
def test_consume_at_once_copied_by_wait_gpu(finish, protocol):
    """A consume-at-once half still pending (2 -> 0) keeps the round open, so the 0 <-> 1
    messages are copied by rank 0's wait (on its stream) or synchronize (on its communication
    stream), after both ranks' late writes; the 2 -> 0 message by the post that closes it."""
    g = local_group(3, "cuda")

    def on(r, fn):
        with torch.cuda.stream(g[r].stream):
            return fn()

    def post(r, sends=(), recvs=()):
        return on(r, lambda: g[r].prepare_exchange(sends=list(sends), recvs=list(recvs),
                                                   consume_at_once=True).start())

    x2, b0_2 = on(2, lambda: _late_full(20)), on(0, lambda: _late_full(-1))
    w2 = post(2, sends=[(x2, 0)])
    x0, b0 = on(0, lambda: _late_full(1)), on(0, lambda: _late_full(-1))
    x1, b1 = on(1, lambda: _late_full(2)), on(1, lambda: _late_full(-1))
    w1 = post(1, sends=[(x1, 0)], recvs=[(b1, 0)])
    w0 = post(0, sends=[(x0, 1)], recvs=[(b0, 1)])
    if finish == "wait":
        on(0, w0.wait)
        on(1, w1.wait)
    else:
        w0.synchronize()
        w1.synchronize()
    got = [on(0, lambda: bool((b0 == 2).all())), on(1, lambda: bool((b1 == 1).all()))]
    w02 = post(0, recvs=[(b0_2, 2)])
    on(0, w02.wait)
    on(2, w2.wait)
    got.append(on(0, lambda: bool((b0_2 == 20).all())))
    torch.cuda.synchronize()
    assert got == [True, True, True]


@pytest.mark.gpu
def test_local_gpu_self_message_across_posts(protocol):
    """A rank sends to itself from one stream and receives in a later post from another: the
    copy must wait for the stream the send was posted on (its long producer)."""
    g = local_group(1, "cuda")[0]
    other = torch.cuda.Stream()

    def body(group):
        a = torch.randn(2048, 2048, device="cuda")
        x = (a @ a @ a).sum(1)  # long producer on the rank's stream
        sent = group.send(x, 0)
        y = torch.empty_like(x)
        other.wait_stream(torch.cuda.current_stream())  # y is allocated before `other` runs
        with torch.cuda.stream(other):
            got = group.recv(y, 0)
            got.wait()
            z = y * 1
        yield sent
        torch.cuda.current_stream().wait_stream(other)
        return torch.equal(z, x)

    assert run_steps([g], [body(g)]) == [True]


@pytest.mark.gpu
def test_local_gpu_sent_tensor_outlives_caller(protocol):
    """A sender drops its tensor right after posting and allocates (and fills) a new one of the
    same size on its stream before the receiver posts: the caching allocator would hand the
    dropped block out again unless the world keeps it until its copy has run."""
    groups = local_group(2, "cuda")

    def body(group):
        n = 1 << 20
        if group.rank == 0:
            tmp = torch.arange(n, device="cuda", dtype=torch.float32)
            work = group.send(tmp, 1)
            del tmp
            junk = torch.full((n,), -1.0, device="cuda")
            yield work
            return junk.sum().item()
        buf = torch.empty(n, device="cuda")
        yield group.recv(buf, 0)
        return torch.equal(buf, torch.arange(n, device="cuda", dtype=torch.float32))

    res = run_steps(groups, [body(g) for g in groups])
    assert res[1] is True and res[0] == -(1 << 20)


def test_prepared_exchange_replace(protocol):
    """start(replace) posts other tensors in place of prepared sends for one call; the prepared
    ones are used again afterwards, and a tensor that cannot stand in is refused."""
    groups = local_group(2)

    def body(group):
        r = group.rank
        fixed, buf = torch.full((4,), float(r)), torch.empty(4)
        ex = group.prepare_exchange(sends=[(fixed, 1 - r)], recvs=[(buf, 1 - r)])
        yield ex.start({0: torch.full((4,), 10.0 + r)})
        first = buf.tolist()
        yield ex.start()
        second = buf.tolist()
        for bad in (torch.zeros(5), torch.zeros(4, dtype=torch.float64), torch.zeros(8)[::2]):
            with pytest.raises(ValueError, match=r"replace\[0\]"):
                ex.start({0: bad})
        return first, second

    res = run_steps(groups, [body(g) for g in groups])
    assert res[0] == ([11.0] * 4, [1.0] * 4) and res[1] == ([10.0] * 4, [0.0] * 4)
