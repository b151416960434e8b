"""Group semantics over torch.distributed (gloo processes) and the Group-level checks shared by
every backend. The virtual-rank protocol has its own spec and suite: test_local_protocol.py."""

import math
import time

import pytest
import torch

from esp_kernels.comm import CommTimeout, from_torch, local_group, run_local, run_steps
from dist_utils import run_gloo


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
    # messages to self, as on the other backends (gloo has no pair to itself: "Pair is not
    # connected"), alongside one to a peer
    x, y, z = torch.arange(3.0) + world.rank, torch.empty(3), torch.empty(2)
    peer = (world.rank + 1) % n
    world.exchange(sends=[(x, world.rank), (x[:2].clone(), peer)],
                   recvs=[(y, world.rank), (z, (world.rank - 1) % n)]).wait()
    results.append(("self message", torch.equal(y, x)))
    results.append(("with a peer", torch.equal(z, torch.arange(2.0) + (world.rank - 1) % n)))
    try:
        world.exchange(sends=[(x, world.rank)], recvs=[(z, world.rank)])
        results.append(("self sizes", False))
    except ValueError:
        results.append(("self sizes", True))
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


def test_local_group_arguments():
    """Argument checks are the Group's, the same on every backend (gloo above)."""
    with pytest.raises(ValueError):
        local_group(0)
    with pytest.raises(ValueError, match="per_rank_args"):
        run_local(local_group(2), lambda g, x: x, [1])
    _check(run_local(local_group(3), error_cases))
    with pytest.raises(ValueError, match="2 step generators for 3"):
        run_steps(local_group(3), [iter(()) for _ in range(2)])
    # integers, never truncated (subgroup([0, 1.9]) was [0, 1], all_gather_ints([1.7]) [1]),
    # and a timeout that is a number (None failed at the first wait)
    g = local_group(2)
    for bad in ([0, 1.9], "01", [0, True]):
        with pytest.raises(TypeError, match=r"subgroup order\[\d\] must be an integer"):
            g[0].subgroup(bad)
    with pytest.raises(TypeError, match=r"all_gather_ints values\[0\] must be an integer"):
        g[0].all_gather_ints([1.7])
    for bad in (None, "1", 0, -1.0, True):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            local_group(2, timeout=bad)


def world_rank_case(world):
    """world_rank is this member's world rank in the world and in any subgroup."""
    n = world.size
    order = [*range(n)][::-1]
    ring = world.subgroup(order)
    return [("world", world.world_rank == world.rank == world.world_ranks[world.rank]),
            ("ring", ring.world_rank == world.rank and ring.rank == order.index(world.rank))]


@pytest.mark.slow
def test_gloo_world_rank():
    _check(run_gloo(3, world_rank_case))


def test_local_world_rank():
    _check(run_local(local_group(3), world_rank_case))


def test_failure_note_names_world_ranks_as_comm_aborted_does():
    """Ranks of an ordered subgroup: the note named list positions where CommAborted names world
    ranks ("raised on virtual rank 1 ... because rank 0 failed" for one failure)."""
    world = local_group(6)
    ring = [world[r].subgroup([3, 0, 5]) for r in (3, 0, 5)]

    def fn(g):
        if g.rank == 1:
            raise RuntimeError("boom")
        g.recv(torch.zeros(1), 1).wait()

    with pytest.raises(RuntimeError, match="boom") as info:
        run_local(ring, fn)
    note = info.value.__notes__[0]
    assert note.startswith("raised on virtual rank 0 (groups[1]); the other ranks raised: "
                           "rank 3 (groups[0]): CommAborted: virtual rank 3: ")
    assert "because rank 0 failed" in note and sorted(info.value.peer_errors) == [0, 2]


def test_run_local_timeout_is_for_the_whole_run_and_releases_blocked_ranks():
    """Ranks sleeping 0.6 / 1.8 s with timeout=0.9 raised only at 1.5 s (the limit applied to
    each join in turn); a rank blocked on a message stayed blocked after the CommTimeout."""
    from esp_kernels.comm import CommAborted

    def sleepy(g):
        time.sleep(0.6 + 1.2 * g.rank)

    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match="did not finish within 0.9 s"):
        run_local(local_group(2), sleepy, timeout=0.9)
    assert time.monotonic() - t0 < 1.35

    errors = {}

    def blocked(g):
        try:
            if g.rank == 0:
                g.recv(torch.zeros(1), 1).wait()  # rank 1 never sends
            else:
                time.sleep(5)
        except CommAborted as exc:
            errors[g.rank] = exc

    groups = local_group(2, timeout=math.inf)
    with pytest.raises(CommTimeout):
        run_local(groups, blocked, timeout=0.3)
    deadline = time.monotonic() + 2
    while 0 not in errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 in errors  # released by the abort, not left waiting forever
