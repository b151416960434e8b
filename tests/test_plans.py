"""Plans are pure data: RetentionPlan, DecodePlan and MigrationPlan compare by value, round-trip
through to_dict()/from_dict() (and JSON, and pickle), hold no cache or prepared state; unknown
request ids and tokens not held raise errors that name them, with nothing changed."""

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local


def roundtrip(plan):
    d = plan.to_dict()
    back = type(plan).from_dict(json.loads(json.dumps(d)))
    assert back == plan and back.to_dict() == d
    assert pickle.loads(pickle.dumps(plan)) == plan
    return back


@st.composite
def decode_plans(draw):
    insts = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True))
    B = draw(st.integers(0, 6))
    ids = draw(st.lists(st.one_of(st.integers(-5, 10**6), st.text(max_size=6)), min_size=B,
                        max_size=B, unique=True))
    shards = [{i: draw(st.integers(0, 99)) for i in insts if draw(st.booleans())}
              for _ in range(B)]
    append = draw(st.booleans())
    append_to = []
    for s in shards:
        append_to.append(draw(st.sampled_from(insts)) if append and draw(st.booleans())
                         else None)
    return esp.DecodePlan(ids, [draw(st.sampled_from(insts)) for _ in range(B)], shards,
                          append_to=append_to, free_pages={i: draw(st.integers(0, 9))
                                                           for i in insts}, page_size=16)


@settings(max_examples=100, deadline=None)
@given(decode_plans())
def test_decode_plan_is_a_value(plan):
    back = roundtrip(plan)
    assert hash(back) == hash(plan)
    assert all(n > 0 for s in back.shards for n in s.values())  # zero lengths dropped
    with pytest.raises(AttributeError, match="immutable"):
        plan.masters = []
    if plan.requests:
        with pytest.raises(TypeError):
            plan.shards[0][99] = 1  # read-only mappings


def test_decode_plan_value_differences_and_inputs():
    a = esp.DecodePlan(["x", "y"], [0, 1], [{0: 3}, {1: 2, 0: 0}])
    assert a == esp.DecodePlan(["x", "y"], [np.int64(0), 1], [{0: 3}, {1: 2}])
    assert a != esp.DecodePlan(["x", "y"], [0, 0], [{0: 3}, {1: 2}])
    assert len({a, esp.DecodePlan(["x", "y"], [0, 1], [{0: 3}, {1: 2}])}) == 1
    assert a.holders(1) == [1] and a.shards[1] == {1: 2}
    ids = esp.DecodePlan([np.int64(4), torch.tensor(5)], [0, 0], [{0: 1}, {0: 1}]).requests
    assert ids == (4, 5) and all(type(i) is int for i in ids)
    rids = esp.RetentionPlan([1], [{0: [0]}], request_ids=[np.int32(9)]).to_dict()["request_ids"]
    assert rids == [9]
    with pytest.raises(TypeError, match="master of request 'x' must be an integer"):
        esp.DecodePlan(["x"], [0.5], [{0: 1}])
    with pytest.raises(ValueError, match="negative shard length"):
        esp.DecodePlan(["x"], [0], [{0: -1}])
    b = esp.DecodePlan(["x"], [0], [{0: 3}], append_to=[1])  # a first token on instance 1
    assert b.kv_shards(0) == {0: 3, 1: 1} and b.holders(0) == [0, 1] and b.held_by(1) == [0]
    with pytest.raises(TypeError, match="int or a str"):
        esp.DecodePlan([("tuple", "id")], [0], [{0: 1}]).to_dict()
    with pytest.raises(ValueError, match="not a DecodePlan"):
        esp.DecodePlan.from_dict({"kind": "RetentionPlan"})


def test_decode_plan_holds_no_prepared_state():
    g = local_group(1)[0]
    cache = esp.PagedKVCache(2, 8, 4, 2, 8, torch.float32, "cpu")
    cache.allocate("r", range(5))
    plan = esp.DecodePlan.build(g, cache, ["r"], [0])
    before = plan.to_dict()
    esp.distributed_decode(torch.randn(1, 4, 8), cache, plan, g, layer=1)
    assert not hasattr(plan, "__dict__") and plan.to_dict() == before
    up = plan.scale_up(g, cache)
    assert up.append_to == (0,) and up.shards[0] == {0: 5} and up.kv_shards(0) == {0: 6}
    assert up.total_len(0) == 6 and up.appended_position(0) == 5 and plan.append_to == (None,)
    # the slot lives in the cache; reserving again is a no-op that returns it
    assert cache.num_tokens("r") == 6
    assert up.reserve(cache, 0) == {"r": cache.last_token("r")[1]}
    assert cache.num_tokens("r") == 6
    roundtrip(up)
    # scale_up on the plan it was already called on: the second plan would have attended over
    # the first one's slot, never written; the stale plan is refused, nothing allocated
    with pytest.raises(ValueError, match="the caches hold 6 tokens of request 'r' but this plan "
                                         "accounts for 5"):
        plan.scale_up(g, cache)
    assert cache.num_tokens("r") == 6
    assert up.scale_up(g, cache).appended_position(0) == 6


def test_decode_plan_build_names_unknown_requests_and_changes_nothing():
    groups = local_group(2)
    caches = [esp.PagedKVCache(1, 8, 4, 1, 8, torch.float32, "cpu") for _ in range(2)]
    caches[0].allocate("known", range(3))
    before = [c.stats() for c in caches]

    def body(g, cache):
        with pytest.raises(ValueError, match=r"requests \['ghost', 7\]"):
            esp.DecodePlan.build(g, cache, ["known", "ghost", 7], [0, 1, 0])
        with pytest.raises(ValueError, match=r"masters \[5\] are not in the group"):
            esp.DecodePlan.build(g, cache, ["known"], [5])
        return esp.DecodePlan.build(g, cache, ["known"], [1])

    plans = run_local(groups, body, caches)
    assert [c.stats() for c in caches] == before
    assert plans[0] == plans[1] and plans[0].shards == ({0: 3},)


@st.composite
def retention_plans(draw):
    seqlens = draw(st.lists(st.integers(0, 40), min_size=0, max_size=5))
    insts = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True))
    assignment = []
    for L in seqlens:
        owner = [draw(st.sampled_from(insts)) for _ in range(L)]
        amap = {}
        for p, i in enumerate(owner):
            amap.setdefault(i, []).append(p)
        if draw(st.booleans()):  # any container and order
            amap = {i: torch.tensor(p[::-1]) for i, p in amap.items()}
        assignment.append(amap)
    return esp.RetentionPlan(seqlens, assignment,
                             request_ids=[f"q{b}" for b in range(len(seqlens))]), assignment


@settings(max_examples=100, deadline=None)
@given(retention_plans())
def test_retention_plan_is_a_value(case):
    plan, assignment = case
    back = roundtrip(plan)
    assert hash(back) == hash(plan)
    for b, amap in enumerate(assignment):
        for i, pos in amap.items():
            want = sorted(pos.tolist() if isinstance(pos, torch.Tensor) else pos)
            assert back.positions(b, i).tolist() == want
            assert sum(e - s for s, e in back.ranges(b, i)) == len(want)
    with pytest.raises(AttributeError, match="immutable"):
        plan.seqlens = ()


def test_retention_plan_default_ids_never_collide():
    a = esp.RetentionPlan.fill_first([5, 3], {0: 4}, 4)
    b = esp.RetentionPlan.fill_first([5, 3], {0: 4}, 4)
    assert len(set(a.request_ids) | set(b.request_ids)) == 4 and a != b
    assert roundtrip(a).request_ids == a.request_ids
    # the next batch reserves next to the first in one cache
    cache = esp.PagedKVCache(1, 8, 4, 1, 8, torch.float32, "cpu")
    a.reserve(cache, 0)
    b.reserve(cache, 0)
    assert cache.stats().used_tokens == 16
    # an engine's own ids that are still in the cache: named, nothing changed
    c = esp.RetentionPlan.fill_first([2, 3], {0: 4}, 4, request_ids=[a.request_ids[0], "new"])
    before = cache.stats()
    with pytest.raises(ValueError, match=a.request_ids[0]):
        c.reserve(cache, 0)
    assert cache.stats() == before and cache.num_tokens("new") == 0
    # reserving the same plan again returns the same slots (the reservation is in the cache)
    s1 = {r: s.tolist() for r, s in a.reserve(cache, 0).items()}
    assert s1 == {r: cache.slots(r).tolist() for r in a.request_ids}


def test_retention_plan_rejects_bad_positions():
    with pytest.raises(TypeError, match="integers"):
        esp.RetentionPlan([3], [{0: [0.0, 1.5, 2.9]}])
    with pytest.raises(ValueError, match="more than once"):
        esp.RetentionPlan([3], [{0: [0, 1, 1, 2]}])
    with pytest.raises(ValueError, match="outside"):
        esp.RetentionPlan([3], [{0: [0, 1, 2, 3]}])
    with pytest.raises(ValueError, match="not a RetentionPlan"):
        esp.RetentionPlan.from_dict({"kind": "DecodePlan"})


def test_migration_plan_is_a_value():
    p = esp.MigrationPlan([("a", 0, 9, 0, 1), (7, np.int64(3), 5, 2, 0)])
    back = roundtrip(p)
    assert back.entries[1] == esp.kvcache.MigrationEntry(7, 3, 5, 2, 0)
    assert p != esp.MigrationPlan([("a", 0, 9, 0, 1)])
    with pytest.raises(TypeError, match="start must be an integer, got float 0.5"):
        esp.MigrationPlan([("a", 0.5, 4, 0, 1)])


def unknown_migration_rank(world, entries):
    """Instance r holds 'x' positions r, r + n, ...; the plan names an unknown request or a
    range the source holds none of: every instance raises naming it, nothing moves."""
    n = world.size
    me = world.world_ranks[world.rank]
    cache = esp.PagedKVCache(1, 64, 4, 1, 8, torch.float32, "cpu")
    cache.slot_rows()[:, cache.allocate("x", range(me, 40, n))] = float(me)
    before = (cache.stats(), cache.positions("x"))
    with pytest.raises(esp.MigrationError) as err:
        esp.migrate_kv(cache, esp.MigrationPlan(entries), world)
    assert cache.stats() == before[0] and torch.equal(cache.positions("x"), before[1])
    return str(err.value)


@pytest.mark.parametrize("bad,named", [(("ghost", 0, 9, 1, 0), "'ghost'"),
                                       (("x", 100, 200, 1, 0), "[100, 200)")])
def test_migration_of_what_the_source_does_not_hold_raises_everywhere(bad, named):
    entries = [("x", 0, 20, 0, 1), bad]
    errs = run_local(local_group(3), unknown_migration_rank, [entries] * 3)
    for e in errs:
        assert "nothing was moved" in e and named in e and "source 1" in e
