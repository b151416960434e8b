"""Fault injection: one rank fails, nothing hangs, nothing is lost.

Virtual ranks (`run_local`): a rank that raises aborts its world, so every peer blocked on it
raises CommAborted at once; the caller gets the failing rank's own exception. Checked here on the
drivers through their public API only (ring prefill with retention, decode scale-up, migration):
every surviving rank raises within twice the configured timeout (in practice well under a
second), and every instance's cache is consistent afterwards (allocator stats, token counts and
K/V bytes of the requests it held).

Processes (torch.distributed gloo on the CPU; native NCCL in the GPU tier, on two GPUs): a peer
that raises (stays alive, never posts) or dies makes the waiting rank raise CommError
(CommTimeout when it only stops answering) within about the configured timeout; the waiting
process neither hangs nor exits.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time

import pytest
import torch

import esp_kernels as esp
from esp_kernels.comm import CommAborted, CommError, local_group, run_local
from esp_kernels.striping import stripe

TIMEOUT_S = 5.0  # the groups' timeout: every surviving rank must raise within 2x


class InjectedFault(RuntimeError):
    """The failure a test injects into one rank."""


class InjectedCommFault(CommError):
    """A communication failure injected into one rank's exchanges."""


class _FailingExchange:
    """A prepared exchange whose start() runs `before_start` first (which may raise)."""

    def __init__(self, inner, before_start):
        self._inner, self._before = inner, before_start

    def __bool__(self):
        return bool(self._inner)

    def start(self, *args, **kwargs):
        self._before()
        return self._inner.start(*args, **kwargs)


def fail_after(group, posts: int | None, what: str = "injected", error=InjectedFault) -> list:
    """Make `group`'s exchanges raise `error` from the (posts+1)-th on (exchange, send, recv and
    prepared exchanges all post through prepare_exchange); posts=None only counts them. Returns
    [posts so far]."""
    count = [0]
    prepare = group.prepare_exchange

    def tick():
        count[0] += 1
        if posts is not None and count[0] > posts:
            raise error(f"{what}: rank {group.rank} fails at its exchange {count[0]}")

    def failing_prepare(*args, **kwargs):
        return _FailingExchange(prepare(*args, **kwargs), tick)

    group.prepare_exchange = failing_prepare
    return count


def snapshot(cache):
    """Everything a failure must leave as it was: allocator stats and, per request, its
    positions and K/V rows of every layer."""
    held = {}
    for r in cache.requests():
        slots = cache.slots(r)
        held[r] = (cache.num_tokens(r), cache.positions(r).tolist(),
                   cache.slot_rows()[:, slots].clone())
    return cache.stats(), held


def assert_same(before, after, where):
    (s0, h0), (s1, h1) = before, after
    assert s1 == s0, f"{where}: allocator stats changed {s0} -> {s1}"
    assert sorted(h1, key=repr) == sorted(h0, key=repr), f"{where}: requests changed"
    for r, (n, pos, rows) in h0.items():
        assert h1[r][0] == n and h1[r][1] == pos, f"{where}: tokens of {r!r} changed"
        assert torch.equal(h1[r][2], rows), f"{where}: K/V of {r!r} changed"


def _run_failing(groups, fn, *args, expect=InjectedFault):
    """run_local expecting `expect`; returns (exception, seconds)."""
    t0 = time.monotonic()
    with pytest.raises(expect) as info:
        run_local(groups, fn, *args)
    return info.value, time.monotonic() - t0


def _check_peers(exc, failed: int, seconds: float, allowed=(CommAborted,)):
    """Every other rank raised one of `allowed` (CommAborted naming the failed rank) in time."""
    assert seconds < 2 * TIMEOUT_S, f"the ranks took {seconds:.1f} s to raise"
    assert exc.__notes__[0].startswith(f"raised on virtual rank {failed}")
    for r, e in exc.peer_errors.items():
        assert isinstance(e, allowed), f"rank {r} raised {type(e).__name__}: {e}"
        if isinstance(e, CommAborted):
            assert e.failed_rank == failed and e.__cause__ is exc


def _cache(pages=64, page_size=4, layers=2):
    return esp.PagedKVCache(layers, pages, page_size, 2, 8, torch.float32, "cpu")


def _fill(cache, request, n, seed):
    g = torch.Generator().manual_seed(seed)
    slots = cache.allocate(request, range(n))
    cache.slot_rows()[:, slots] = torch.randn(cache.slot_rows().shape[0], n,
                                              cache.slot_rows().shape[2], generator=g)


# ---- virtual ranks: the drivers ---------------------------------------------------------------

@pytest.mark.parametrize("fail_rank,posts", [(1, 1), (2, 0), (0, 3)])
def test_rank_raising_mid_ring(fail_rank, posts):
    """ring_prefill with retention on 3 virtual ranks; one rank's exchange fails after `posts`
    posts. The peers raise CommAborted at once; requests each cache held before are untouched,
    and the failed batch left at most its own reservation, which freeing the batch returns."""
    P, seqlens, layers = 3, [13, 7, 20], 2
    groups = local_group(P, timeout=TIMEOUT_S)
    caches = [_cache() for _ in range(P)]
    for r, c in enumerate(caches):
        _fill(c, f"old{r}", 9, seed=r)
    before = [snapshot(c) for c in caches]
    plan = esp.RetentionPlan.balanced(seqlens, {r: c.free_pages for r, c in enumerate(caches)},
                                      caches[0].page_size, request_ids=["a", "b", "c"])
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(seqlens), 4, 8, generator=gen)
    k, v = (torch.randn(sum(seqlens), 2, 8, generator=gen) for _ in range(2))
    parts = [stripe(t, seqlens, P) for t in (q, k, v)]

    def body(group, cache):
        if group.rank == fail_rank:
            fail_after(group, posts, "mid-ring")
        for layer in range(layers):
            esp.ring_prefill(parts[0][group.rank], parts[1][group.rank], parts[2][group.rank],
                             seqlens, group, retain=(plan, cache, layer))

    exc, seconds = _run_failing(groups, body, caches)
    _check_peers(exc, fail_rank, seconds)
    for r, c in enumerate(caches):
        stats, held = snapshot(c)
        n, pos, rows = before[r][1][f"old{r}"]
        assert held[f"old{r}"][:2] == (n, pos) and torch.equal(held[f"old{r}"][2], rows)
        batch = [rid for rid in ("a", "b", "c") if rid in held]
        for b, rid in enumerate(["a", "b", "c"]):  # a reservation is exactly the plan's share
            if rid in held:
                assert sorted(held[rid][1]) == plan.positions(b, r).tolist()
        for rid in batch:
            c.free(rid)
        assert_same(before[r], snapshot(c), f"instance {r} after freeing the failed batch")


def test_cache_out_mid_scale_up():
    """Instance 1 masters every request and its cache runs out while scale_up allocates the new
    tokens (the allocation raises CacheOutOfMemory): instance 1 raises it, the others raise
    CommAborted in the decode layer that follows, and no cache changed."""
    groups = local_group(3, timeout=TIMEOUT_S)
    caches = [_cache(pages=16) for _ in range(3)]
    requests = ["x", "y"]
    for r, c in enumerate(caches):
        for i, rid in enumerate(requests):
            _fill(c, rid, 5 + 3 * r + i, seed=10 * r + i)
    before = [snapshot(c) for c in caches]

    def out_of_memory(wanted):
        raise esp.CacheOutOfMemory(f"injected: no page left for {sorted(wanted)}")

    def body(group, cache):
        plan = esp.DecodePlan.build(group, cache, requests, masters=[1, 1])
        if group.rank == 1:   # this cache runs out after the gather
            cache.append_one = cache.allocate_many = out_of_memory
        try:
            plan = plan.scale_up(group, cache)
        except esp.CacheOutOfMemory as oom:
            raise InjectedFault("scale-up ran out on instance 1") from oom
        q = torch.randn(len(plan.mastered_by(group.world_rank)), 4, 8)
        kv = torch.randn(q.shape[0], 2, 8)
        return esp.distributed_decode(q, cache, plan, group, layer=0, k_new=kv, v_new=kv)

    exc, seconds = _run_failing(groups, body, caches)
    assert isinstance(exc.__cause__, esp.CacheOutOfMemory)
    _check_peers(exc, 1, seconds)
    for r, c in enumerate(caches):
        c.__dict__.pop("allocate_many", None)
        assert_same(before[r], snapshot(c), f"instance {r}")


def test_scale_up_with_no_room_anywhere():
    """Every instance's cache is full: scale_up raises CacheOutOfMemory on every instance at
    once (they decide from the same gathered numbers), with nothing allocated anywhere."""
    groups = local_group(2, timeout=TIMEOUT_S)
    caches = [_cache(pages=2) for _ in range(2)]
    for r, c in enumerate(caches):
        _fill(c, "z", 8, seed=r)  # both pages full
    before = [snapshot(c) for c in caches]

    def body(group, cache):
        plan = esp.DecodePlan.build(group, cache, ["z"], masters=[0])
        try:
            plan.scale_up(group, cache)
        except esp.CacheOutOfMemory as exc:
            return str(exc)
        return None

    t0 = time.monotonic()
    res = run_local(groups, body, caches)
    assert time.monotonic() - t0 < 2 * TIMEOUT_S
    assert all(msg is not None and "'z'" in msg for msg in res), res
    for r, c in enumerate(caches):
        assert_same(before[r], snapshot(c), f"instance {r}")


def _migration_with_fault(fail_rank: int, posts: int | None, error):
    """Instance 0 moves two requests to instance 1 in small chunks (19 of 2 tokens); instance
    `fail_rank`'s exchanges raise `error` after `posts` posts (None: never). Returns (caches
    before, caches, posts fail_rank made, exception or None, seconds)."""
    groups = local_group(3, timeout=TIMEOUT_S)
    caches = [_cache(pages=32) for _ in range(3)]
    _fill(caches[0], "m", 30, seed=1)
    _fill(caches[0], "n", 11, seed=2)
    _fill(caches[1], "kept", 6, seed=3)
    _fill(caches[2], "other", 4, seed=4)
    before = [snapshot(c) for c in caches]
    plan = esp.MigrationPlan([("m", 0, 30, 0, 1), ("n", 3, 11, 0, 1)])
    made = [None]
    side = "source" if fail_rank == 0 else "destination"

    def body(group, cache):
        if group.rank == fail_rank:
            made[0] = fail_after(group, posts, side, error=error)
        return esp.migrate_kv(cache, plan, group, chunk_bytes=512)

    t0 = time.monotonic()
    try:
        res, exc = run_local(groups, body, caches), None
        assert res == [{"sent": 38, "received": 0}, {"sent": 0, "received": 38},
                       {"sent": 0, "received": 0}], res
    except esp.MigrationError as e:
        res, exc = None, e
    return before, caches, made[0][0], exc, time.monotonic() - t0


@pytest.mark.parametrize("error", [InjectedCommFault, InjectedFault],
                         ids=["comm-error", "other-error"])
@pytest.mark.parametrize("fail_rank", [1, 0], ids=["destination", "source"])
def test_migration_fails_at_every_post(fail_rank, error):
    """The migration of _migration_with_fault, once per post of the failing instance's whole
    sequence (the metadata round, the batch's metadata and answer, every data chunk, the
    acknowledgement; counted from a clean run, so a protocol change keeps every post covered),
    with a communication error or another exception there. The failing instance raises
    MigrationError caused by it; its peer raises CommAborted at once; so does instance 2, which
    moves nothing but takes part in the metadata round (the first post) and the closing round
    (the last: it keeps an instance with refused entries from raising while others still
    move); no cache changed: the source keeps every token, the destination holds nothing new.
    A failure in the closing round comes after every batch ran: the caches hold the moved
    state."""
    peer = 1 - fail_rank
    before, caches, total, exc, _ = _migration_with_fault(fail_rank, None, error)
    assert exc is None and total > 20, (exc, total)  # metadata, 19 chunks, ack, closing round
    moved = [snapshot(c) for c in caches]
    for posts in range(total):
        before, caches, made, exc, seconds = _migration_with_fault(fail_rank, posts, error)
        where = f"failure at post {posts + 1} of {total}"
        assert exc is not None, f"{where}: the migration succeeded"
        assert made == posts + 1, f"{where}: {made} posts made"
        assert isinstance(exc.__cause__, error), f"{where}: {exc!r} caused by {exc.__cause__!r}"
        assert f"rank {fail_rank} fails at its exchange {posts + 1}" in str(exc), where
        _check_peers(exc, fail_rank, seconds)
        assert set(exc.peer_errors) == {peer, 2}, (where, exc.peer_errors)
        want = moved if posts == total - 1 else before
        for r, c in enumerate(caches):
            assert_same(want[r], snapshot(c), f"{where}: instance {r}")


# ---- processes: what a peer sees when a rank raises or dies -----------------------------------

def _timed_recv(group, buf):
    """Rank 0's side: wait on a message from rank 1; (outcome, error type, seconds)."""
    t0 = time.monotonic()
    try:
        group.recv(buf, 1).synchronize()
        return ("returned", None, time.monotonic() - t0)
    except CommError as exc:
        return ("raised", type(exc).__name__, time.monotonic() - t0)


def _gloo_worker(rank, world_size, tmp, mode, timeout_s):
    torch.set_num_threads(1)
    import torch.distributed as dist
    out = os.path.join(tmp, f"rank{rank}.pkl")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    group = esp.comm.from_torch(timeout=timeout_s)
    group.barrier()
    if rank == 1:
        if mode == "dies":
            os._exit(3)  # the process is gone (a crash)
        try:
            raise InjectedFault("rank 1 raises before its send")
        except InjectedFault:
            time.sleep(3 * timeout_s)  # stays alive and never posts (a hung or failed peer)
        result = ("raised", None, 0.0)
    else:
        result = _timed_recv(group, torch.zeros(4))
    with open(out, "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # no destroy_process_group: its peer may be gone


def _run_pair(worker, args_of, timeout_s):
    """`worker(*args_of(rank, tmp))` for ranks 0 and 1 in spawned processes; rank 0 (the survivor)
    must exit normally within 120 s; returns what it pickled to tmp/rank0.pkl."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=args_of(r, tmp)) for r in range(2)]
        for p in procs:
            p.start()
        procs[0].join(120)
        alive = procs[0].is_alive()
        for p in procs:
            p.join(4 * timeout_s if p.is_alive() else 0)
            if p.is_alive():
                p.kill()
        assert not alive, "the surviving rank hung"
        assert procs[0].exitcode == 0, f"the surviving rank exited with {procs[0].exitcode}"
        with open(os.path.join(tmp, "rank0.pkl"), "rb") as f:
            return pickle.load(f)


def _gloo_run(mode, timeout_s):
    return _run_pair(_gloo_worker, lambda r, tmp: (r, 2, tmp, mode, timeout_s), timeout_s)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raises", "dies"])
def test_gloo_peer_failure_raises_within_timeout(mode):
    """torch.distributed (gloo): rank 0 waits on a message from rank 1, which raises (stays
    alive, never sends) or dies. Rank 0 raises CommError (CommTimeout when rank 1 stays) within
    about its timeout, and its process exits normally."""
    timeout_s = 3.0
    outcome, kind, seconds = _gloo_run(mode, timeout_s)
    assert outcome == "raised", (outcome, kind, seconds)
    if mode == "raises":
        assert kind == "CommTimeout" and timeout_s * 0.9 < seconds < 2 * timeout_s, (kind, seconds)
    else:
        assert kind in ("CommError", "CommTimeout") and seconds < 2 * timeout_s, (kind, seconds)


def _nccl_worker(rank, tmp, mode, timeout_s):
    import torch.distributed as dist
    out = os.path.join(tmp, f"rank{rank}.pkl")
    store = dist.FileStore(os.path.join(tmp, "store"), 2)
    group = esp.comm.init_nccl(rank, 2, store, device=rank, timeout=timeout_s)
    group.barrier()
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(3 * timeout_s)  # raised in its own code: alive, never posts
        os._exit(0)
    result = _timed_recv(group, torch.zeros(4, device="cuda:0"))
    with open(out, "wb") as f:
        pickle.dump((result, group.closed), f)
    os._exit(0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["raises", "dies"])
def test_nccl_peer_failure_raises_within_timeout(mode):
    """Native NCCL over two GPUs: rank 0's host wait on a message from a peer that raised (alive,
    never sends) or died raises CommTimeout (or NCCL's remote error for a dead peer) within about
    the timeout, aborts the world (every handle then raises CommError) and the process exits
    normally."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL ranks need one device each)")
    timeout_s = 5.0
    (outcome, kind, seconds), closed = _run_pair(
        _nccl_worker, lambda r, tmp: (r, tmp, mode, timeout_s), timeout_s)
    # A dead peer may also surface as NCCL's remote error before the timeout.
    expected = ("CommTimeout",) if mode == "raises" else ("CommTimeout", "CommError")
    assert outcome == "raised" and kind in expected, (outcome, kind)
    assert seconds < 2 * timeout_s and closed, (seconds, closed)
