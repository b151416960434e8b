"""Integer-like inputs: Python ints, numpy integers and 0-d integer tensors are accepted wherever an
int is; floats (even 2.0) and bools are rejected with an error naming the argument, never
truncated. cu_seqlens may be lists. Nothing defaults to CUDA."""

import math

import numpy as np
import pytest
import torch

import esp_kernels as esp
from esp_kernels._checks import as_int, as_int_tensor
from esp_kernels.comm import local_group, run_local
from esp_kernels.testing import cu_seqlens, stripe, unstripe

INT_LIKES = [4, np.int64(4), np.int32(4), np.uint8(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)]
NOT_INTS = [4.0, np.float32(4), True, np.bool_(True), torch.tensor(4.0), torch.tensor([4]),
            torch.tensor(True), "4", None]


@pytest.mark.parametrize("value", INT_LIKES, ids=repr)
def test_as_int_accepts_integer_likes(value):
    out = as_int(value, "n")
    assert out == 4 and type(out) is int


@pytest.mark.parametrize("value", NOT_INTS, ids=repr)
def test_as_int_rejects_the_rest_naming_the_argument(value):
    with pytest.raises(TypeError, match="num_pages must be an integer"):
        as_int(value, "num_pages")


def test_as_int_minimum():
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        as_int(np.int64(0), "page_size", minimum=1)


def test_as_int_tensor():
    for seq in ([0, np.int64(1), torch.tensor(2)], np.arange(3), torch.arange(3, dtype=torch.int32),
                range(3), (0, 1, 2)):
        assert as_int_tensor(seq, "p").tolist() == [0, 1, 2]
    assert as_int_tensor([], "p").dtype == torch.int64
    with pytest.raises(TypeError, match=r"positions\[1\] must be an integer, got float 1.5"):
        as_int_tensor([0, 1.5, 2], "positions")
    with pytest.raises(TypeError, match=r"positions\[0\] must be an integer, got float 0.0"):
        as_int_tensor([0.0, 1.0, 2.0], "positions")  # whole-valued floats too
    for bad in (np.array([0.5]), torch.tensor([1.0]), [True, False]):
        with pytest.raises(TypeError, match="positions"):
            as_int_tensor(bad, "positions")
    with pytest.raises(TypeError, match="positions must be a sequence of integers, got int 5"):
        as_int_tensor(5, "positions")
    with pytest.raises(TypeError, match="positions of request 'b' must be a sequence"):
        esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32).allocate("b", 5)


def test_cache_accepts_integer_likes_and_defaults_to_the_cpu():
    cache = esp.PagedKVCache(np.int64(2), torch.tensor(8), np.int32(4), 2, 16, torch.float32)
    assert cache.device == torch.device("cpu") and cache.kv.device.type == "cpu"
    assert (cache.num_layers, cache.num_pages, cache.page_size) == (2, 8, 4)
    assert all(type(x) is int for x in (cache.num_layers, cache.num_pages, cache.page_size))
    k, _ = cache.layer(np.int64(1))
    assert k.shape == (8, 4, 2, 16)
    assert cache.slot_rows(torch.tensor(0)).shape == (2, 32, 32)
    with pytest.raises(TypeError, match="num_pages must be an integer, got float 8.0"):
        esp.PagedKVCache(1, 8.0, 4, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="layer must be an integer"):
        cache.layer(1.0)


def test_allocate_rejects_float_positions_and_changes_nothing():
    cache = esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32)
    before = cache.stats()
    for bad in ([0.0, 1.5, 2.9], np.array([0.0, 1.0]), torch.tensor([0.0, 1.0])):
        with pytest.raises(TypeError, match="positions of request 'r'"):
            cache.allocate("r", bad)
        assert cache.stats() == before and cache.requests() == []
    slots = cache.allocate("r", np.arange(3, dtype=np.int32))
    assert slots.tolist() == [0, 1, 2] and cache.positions("r").tolist() == [0, 1, 2]
    cache.allocate("r", [np.int64(3), torch.tensor(4)])
    assert cache.positions("r").tolist() == [0, 1, 2, 3, 4]


def test_reference_takes_cu_seqlens_as_lists(gen):
    q = torch.randn(7, 2, 8, generator=gen)
    k = torch.randn(9, 2, 8, generator=gen)
    v = torch.randn(9, 2, 8, generator=gen)
    ref = esp.reference.attention(q, k, v, cu_seqlens([3, 4]), cu_seqlens([4, 5]))
    for cq, ck in (([0, 3, 7], [0, 4, 9]), (np.array([0, 3, 7]), (0, 4, 9)),
                   ([0, np.int64(3), 7], [0, 4, torch.tensor(9)])):
        out = esp.reference.attention(q, k, v, cq, ck)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    with pytest.raises(TypeError, match=r"cu_seqlens_q\[1\] must be an integer"):
        esp.reference.attention(q, k, v, [0, 3.0, 7], [0, 4, 9])
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        esp.reference.attention(q, k, v, [0, 3, 7], [0, 4, 8])
    out = esp.reference.attention(q, k, v, [0, 7], [0, 9], q_positions=list(range(2, 9)),
                                  k_positions=np.arange(9))
    assert torch.isfinite(out[1]).all()
    with pytest.raises(TypeError, match="q_positions"):
        esp.reference.attention(q, k, v, [0, 7], [0, 9], q_positions=[0.5] * 7)


def test_ring_prefill_seqlens_integer_likes(gen):
    lens, P = [5, 3], 2
    q, k, v = (torch.randn(8, 2, 8, generator=gen) for _ in range(3))
    groups = local_group(P)
    parts = [stripe(t, lens, P) for t in (q, k, v)]
    for seqlens in ([np.int64(5), torch.tensor(3)], np.array(lens), torch.tensor(lens)):
        res = run_local(groups, lambda g, a, b, c: esp.ring_prefill(a, b, c, seqlens, g), *parts)
        o = unstripe([r[0] for r in res], lens)
        ref, _ = esp.reference.attention(q, k, v, cu_seqlens(lens), cu_seqlens(lens))
        torch.testing.assert_close(o, ref)
    with pytest.raises(TypeError, match=r"seqlens\[0\] must be an integer, got float 5.0"):
        esp.ring_prefill(*(p[0] for p in parts), [5.0, 3], groups[0])


def test_decode_partial_integer_likes_and_tensor_arguments(gen):
    cache = esp.PagedKVCache(1, 4, 4, 2, 8, torch.float32)
    cache.allocate("r", range(6))
    k, v = cache.layer(0)
    k.normal_(generator=gen)
    v.normal_(generator=gen)
    bt, lens = cache.block_table(["r"])
    q = torch.randn(1, 4, 8, generator=gen)
    ref = esp.decode_partial(q, k, v, bt, lens)
    out = esp.decode_partial(q, k, v, bt, lens, num_splits=np.int64(2), max_len=torch.tensor(6))
    assert torch.equal(out[0], ref[0])
    with pytest.raises(TypeError, match="num_splits must be an integer"):
        esp.decode_partial(q, k, v, bt, lens, num_splits=2.0)
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        esp.decode_partial(q, k, v, bt.tolist(), lens)
    assert math.isfinite(float(out[1][0, 0]))


def test_plans_groups_and_striping_take_integer_likes():
    plan = esp.MigrationPlan([("a", np.int64(0), torch.tensor(4), np.int32(0), 1)])
    e = plan.entries[0]
    assert (e.start, e.end, e.src, e.dst) == (0, 4, 0, 1)
    assert all(type(x) is int for x in (e.start, e.end, e.src, e.dst))
    with pytest.raises(TypeError, match="end must be an integer, got float 4.5"):
        esp.MigrationPlan([("a", 0, 4.5, 0, 1)])
    with pytest.raises(TypeError, match="destination of request 'a' must be an integer"):
        esp.MigrationPlan([("a", 0, 4, 0, 1.0)])
    groups = local_group(np.int64(2))
    assert len(groups) == 2
    with pytest.raises(TypeError, match="n must be an integer"):
        local_group(2.0)
    sub = groups[0].subgroup([np.int64(1), np.int64(0)])
    assert sub.rank == 1
    assert esp.striping.stripe_lengths([5, 3], np.int64(2), torch.tensor(1)) == [2, 1]
    with pytest.raises(TypeError, match="world must be an integer, got float 2.5"):
        esp.striping.stripe_lengths([5], 2.5, 0)


def test_retention_plans_take_integer_likes_and_refuse_the_rest():
    """RetentionPlan truncated floats (seqlens 2.7 -> 2, instance 0.9 -> 0) and took bools."""
    plan = esp.RetentionPlan([np.int64(2)], [{np.int32(1): [0, 1]}], request_ids=["a"])
    assert plan.seqlens == (2,) and plan.instances == [1]
    for args, match in ((([2.7], [{0: [0, 1]}]), r"seqlens\[0\] must be an integer"),
                        (([True], [{0: [0]}]), r"seqlens\[0\] must be an integer, got the bool"),
                        (([2], [{0.9: [0, 1]}]), "instance must be an integer"),
                        (([-1], [{}]), r"seqlens\[0\] must be >= 0")):
        with pytest.raises((TypeError, ValueError), match=match):
            esp.RetentionPlan(*args)
    d = plan.to_dict()
    for key, value, match in (("seqlens", [2.5], r"seqlens\[0\] must be an integer"),
                              ("assignment", [[[1, [[0, 2.0]]]]], "range end must be")):
        with pytest.raises(TypeError, match=match):
            esp.RetentionPlan.from_dict({**d, key: value})
    with pytest.raises(ValueError, match="missing key 'assignment'"):
        esp.RetentionPlan.from_dict({k: v for k, v in d.items() if k != "assignment"})
    for policy in (esp.RetentionPlan.fill_first, esp.RetentionPlan.balanced):
        with pytest.raises(TypeError, match=r"seqlens\[0\] must be an integer"):
            policy([4.0], {0: 3}, 2)
        with pytest.raises(ValueError, match="page_size must be >= 1"):
            policy([4], {0: 3}, 0)
        with pytest.raises(ValueError, match=r"free_pages\[0\] must be >= 0"):
            policy([4], {0: -3, 1: 9}, 2)
        assert policy([np.int64(4)], {np.int64(0): torch.tensor(3)}, 2).seqlens == (4,)


def test_plans_refuse_negative_instances_and_incomplete_dicts():
    for kw, match in ((dict(masters=[-1]), "master of request 'r' must be >= 0"),
                      (dict(shards=[{-2: 3}]), "instance of request 'r' must be >= 0"),
                      (dict(append_to=[-1]), "append_to of request 'r' must be >= 0"),
                      (dict(page_size=0), "page_size must be >= 1"),
                      (dict(free_pages={0: -1}), "free pages of instance 0 must be >= 0")):
        args = dict(requests=["r"], masters=[0], shards=[{0: 3}]) | kw
        with pytest.raises(ValueError, match=match):
            esp.DecodePlan(**args)
    d = esp.DecodePlan(["r"], [0], [{0: 3}], page_size=4).to_dict()
    del d["shards"]
    with pytest.raises(ValueError, match=r"DecodePlan dict is missing keys \['shards'\]"):
        esp.DecodePlan.from_dict(d)
    plan = esp.MigrationPlan([(np.int64(3), 0, 2, 0, 1)])  # a numpy id travels as an int
    assert plan.to_dict() == esp.MigrationPlan([(3, 0, 2, 0, 1)]).to_dict()
    with pytest.raises(ValueError, match="source of request 'a' must be >= 0"):
        esp.MigrationPlan([("a", 0, 2, -1, 1)])
    with pytest.raises(TypeError, match="requests must be a mapping"):
        esp.PagedKVCache(1, 4, 2, 1, 4).allocate_many([("a", [0])])


def test_ring_step_op_checks_and_converts_its_arguments(gen):
    from esp_kernels.prefill.step import ring_step

    q, k, v = (torch.randn(7, 2, 8, generator=gen) for _ in range(3))
    o, lse = torch.empty(7, 2, 8), torch.empty(7, 2)
    ring_step(q, k, v, [0, 3, 7], np.array([0, 3, 7], np.int32), np.int64(4), o, lse,
              accumulate=False)
    ref = esp.reference.attention(q, k, v, [0, 3, 7], [0, 3, 7])
    torch.testing.assert_close(o, ref[0])
    torch.testing.assert_close(lse, ref[1])
    with pytest.raises(TypeError, match="o_state must have dtype in"):
        ring_step(q, k, v, [0, 7], [0, 7], 7, o.half(), lse)
    with pytest.raises(ValueError, match="o_state .* must be q's"):
        ring_step(q, k, v, [0, 7], [0, 7], 7, o[:6], lse)
    with pytest.raises(TypeError, match="max_q_len must be an integer"):
        ring_step(q, k, v, [0, 7], [0, 7], 7.0, o, lse)
    with pytest.raises(ValueError, match=r"cu_q \(2,\) and cu_k \(3,\)"):
        ring_step(q, k, v, [0, 7], [0, 3, 7], 7, o, lse)
