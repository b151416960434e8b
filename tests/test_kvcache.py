"""Paged KV cache allocator (property tests), retention plans, proactive retention during the
ring, reactive migration with failure injection, and the row-copy kernel on GPU."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from esp_kernels.kvcache import copy_rows
from esp_kernels.testing import random_varlen_batch, stripe
from dist_utils import run_gloo

# ---------------------------------------------------------------- allocator


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([1, 3, 16]), num_pages=st.integers(1, 12),
       ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "remove"]), st.integers(0, 3),
                              st.integers(0, 20)), max_size=25))
def test_allocator_properties(page_size, num_pages, ops):
    cache = esp.PagedKVCache(1, num_pages, page_size, 1, 4, torch.float32, "cpu")
    model = {}  # request -> list of positions stored (storage order irrelevant)
    nxt = {}
    for op, req, n in ops:
        if op == "alloc":
            start = nxt.get(req, 0)
            pos = list(range(start, start + n))
            before = cache.stats()
            need = cache.pages_needed(req, n)
            if need > cache.free_pages:
                with pytest.raises(esp.CacheOutOfMemory, match=str(req)):
                    cache.allocate(req, pos)
                assert cache.stats() == before  # all-or-nothing
                continue
            slots = cache.allocate(req, pos)
            assert slots.numel() == n
            model.setdefault(req, []).extend(pos)
            nxt[req] = start + n
        elif op == "free":
            cache.free(req)
            model.pop(req, None)
        else:
            stored = model.get(req, [])
            drop = stored[::3][: n]
            assert cache.remove_tokens(req, drop) == len(drop)
            model[req] = [p for p in stored if p not in set(drop)]
        # invariants
        s = cache.stats()
        assert s.used_tokens == sum(len(v) for v in model.values())
        assert s.used_pages + s.free_pages == num_pages
        assert s.fragmented_slots == s.used_pages * page_size - s.used_tokens
        assert 0 <= s.fragmentation <= 1
        all_slots = []
        for r, pos in model.items():
            assert sorted(cache.positions(r).tolist()) == sorted(pos)
            assert cache.num_tokens(r) == len(pos)
            all_slots += cache.slots(r).tolist()
            assert len(cache.block_table([r])[0][0]) >= math.ceil(len(pos) / page_size)
        assert len(set(all_slots)) == len(all_slots)  # no slot holds two tokens
        assert all(0 <= x < num_pages * page_size for x in all_slots)


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([1, 3, 16]), num_pages=st.integers(1, 10),
       steps=st.lists(st.tuples(st.sampled_from(["append", "free", "remove", "stale"]),
                                st.lists(st.integers(0, 3), min_size=1, max_size=4,
                                         unique=True)), max_size=20))
def test_append_one_is_allocate_many_for_one_token(page_size, num_pages, steps):
    """append_one (a decode step's appends, on plain ints) leaves a cache exactly as
    allocate_many would, raises what it raises (duplicates, out of memory: nothing changed)."""
    fast = esp.PagedKVCache(1, num_pages, page_size, 1, 4, torch.float32, "cpu")
    slow = esp.PagedKVCache(1, num_pages, page_size, 1, 4, torch.float32, "cpu")
    nxt = {}
    for op, reqs in steps:
        if op in ("append", "stale"):
            # "stale": a position the request already stores (or below its newest one).
            want = {r: (nxt.get(r, 0) if op == "append" else max(nxt.get(r, 0) - 1, 0))
                    for r in reqs}
            try:
                expect = {r: int(t[0]) for r, t in slow.allocate_many(
                    {r: [p] for r, p in want.items()}).items()}
            except (esp.CacheOutOfMemory, ValueError) as exc:
                with pytest.raises(type(exc)):
                    fast.append_one(want)
            else:
                assert fast.append_one(want) == expect
                for r, p in want.items():
                    nxt[r] = max(nxt.get(r, 0), p + 1)
        elif op == "free":
            for cache in (fast, slow):
                cache.free(reqs[0])
            nxt.pop(reqs[0], None)
        else:
            drop = slow.positions(reqs[0]).tolist()[::2]
            assert fast.remove_tokens(reqs[0], drop) == slow.remove_tokens(reqs[0], drop)
        assert fast.stats() == slow.stats()
        for r in set(nxt) | set(slow.requests()):
            assert fast.placement(r) == slow.placement(r)
            assert torch.equal(fast.positions(r), slow.positions(r))
            assert fast.last_token(r) == slow.last_token(r)


def test_remove_tokens_keeps_data_dense():
    cache = esp.PagedKVCache(2, 8, 4, 2, 8, torch.float32, "cpu")
    slots = cache.allocate("r", range(10))
    data = torch.randn(2, 2, 10, 16)
    for layer in range(2):
        cache.slot_rows(layer)[:, slots] = data[layer]
    cache.remove_tokens("r", [0, 3, 4])
    keep = [i for i in range(10) if i not in (0, 3, 4)]
    assert sorted(cache.positions("r").tolist()) == keep
    assert cache.stats().used_pages == 2
    for layer in range(2):
        k, v = cache.gather("r", layer)
        pos = cache.positions("r")
        assert torch.equal(k.reshape(len(keep), -1), data[layer, 0, pos])
        assert torch.equal(v.reshape(len(keep), -1), data[layer, 1, pos])


def test_cache_bad_input():
    with pytest.raises(ValueError, match="page_size"):
        esp.PagedKVCache(1, 4, 0, 1, 8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="dtype"):
        esp.PagedKVCache(1, 4, 4, 1, 8, torch.int32, "cpu")
    cache = esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32, "cpu")
    cache.allocate("a", [0, 1])
    with pytest.raises(ValueError, match="already stores"):
        cache.allocate("a", [1, 2])
    with pytest.raises(ValueError, match="duplicate"):
        cache.allocate("b", [5, 5])
    with pytest.raises(esp.CacheOutOfMemory, match="short by 2 pages"):
        cache.allocate("c", range(17))
    with pytest.raises(ValueError, match="layer"):
        cache.layer(1)


# ---------------------------------------------------------------- retention plans


@pytest.mark.parametrize("policy", ["fill_first", "balanced"])
def test_retention_policies_cover_every_token_once(policy):
    seqlens = [1, 17, 100, 33]
    free = {2: 4, 0: 10, 5: 3}
    plan = getattr(esp.RetentionPlan, policy)(seqlens, free, 16)
    for b, L in enumerate(seqlens):
        got = torch.cat([plan.positions(b, i) for i in plan.instances]).sort().values
        assert torch.equal(got, torch.arange(L))
    for inst in plan.instances:
        pages = sum(math.ceil(plan.positions(b, inst).numel() / 16) for b in range(4))
        assert pages <= free[inst]
    if policy == "fill_first":  # the first instance is filled before the next is used
        assert plan.positions(0, 2).numel() == 1 and plan.positions(1, 2).numel() == 17


def test_retention_plan_validation():
    with pytest.raises(ValueError, match="kept by more than one"):
        esp.RetentionPlan([4], [{0: [0, 1, 2], 1: [2, 3]}])
    with pytest.raises(ValueError, match="kept by no instance"):
        esp.RetentionPlan([4], [{0: [0, 1]}])
    with pytest.raises(ValueError, match="needing 2 pages"):
        esp.RetentionPlan([20], [{0: range(20)}], free_pages={0: 1}, page_size=16)
    with pytest.raises(ValueError, match="does not fit"):
        esp.RetentionPlan.fill_first([100], {0: 1, 1: 1}, 16)


def retention_batches(P, seed):
    """The batch lengths of a retention test on P ranks and its 2 layers' q/k/v."""
    seqlens = [1, P - 1 or 1, 97, 40]
    return seqlens, [random_varlen_batch(seqlens, 4, 2, 64,
                                         generator=torch.Generator().manual_seed(seed + layer))
                     for layer in range(2)]


def retention_rank(world, seed, policy, page_size):
    """Prefill 2 layers on a reordered ring with retention onto instances {1, 3} (or {0, 1})."""
    P = world.size
    ring = world.subgroup(list(range(P))[::-1])
    seqlens, batches = retention_batches(P, seed)
    keepers = {1: 60, 3: 120} if P == 4 else {0: 60, 1: 120}
    plan = getattr(esp.RetentionPlan, policy)(seqlens, {k: v // page_size + 4 for k, v in
                                                        keepers.items()}, page_size,
                                              request_ids=range(len(seqlens)))
    cache = esp.PagedKVCache(2, 200 // page_size + 8, page_size, 2, 64, torch.float32, "cpu")
    me = world.world_ranks[world.rank]
    if me in plan.instances:
        plan.reserve(cache, me)  # the engine reserves before prefill
    for layer, b in enumerate(batches):
        q, k, v = (stripe(t, seqlens, P)[ring.rank] for t in (b.q, b.k, b.v))
        esp.ring_prefill(q, k, v, seqlens, ring, retain=(plan, cache, layer))
    return {bi: (cache.positions(bi), [cache.gather(bi, l) for l in range(2)])
            for bi in range(len(seqlens)) if cache.num_tokens(bi)}


def check_retention(per_rank, seed, P):
    seqlens, batches = retention_batches(P, seed)
    seen = {bi: [] for bi in range(len(seqlens))}
    for stored in per_rank:
        for bi, (pos, layers) in stored.items():
            seen[bi].append(pos)
            for (k, v), b in zip(layers, batches):
                start = int(b.cu_seqlens[bi])
                assert torch.equal(k, b.k[start + pos]) and torch.equal(v, b.v[start + pos])
    for bi, L in enumerate(seqlens):
        assert torch.equal(torch.cat(seen[bi]).sort().values, torch.arange(L)), bi


@pytest.mark.parametrize("policy", ["fill_first", "balanced"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_retention_virtual_ranks(policy, page_size):
    P = 4
    res = run_local(local_group(P), retention_rank, [3] * P, [policy] * P, [page_size] * P)
    check_retention(res, 3, P)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fill_first", "balanced"])
def test_retention_gloo(policy):
    res = run_gloo(3, retention_rank, 9, policy, 16)
    check_retention(res, 9, 3)


def test_retention_after_the_cache_changed_reserves_again():
    """The same plan prefilled again after its requests were freed (other requests took their
    pages meanwhile): the writer notices the cache changed, reserves anew, and writes there."""
    g = local_group(1)[0]
    seqlens = [6, 3]
    plan = esp.RetentionPlan.fill_first(seqlens, {0: 8}, 2, request_ids=["a", "b"])
    cache = esp.PagedKVCache(1, 8, 2, 1, 4, torch.float32, "cpu")
    for round_ in range(2):
        b = random_varlen_batch(seqlens, 2, 1, 4, generator=torch.Generator().manual_seed(round_))
        esp.ring_prefill(b.q, b.k, b.v, seqlens, g, retain=(plan, cache, 0))
        for bi, rid in enumerate(plan.request_ids):
            k, v = cache.gather(rid, 0)
            start = int(b.cu_seqlens[bi])
            assert torch.equal(k, b.k[start:start + seqlens[bi]])
        for rid in plan.request_ids:
            cache.free(rid)
        cache.allocate(f"other{round_}", range(4))  # takes pages "a" had


def test_ring_runner_with_retention_refuses_a_cache_that_freed_its_slots():
    g = local_group(1)[0]
    seqlens = [6, 3]
    plan = esp.RetentionPlan.fill_first(seqlens, {0: 8}, 2, request_ids=["a", "b"])
    cache = esp.PagedKVCache(2, 8, 2, 1, 4, torch.float32, "cpu")
    runner = esp.RingPrefillRunner(seqlens, g, 2, 1, 4, torch.float32, retain=(plan, cache))
    b = random_varlen_batch(seqlens, 2, 1, 4, generator=torch.Generator().manual_seed(0))
    runner.run(b.q, b.k, b.v, 0)
    cache.allocate("other", range(3))  # others come: fine
    runner.run(b.q, b.k, b.v, 1)
    assert torch.equal(cache.gather("a", 1)[0], b.k[:6])
    cache.free("b")
    with pytest.raises(ValueError, match="moved or freed the reserved tokens of request 'b'"):
        runner.run(b.q, b.k, b.v, 1)
    with pytest.raises(ValueError, match="layer 2"):
        runner.run(b.q, b.k, b.v, 2)


def test_ring_runner_with_retention_refuses_positions_moved_onto_the_same_slots():
    """A request freed and allocated again lands on the same slots with its positions swapped:
    the slots alone matched, and the next layer stored position 0's K/V under position 1."""
    g = local_group(1)[0]
    cache = esp.PagedKVCache(2, 4, 4, 1, 2, torch.float32, "cpu")
    plan = esp.RetentionPlan.fill_first([2], {0: 4}, 4, request_ids=["r"])
    runner = esp.RingPrefillRunner([2], g, 1, 1, 2, torch.float32, retain=(plan, cache))
    k = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])
    runner.run(torch.randn(2, 1, 2), k, k.clone(), 0)
    slots = cache.slots("r").tolist()
    cache.remove_tokens("r", [0, 1])
    cache.allocate("r", [1, 0])
    assert cache.slots("r").tolist() == slots and cache.positions("r").tolist() == [1, 0]
    with pytest.raises(ValueError, match="moved or freed the reserved tokens of request 'r'"):
        runner.run(torch.randn(2, 1, 2), k, k.clone(), 1)


def test_retention_rejects_instances_outside_the_ring():
    g = local_group(2)
    plan = esp.RetentionPlan([4], [{5: range(4)}])
    cache = esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32, "cpu")
    q = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="not in the prefill ring"):
        esp.ring_prefill(q, q, q, [4], g[0], retain=(plan, cache, 0))
    with pytest.raises(TypeError, match="retain"):
        esp.ring_prefill(q, q, q, [4], g[0], retain=(plan, cache))


# ---------------------------------------------------------------- migration


def migration_rank(world, page_size, chunk_bytes, dst_pages):
    """Instance r holds request 'x' positions r, r+n, ... ; then ranges move around."""
    n = world.size
    me = world.world_ranks[world.rank]
    pages = dst_pages if me == n - 1 and dst_pages else 256 // page_size + 8
    cache = esp.PagedKVCache(3, pages, page_size, 2, 8, torch.float32, "cpu")
    full = torch.randn(3 * 2, 200, 16, generator=torch.Generator().manual_seed(1))
    mine = list(range(me, 200, n))
    slots = cache.allocate("x", mine)
    cache.slot_rows()[:, slots] = full[:, mine]
    plan = esp.MigrationPlan()
    plan.add("x", 10, 60, 0, n - 1)        # a range spanning pages
    if n > 2:
        plan.add("x", 0, 200, 1, 2)        # everything rank 1 holds
    before = cache.positions("x")
    try:
        stats = esp.migrate_kv(cache, plan, world, chunk_bytes=chunk_bytes)
        err = None
    except esp.MigrationError as exc:
        stats, err = None, str(exc)
    pos = cache.positions("x")
    data = cache.slot_rows()[:, cache.slots("x")]
    return me, before, pos, data, full, stats, err


def check_migration(res, n, expect_fail=False):
    owner = {}
    for me, before, pos, data, full, stats, err in res:
        assert torch.equal(data, full[:, pos]), f"instance {me} holds wrong K/V"
        for p in pos.tolist():
            assert p not in owner, f"token {p} on {owner.get(p)} and {me}"
            owner[p] = me
        if expect_fail and me in (0, n - 1):
            assert err is not None and ("kept" in err or "cannot take" in err), err
    assert sorted(owner) == list(range(200)), "tokens lost"
    if not expect_fail:
        assert all(owner[p] == n - 1 for p in range(10, 60) if owner[p] != 2 or n == 2)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("page_size", [1, 16])
def test_migration_virtual_ranks(n, page_size):
    res = run_local(local_group(n), migration_rank, [page_size] * n, [256] * n, [None] * n)
    check_migration(res, n)


def test_migration_destination_out_of_memory_keeps_source():
    n = 2
    res = run_local(local_group(n), migration_rank, [16] * n, [256] * n, [7] * n)
    check_migration(res, n, expect_fail=True)
    src = [r for r in res if r[0] == 0][0]
    assert torch.equal(src[1], src[2]), "source changed although the migration failed"


@pytest.mark.slow
def test_migration_gloo():
    check_migration(run_gloo(3, migration_rank, 16, 4096, None), 3)


def test_migration_runner():
    """MigrationRunner prepares the batches and chunking once; run() moves what migrate_kv
    would (tiny chunks: several per batch share the runner's two staging buffers)."""
    def body(g):
        me = g.world_ranks[g.rank]
        cache = esp.PagedKVCache(2, 32, 4, 1, 8, torch.float32, "cpu")
        data = torch.randn(4, 30, 8, generator=torch.Generator().manual_seed(3))
        if me == 0:
            cache.slot_rows()[:, cache.allocate("a", range(30))] = data
        plan = esp.MigrationPlan([("a", 0, 12, 0, 1), ("a", 20, 30, 0, 1)])
        runner = esp.MigrationRunner(plan, g, cache, chunk_bytes=4 * 8 * 4 * 3)
        assert runner.chunk_tokens == 3 and len(runner.batches) == 1
        stats = runner.run()
        pos = cache.positions("a")
        assert torch.equal(cache.slot_rows()[:, cache.slots("a")], data[:, pos])
        return stats, sorted(pos.tolist())

    (s0, p0), (s1, p1) = run_local(local_group(2), body)
    assert s0 == {"sent": 22, "received": 0} and s1 == {"sent": 0, "received": 22}
    assert p0 == list(range(12, 20)) and p1 == list(range(12)) + list(range(20, 30))


def test_migration_batches_follow_plan_order():
    from esp_kernels.kvcache.migration import _batches
    plan = esp.MigrationPlan([("a", 0, 9, 0, 1), ("b", 0, 9, 2, 3), ("c", 0, 9, 0, 1),
                              ("d", 0, 9, 1, 2), ("e", 0, 9, 0, 1)])
    req = lambda me: [[e.request for e in b] for b in _batches(plan.entries, me)]  # noqa: E731
    # b (2 -> 3) touches neither 0 nor 1: c joins a's batch; d involves 1 and ends it.
    assert req(0) == [["a", "c"], ["e"]]
    assert req(1) == [["a", "c"], ["d"], ["e"]]
    assert req(2) == [["b"], ["d"]]
    assert req(3) == [["b"]]


def batched_migration_rank(world, dst_pages):
    """Instance 0 holds requests r0..r4 (20 tokens each) and s (40 tokens); one plan moves them
    around in batches, one entry too large for its destination, ranges of one request overlap,
    and an entry moves tokens that an earlier batch brought (order across batches)."""
    me = world.world_ranks[world.rank]
    cache = esp.PagedKVCache(2, dst_pages if me == 1 else 64, 4, 1, 8, torch.float32, "cpu")
    full = {r: torch.randn(2 * 2, 40, 8, generator=torch.Generator().manual_seed(i))
            for i, r in enumerate(["r0", "r1", "r2", "r3", "r4", "s"])}
    if me == 0:
        for r, data in full.items():
            n = 40 if r == "s" else 20
            cache.slot_rows()[:, cache.allocate(r, range(n))] = data[:, :n]
    plan = esp.MigrationPlan([("r0", 0, 20, 0, 1), ("s", 0, 40, 0, 1), ("r1", 0, 10, 0, 1),
                              ("r1", 5, 20, 0, 1), ("r2", 0, 20, 0, 2), ("r3", 0, 12, 0, 1),
                              ("r0", 0, 8, 1, 2), ("r4", 0, 20, 0, 1)])
    try:
        stats, err = esp.migrate_kv(cache, plan, world, chunk_bytes=256), None
    except esp.MigrationError as exc:
        stats, err = None, str(exc)
    held = {r: (cache.positions(r), cache.slot_rows()[:, cache.slots(r)]) for r in full}
    return me, held, full, stats, err


def test_migration_batches_with_a_failed_entry():
    # Instance 1 has 14 pages of 4 slots. In allocation order: r0 takes 5, s (10) does not fit,
    # r1 takes 3 + 2 (its second range overlaps the first), r3's 12 tokens take 3; moving r0's
    # first 8 tokens on to instance 2 frees 2 pages, still too few for r4 (5).
    res = run_local(local_group(3), batched_migration_rank, [14] * 3)
    where = {}
    for me, held, full, stats, err in res:
        for r, (pos, data) in held.items():
            assert torch.equal(data, full[r][:, pos]), f"instance {me} holds wrong K/V of {r}"
            for p in pos.tolist():
                assert (r, p) not in where, f"{r}:{p} on two instances"
                where[r, p] = me
        if me in (0, 1):
            assert "'s'" in err and "'r4'" in err and "'r0'" not in err and "'r3'" not in err
        else:
            assert err is None and stats == {"sent": 0, "received": 28}  # r2, then r0's first 8
    n_of = {"r0": 20, "r1": 20, "r2": 20, "r3": 20, "r4": 20, "s": 40}
    assert sorted(where) == sorted((r, p) for r, n in n_of.items() for p in range(n))
    expect = {"s": 0, "r4": 0, "r1": 1, "r2": 2}
    for (r, p), inst in where.items():
        want = {"r0": 2 if p < 8 else 1, "r3": 1 if p < 12 else 0}.get(r, expect.get(r))
        assert inst == want, f"{r}:{p} on {inst}, expected {want}"


def test_refused_entry_raises_only_after_every_other_batch_ran():
    """Instance 0 is full, so the entry into it is refused; raising at once (its only batch) used
    to abort the world under run_local while the batch 0 -> 1 still ran, which then moved or not
    from run to run. The error now comes after a closing round: the other entry always moves."""
    for _ in range(5):
        caches = [esp.PagedKVCache(1, 4, 1, 1, 8, torch.float32) for _ in range(3)]
        caches[0].allocate("r", [0, 1, 2, 3])
        caches[2].allocate("x", [0])
        plan = esp.MigrationPlan([("x", 0, 1, 2, 0), ("r", 0, 4, 0, 1)])
        with pytest.raises(esp.MigrationError, match="'x'") as info:
            run_local(local_group(3), lambda g, c: esp.migrate_kv(c, plan, g, chunk_bytes=1),
                      caches)
        assert all(isinstance(e, esp.MigrationError)
                   for e in getattr(info.value, "peer_errors", {}).values())
        assert caches[1].positions("r").tolist() == [0, 1, 2, 3]
        assert caches[0].num_tokens("r") == 0 and caches[2].num_tokens("x") == 1


def test_overlapping_entries_of_a_refused_batch_are_named_truthfully():
    """The second entry's tokens are the first one's (overlapping ranges of one pair); the first
    is refused: the second is not said to find its source empty (it holds them)."""
    caches = [esp.PagedKVCache(1, 4, 1, 1, 4) for _ in range(2)]
    caches[0].allocate("r", [0, 1])
    caches[1].allocate("z", [0, 1, 2])  # one free page: the first entry does not fit
    plan = esp.MigrationPlan([("r", 0, 2, 0, 1), ("r", 1, 2, 0, 1)])

    def rank(g, c):
        with pytest.raises(esp.MigrationError) as info:
            esp.migrate_kv(c, plan, g)
        return str(info.value)

    source, _ = run_local(local_group(2), rank, caches)
    assert "start=0, end=2, src=0, dst=1): destination could not allocate 2 tokens" in source
    assert "in [1, 2) beyond those of an earlier entry of its batch; nothing moved" in source
    assert caches[0].positions("r").tolist() == [0, 1]


def test_migration_plan_validation():
    with pytest.raises(ValueError, match="itself"):
        esp.MigrationPlan([("a", 0, 4, 1, 1)])
    with pytest.raises(ValueError, match="range"):
        esp.MigrationPlan([("a", 5, 4, 0, 1)])
    cache = esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="not in the group"):
        esp.migrate_kv(cache, esp.MigrationPlan([("a", 0, 4, 0, 9)]), local_group(2)[0])


def test_copy_rows_checks_shapes_on_every_path():
    """The CPU path checks what the kernel checks (it broadcast a src of one outer slice, or of
    one-element rows, before)."""
    src, dst = torch.arange(24.0).reshape(2, 4, 3), torch.zeros(2, 5, 3)
    i2 = torch.tensor([0, -1, 3], dtype=torch.int32)
    copy_rows(src, i2, dst, torch.tensor([4, 0, 1], dtype=torch.int32))
    assert torch.equal(dst[:, 4], src[:, 0]) and torch.equal(dst[:, 1], src[:, 3])
    assert not dst[:, 0].any() and not dst[:, 2:4].any()
    for args, err, match in (
            ((src[:1], None, dst, None), ValueError, "must share their outer slices"),
            ((src[..., :1], None, dst, None), ValueError, "must share their outer slices"),
            ((src.double(), None, dst, None), TypeError, "src is torch.float64 but dst"),
            ((src, i2, dst, i2[:2]), ValueError, "src_idx has 3 entries but dst_idx 2"),
            ((src, i2.reshape(1, 3), dst, None), ValueError, "src_idx must have 1 dims"),
            ((src, torch.tensor(0, dtype=torch.int32), dst, None), ValueError,
             "src_idx must have 1 dims"),
            ((torch.zeros(2, 6, 3), None, dst, None), ValueError,
             "6 rows requested but dst has 5"),
            ((src, None, dst, torch.arange(5, dtype=torch.int32)), ValueError,
             "5 rows requested but src has 4")):
        with pytest.raises(err, match=match):
            copy_rows(*args)


# ---------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("row", [1024, 2048, 24, 3])
def test_copy_rows_kernel_matches_indexing(dtype, row, gen):
    src = torch.randn(6, 300, row, generator=gen).to("cuda", dtype)
    dst = torch.randn(6, 500, row, generator=gen).to("cuda", dtype)
    ref = dst.clone()
    s_idx = torch.randperm(300, generator=gen)[:200].to(torch.int32).cuda()
    d_idx = torch.randperm(500, generator=gen)[:200].to(torch.int32).cuda()
    d_idx[::7] = -1  # skipped rows
    copy_rows(src, s_idx, dst, d_idx)
    copy_rows(src, s_idx, ref, d_idx, backend="torch")
    assert torch.equal(dst, ref)
    out = torch.empty(6, 200, row, dtype=dtype, device="cuda")
    copy_rows(src[:, :, :], s_idx, out, None)
    assert torch.equal(out, src[:, s_idx.long()])


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_retention_and_migration_gpu(page_size):
    P = 4
    groups = local_group(P, "cuda")
    seqlens = [3, 2000, 517]
    plan = esp.RetentionPlan.fill_first(seqlens, {2: 1600 // page_size, 0: 1600 // page_size},
                                        page_size, request_ids=[0, 1, 2])
    caches = [esp.PagedKVCache(2, 4000 // page_size + 8, page_size, 8, 128, torch.bfloat16, "cuda")
              for _ in range(P)]
    batches = [random_varlen_batch(seqlens, 32, 8, 128, dtype=torch.bfloat16, device="cuda",
                                   generator=torch.Generator().manual_seed(40 + l))
               for l in range(2)]

    def body(ring, cache):
        for layer in range(2):
            b = batches[layer]
            q, k, v = (stripe(t, seqlens, P)[ring.rank] for t in (b.q, b.k, b.v))
            esp.ring_prefill(q, k, v, seqlens, ring, retain=(plan, cache, layer))
        mplan = esp.MigrationPlan([(2, 0, 517, 0, 3), (1, 100, 1900, 2, 1)])
        esp.migrate_kv(cache, mplan, ring, chunk_bytes=1 << 20)

    run_local(groups, body, caches)
    owner = {}
    for inst, cache in enumerate(caches):
        for bi in range(3):
            pos = cache.positions(bi)
            for p in pos.tolist():
                assert (bi, p) not in owner
                owner[(bi, p)] = inst
            start = int(batches[0].cu_seqlens[bi])
            for layer in range(2):
                k, v = cache.gather(bi, layer)
                b = batches[layer]
                assert torch.equal(k, b.k[start + pos.cuda()])
                assert torch.equal(v, b.v[start + pos.cuda()])
    assert len(owner) == sum(seqlens)
    assert all(owner[(2, p)] == 3 for p in range(517))
