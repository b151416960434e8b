"""Multi-master distributed decode vs the reference over the union of the shards: gloo processes,
virtual ranks, scale-up appends, zero-token shards, masters without KV; the CUDA partial kernel,
CUDA-graph replay and the per-layer host overhead on GPU."""

import gc
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local, run_steps
from esp_kernels.decode.partial import decode_partial
from esp_kernels.testing import assert_close, cu_seqlens, poison_
from dist_utils import run_gloo

REQUESTS = ["a", "b", "c", "d", "e"]


def scenario(n, seed, max_len=300):
    """Lengths, masters and a random token placement (some shards empty, 'c' of one token, 'd'
    of two, 'e' mastered by an instance that holds none of it, so its first appended token
    starts a shard there)."""
    g = torch.Generator().manual_seed(seed)
    lens = {"a": max_len, "b": 77, "c": 1, "d": 2, "e": 40}
    masters = [0, (1 % n), (2 % n), 0, n - 1]
    place = {r: torch.randint(0, n, (lens[r],), generator=g) for r in REQUESTS}
    if n > 1:
        place["e"] = torch.randint(0, n - 1, (lens["e"],), generator=g)  # master n-1 holds none
    return lens, masters, place


LAYERS = 2


def scenario_tensors(lens, seed, steps, hq, hkv, d):
    """Every request's full K/V per layer (its shards plus the tokens appended by `steps`
    decode steps) and the queries of every step, layer and request."""
    g = torch.Generator().manual_seed(seed + 1)
    full = {r: [(torch.randn(lens[r] + steps, hkv, d, generator=g),
                 torch.randn(lens[r] + steps, hkv, d, generator=g)) for _ in range(LAYERS)]
            for r in REQUESTS}
    qs = torch.randn(steps, LAYERS, len(REQUESTS), hq, d, generator=g)
    return full, qs


def rank_cache(world, n, seed, hkv, d, page_size, steps, dtype, device):
    """This instance's cache filled with its shards of the scenario, and the decode plan."""
    lens, masters, place = scenario(n, seed)
    me = world.world_ranks[world.rank]
    full, _ = scenario_tensors(lens, seed, steps, 1, hkv, d)
    cache = esp.PagedKVCache(LAYERS, 600 // page_size + 16, page_size, hkv, d, dtype, device)
    for r in REQUESTS:
        pos = torch.nonzero(place[r] == me).flatten()
        if pos.numel():
            slots = cache.allocate(r, pos).to(device)
            for layer in range(LAYERS):
                rows = cache.slot_rows(layer)
                rows[0, slots] = full[r][layer][0][pos].reshape(pos.numel(), -1).to(device, dtype)
                rows[1, slots] = full[r][layer][1][pos].reshape(pos.numel(), -1).to(device, dtype)
    return cache, esp.DecodePlan.build(world, cache, REQUESTS, masters)


def layer_inputs(mine, n, seed, hq, hkv, d, steps, step, layer, dtype, device):
    """q, k_new, v_new of the requests `mine` at (step, layer)."""
    lens, _, _ = scenario(n, seed)
    full, qs = scenario_tensors(lens, seed, steps, hq, hkv, d)
    pos = [lens[REQUESTS[i]] + step for i in mine]
    kv = [torch.stack([full[REQUESTS[i]][layer][j][p] for i, p in zip(mine, pos)]) if mine
          else torch.empty(0, hkv, d) for j in (0, 1)]
    return [t.to(device, dtype) for t in (qs[step, layer, mine], *kv)]


def decode_rank(world, n, seed, hq, hkv, d, page_size, steps, dtype=torch.float32, device="cpu"):
    cache, plan = rank_cache(world, n, seed, hkv, d, page_size, steps, dtype, device)
    me = world.world_ranks[world.rank]
    outs = []
    for step in range(steps):
        plan = plan.scale_up(world, cache)
        mine = plan.mastered_by(me)
        for layer in range(LAYERS):
            q, kn, vn = layer_inputs(mine, n, seed, hq, hkv, d, steps, step, layer, dtype, device)
            out = esp.distributed_decode(q, cache, plan, world, layer=layer, k_new=kn, v_new=vn)
            outs.append((step, layer, mine, out.cpu()))
    return outs


def decode_all_steps(n, seed, hq, hkv, d, page_size, steps, dtype=torch.float32, device="cpu",
                     with_out=False):
    """decode_rank's work on n virtual ranks, every layer run by `run_steps` in this thread
    (plans are built and scaled up with threads: that is host-blocking metadata exchange);
    with_out: each rank passes a NaN-filled `out` that the layer must fill and return."""
    groups = local_group(n, device)
    caches, plans = zip(*run_local(groups, rank_cache, *[[a] * n for a in
                                                         (n, seed, hkv, d, page_size, steps,
                                                          dtype, device)]))
    outs = [[] for _ in range(n)]
    for step in range(steps):
        plans = run_local(groups, lambda g, c, p: p.scale_up(g, c), caches, plans)
        mines = [plans[r].mastered_by(r) for r in range(n)]
        for layer in range(LAYERS):
            ins = [layer_inputs(m, n, seed, hq, hkv, d, steps, step, layer, dtype, device)
                   for m in mines]
            outs_in = [torch.full_like(q, math.nan) if with_out else None for q, _, _ in ins]
            res = run_steps(groups, [esp.distributed_decode_steps(
                q, caches[r], plans[r], groups[r], layer=layer, k_new=kn, v_new=vn,
                out=outs_in[r]) for r, (q, kn, vn) in enumerate(ins)])
            for r in range(n):
                assert not with_out or res[r] is outs_in[r]
                outs[r].append((step, layer, mines[r], res[r].cpu()))
    return outs


def check_decode(per_rank, n, seed, hq, hkv, d, steps, dtype=torch.float32):
    lens, _, _ = scenario(n, seed)
    full, qs = scenario_tensors(lens, seed, steps, hq, hkv, d)
    checked = 0
    for outs in per_rank:
        for step, layer, mine, out in outs:
            for row, i in enumerate(mine):
                r = REQUESTS[i]
                n_kv = lens[r] + step + 1
                k, v = (t[:n_kv].to(dtype).float() for t in full[r][layer])
                ref, _ = esp.reference.attention(qs[step, layer, i:i + 1].to(dtype).float(), k, v,
                                                 cu_seqlens([1]), cu_seqlens([n_kv]), causal=False)
                assert_close(out[row:row + 1].float(), ref, dtype, name=f"{r} step {step}")
                checked += 1
    assert checked == steps * 2 * len(REQUESTS)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_virtual_ranks(n, hq, hkv, d, page_size):
    args = (n, 100 + n, hq, hkv, d, page_size, 2)
    res = run_local(local_group(n), decode_rank, *[[a] * n for a in args])
    check_decode(res, n, 100 + n, hq, hkv, d, 2)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("hq,hkv,d,page_size", [(4, 4, 64, 1), (8, 1, 128, 16)])
@pytest.mark.parametrize("with_out", [False, True])
def test_decode_run_steps_one_thread(n, hq, hkv, d, page_size, with_out):
    """The step-generator form of the layer on every virtual rank from one thread."""
    res = decode_all_steps(n, 200 + n, hq, hkv, d, page_size, 2, with_out=with_out)
    check_decode(res, n, 200 + n, hq, hkv, d, 2)


def test_decode_instance_mastering_nothing_while_appending():
    """Instance 1 masters no request but holds KV and receives the appended token."""
    g = local_group(2)
    caches = [esp.PagedKVCache(1, 8, 4, 2, 16, torch.float32, "cpu") for _ in range(2)]
    full = torch.randn(2, 9, 2 * 16)
    for inst, pos in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])):
        slots = caches[inst].allocate("r", pos)
        caches[inst].slot_rows(0)[:, slots] = full[:, pos]
    caches[0].allocate("filler", range(7 * 4))  # instance 0 has no free slot left: 1 stores
    q = torch.randn(1, 4, 16)

    def body(group, cache):
        plan = esp.DecodePlan.build(group, cache, ["r"], [0]).scale_up(group, cache)
        assert plan.append_to == (1,)
        mine = plan.mastered_by(group.rank)
        kn = full[0, 8:9].view(1, 2, 16)[: len(mine)]
        vn = full[1, 8:9].view(1, 2, 16)[: len(mine)]
        return esp.distributed_decode(q[: len(mine)], cache, plan, group, k_new=kn, v_new=vn)

    out = run_local(g, body, caches)[0]
    ref, _ = esp.reference.attention(q, full[0].view(9, 2, 16), full[1].view(9, 2, 16),
                                     cu_seqlens([1]), cu_seqlens([9]), causal=False)
    assert_close(out, ref, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_decode_gloo(n):
    res = run_gloo(n, decode_rank, n, 300 + n, 8, 2, 64, 16, 2)
    check_decode(res, n, 300 + n, 8, 2, 64, 2)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_decode_random_placements_virtual_ranks(data):
    """Random batches, token placements (any split, instances holding nothing) and masters; one
    decode layer before and one after a scale-up step, all ranks from one thread; every output
    against the reference over the request's tokens."""
    n = data.draw(st.integers(1, 4), "instances")
    lens = data.draw(st.lists(st.integers(1, 24), min_size=1, max_size=6), "lengths")
    masters = data.draw(st.lists(st.integers(0, n - 1), min_size=len(lens), max_size=len(lens)),
                        "masters")
    seed = data.draw(st.integers(0, 2**16), "seed")
    g = torch.Generator().manual_seed(seed)
    hkv, hq, d = 2, 4, 8
    full = [torch.randn(2, L + 1, hkv * d, generator=g) for L in lens]  # K/V incl. the new one
    groups = local_group(n)
    caches = [esp.PagedKVCache(1, 64, 4, hkv, d, torch.float32, "cpu") for _ in range(n)]
    for b, L in enumerate(lens):
        owner = torch.randint(0, n, (L,), generator=g)
        for inst in range(n):
            pos = torch.nonzero(owner == inst).flatten()
            if pos.numel():
                caches[inst].slot_rows(0)[:, caches[inst].allocate(b, pos)] = full[b][:, pos]
    rids = list(range(len(lens)))
    plans = run_local(groups, lambda gr, c: esp.DecodePlan.build(gr, c, rids, masters), caches)
    q = torch.randn(len(lens), hq, d, generator=g)
    for step in range(2):
        if step:
            plans = run_local(groups, lambda gr, c, p: p.scale_up(gr, c), caches, plans)
        mine = [plans[r].mastered_by(r) for r in range(n)]

        def appended(m, j):  # K (j = 0) or V (j = 1) of the new token of each request in m
            return (torch.stack([full[b][j, lens[b]].view(hkv, d) for b in m]) if m else
                    torch.empty(0, hkv, d))
        new = [dict(k_new=appended(m, 0), v_new=appended(m, 1)) if step else {} for m in mine]
        outs = run_steps(groups, [esp.distributed_decode_steps(q[mine[r]], caches[r], plans[r],
                                                               groups[r], **new[r])
                                  for r in range(n)])
        for r in range(n):
            for row, b in enumerate(mine[r]):
                n_kv = lens[b] + step
                k, v = (full[b][j, :n_kv].view(n_kv, hkv, d) for j in (0, 1))
                ref, _ = esp.reference.attention(q[b:b + 1], k, v, cu_seqlens([1]),
                                                 cu_seqlens([n_kv]), causal=False)
                assert_close(outs[r][row:row + 1], ref, torch.float32, name=f"request {b}")


def test_decode_with_centrally_decided_append_targets():
    """A plan made elsewhere (a scheduler: shards before the step, append targets), reserved by
    each instance on its own (`allocate_appends`, not collective), then decoded: request "a"'s
    new token starts a shard on instance 1, "b"'s goes to its master."""
    groups = local_group(2)
    full = {r: torch.randn(2, 7, 2 * 8, generator=torch.Generator().manual_seed(i))
            for i, r in enumerate("ab")}
    place = {"a": {0: [0, 1, 2, 3, 4, 5]}, "b": {0: [0, 1], 1: [2, 3, 4, 5]}}
    caches = [esp.PagedKVCache(1, 16, 2, 2, 8, torch.float32, "cpu") for _ in range(2)]
    for r, where in place.items():
        for inst, pos in where.items():
            caches[inst].slot_rows(0)[:, caches[inst].allocate(r, pos)] = full[r][:, pos]
    plan = esp.DecodePlan(["a", "b"], [0, 1], [{0: 6}, {0: 2, 1: 4}], append_to=[1, 1])
    plan = esp.DecodePlan.from_dict(plan.to_dict())  # as sent to each instance
    q = torch.randn(2, 4, 8)

    def body(g, cache):
        me = g.world_ranks[g.rank]
        p = plan.allocate_appends(cache, me)
        mine = p.mastered_by(me)
        kv = [full[p.requests[i]][:, 6].view(2, 2, 8) for i in mine]
        kn = torch.stack([t[0] for t in kv]) if kv else torch.empty(0, 2, 8)
        vn = torch.stack([t[1] for t in kv]) if kv else torch.empty(0, 2, 8)
        return mine, esp.distributed_decode(q[mine], cache, p, g, k_new=kn, v_new=vn)

    res = run_local(groups, body, caches)
    assert caches[1].positions("a").tolist() == [6] and caches[1].num_tokens("b") == 5
    for mine, out in res:
        for row, i in enumerate(mine):
            k, v = (full["ab"[i]][j].view(7, 2, 8) for j in (0, 1))
            ref, _ = esp.reference.attention(q[i:i + 1], k, v, cu_seqlens([1]), cu_seqlens([7]),
                                             causal=False)
            assert_close(out[row:row + 1], ref, torch.float32)


def test_plan_and_bad_input():
    g = local_group(2)
    cache = esp.PagedKVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    plan = esp.DecodePlan(["x"], [0], [{1: 3}])
    assert plan.holders(0) == [1] and plan.mastered_by(0) == [0] and plan.held_by(1) == [0]
    with pytest.raises(ValueError, match="distinct"):
        esp.DecodePlan(["x", "x"], [0, 0], [{}, {}])
    with pytest.raises(ValueError, match="rows but this instance masters 1"):
        esp.distributed_decode(torch.randn(2, 2, 8), cache, plan, g[0])
    with pytest.raises(ValueError, match="not in the group"):
        esp.distributed_decode(torch.randn(1, 2, 8), cache, esp.DecodePlan(["x"], [0], [{7: 1}]),
                               g[0])
    with pytest.raises(ValueError, match="plan appends nothing"):
        esp.distributed_decode(torch.randn(1, 2, 8), cache, esp.DecodePlan(["x"], [0], [{}]),
                               g[0], k_new=torch.randn(1, 2, 8), v_new=torch.randn(1, 2, 8))
    with pytest.raises(TypeError, match="DecodePlan"):
        esp.distributed_decode(torch.randn(1, 2, 8), cache, None, g[0])
    one = esp.DecodePlan(["x"], [0], [{}])
    for bad in (torch.empty(2, 2, 8), torch.empty(1, 2, 8, dtype=torch.float64),
                torch.empty(1, 8, 2).transpose(1, 2)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            esp.distributed_decode(torch.randn(1, 2, 8), cache, one, g[0], out=bad)


def test_zero_length_shard_gives_empty_state():
    q = torch.randn(3, 4, 32)
    cache = esp.PagedKVCache(1, 4, 4, 2, 32, torch.float32, "cpu")
    cache.allocate("r", range(5))
    k, v = cache.layer(0)
    k.normal_()
    v.normal_()
    bt, lens = cache.block_table(["none", "r", "none2"])
    o, lse = decode_partial(q, k, v, bt, lens)
    assert torch.all(o[0] == 0) and torch.all(lse[0] == -math.inf)
    assert torch.all(o[2] == 0) and torch.all(lse[2] == -math.inf)
    assert torch.isfinite(lse[1]).all()


def test_decode_partial_checks_what_it_reads_and_writes():
    """Outputs, scale and backend are checked on every path; on the CPU also the pages and
    lengths it reads (a negative page read the pool's last pages before, a long kv_lens or a
    page past the pool gave a bare IndexError)."""
    q = torch.randn(2, 4, 8)
    k, v = torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    bt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    o, lse = decode_partial(q, k, v, bt, lens)
    for kw, err, match in (
            (dict(o=torch.empty(2, 4, 8, dtype=torch.int32)), TypeError, "o must have dtype"),
            (dict(lse=torch.empty(2, 4, dtype=torch.int64)), TypeError, "lse must have dtype"),
            (dict(o=torch.empty(3, 2, 4, 8)), ValueError, r"o must be \[2, 4, 8\]"),
            (dict(lse=torch.empty(3, 2, 4)), ValueError, r"lse must be \[2, 4\]"),
            (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
            (dict(softmax_scale=-0.5), ValueError, "softmax_scale must be finite and > 0"),
            (dict(backend="bogus"), ValueError, "backend must be"),
            (dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors")):
        with pytest.raises(err, match=match):
            decode_partial(q, k, v, bt, lens, **kw)
    for table, kv_lens, match in (
            ([[0, -1], [2, 0]], [6, 3], r"block_table\[0\] holds page -1"),
            ([[0, 1], [3, 0]], [6, 3], r"block_table\[1\] holds page 3 among its first 1, "
                                       r"outside the cache's 3 pages"),
            ([[0, 1], [2, 0]], [9, 3], r"kv_lens\[0\] = 9 is outside \[0, 8\]"),
            ([[0, 1], [2, 0]], [6, -1], r"kv_lens\[1\] = -1 is outside")):
        with pytest.raises(ValueError, match=match):
            decode_partial(q, k, v, torch.tensor(table, dtype=torch.int32),
                           torch.tensor(kv_lens, dtype=torch.int32))
    # pages past a request's length are not read, so they need not be valid
    o2, lse2 = decode_partial(q, k, v, torch.tensor([[0, 1], [2, 99]], dtype=torch.int32), lens)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)


def one_instance_case():
    g = local_group(1)[0]
    cache = esp.PagedKVCache(2, 16, 4, 2, 8, torch.float32, "cpu")
    cache.kv.normal_()
    cache.allocate("r", range(9))
    cache.allocate("s", range(3))
    return g, cache, esp.DecodePlan.build(g, cache, ["r", "s"], [0, 0])


def reference_decode(cache, rids, q, layer):
    outs = []
    for b, rid in enumerate(rids):
        k, v = cache.gather(rid, layer)
        outs.append(esp.reference.attention(
            q[b:b + 1].float(), k.float(), v.float(), cu_seqlens([1], q.device),
            cu_seqlens([k.shape[0]], q.device), causal=False)[0])
    return torch.cat(outs)


def test_decode_runner_prepared_once_run_per_layer():
    """The runner object behind distributed_decode: the same results, reused by the one-call
    form for an equal plan, and tied to its shapes and to its requests' placement."""
    g, cache, plan = one_instance_case()
    runner = esp.DecodeRunner(plan, g, cache, 4, 8, torch.float32)
    q = torch.randn(2, 4, 8)
    for layer in range(2):
        out = runner.run(q, layer)
        assert_close(out, reference_decode(cache, ["r", "s"], q, layer), torch.float32)
        assert torch.equal(out, esp.distributed_decode(q, cache, plan, g, layer=layer))
    from esp_kernels.decode import decode_runner
    first = decode_runner(plan, g, cache, 4, 8, torch.float32)
    assert decode_runner(esp.DecodePlan.from_dict(plan.to_dict()), g, cache, 4, 8,
                         torch.float32) is first
    with pytest.raises(ValueError, match="as this runner was prepared"):
        runner.run(q.double().float()[:, :2], 0)
    with pytest.raises(ValueError, match="as this runner was prepared"):
        runner.run(q.half(), 0)
    with pytest.raises(ValueError, match="layer 2 is outside"):
        runner.run(q, 2)
    # Other requests come and go: the runner's requests did not move, it still runs.
    cache.allocate("other", range(6))
    cache.free("other")
    assert_close(runner.run(q, 1), reference_decode(cache, ["r", "s"], q, 1), torch.float32)
    # Its requests moved: it raises instead of reading stale pages.
    cache.remove_tokens("r", [0, 1])
    with pytest.raises(ValueError, match="moved tokens of this DecodeRunner's requests"):
        runner.run(q, 0)
    with pytest.raises(ValueError, match="holds 9 tokens of request 'r' but its cache holds 7"):
        esp.DecodeRunner(plan, g, cache, 4, 8, torch.float32)


def test_one_call_form_keeps_no_cache_alive():
    """The one-call form's runners are keyed weakly by the cache and hold it weakly: a cache
    the engine drops is freed (with its runners' buffers)."""
    g, cache, plan = one_instance_case()
    esp.distributed_decode(torch.randn(2, 4, 8), cache, plan, g)
    gone = weakref.ref(cache)
    del cache
    gc.collect()
    assert gone() is None


def test_decode_runner_needs_the_appended_slot_reserved():
    g, cache, plan = one_instance_case()
    up = esp.DecodePlan(plan.requests, plan.masters, [{0: 9}, {0: 3}], append_to=[0, None])
    with pytest.raises(ValueError, match="call plan.reserve"):
        esp.DecodeRunner(up, g, cache, 4, 8, torch.float32)
    assert up.reserve(cache, 0) == {"r": cache.last_token("r")[1]}
    runner = esp.DecodeRunner(up, g, cache, 4, 8, torch.float32)
    q, kn, vn = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="k_new must be"):
        runner.run(q, 0, k_new=kn[:1], v_new=vn)
    out = runner.run(q, 0, k_new=kn, v_new=vn)
    k, v = cache.gather("r", 0)
    assert torch.equal(k[-1], kn[0]) and torch.equal(v[-1], vn[0])
    assert_close(out, reference_decode(cache, ["r", "s"], q, 0), torch.float32)


def gather_case(device, gen, S=3, T=5, H=4, D=16, R=9):
    """A state pool with strided rows (as the runner's [o | lse | pad] rows: the lse part padded
    to 8 floats), an empty row at R-1, and a row map naming some rows twice and the empty row."""
    srow = H * D + (H + 7) // 8 * 8
    X = torch.randn(R, srow, generator=gen).to(device)
    X[-1, : H * D] = 0
    X[-1, H * D:] = -math.inf
    o = X.as_strided((R, H, D), (srow, D, 1))
    lse = X.as_strided((R, H), (srow, 1), H * D)
    rows = torch.randint(0, R, (S, T), generator=gen, dtype=torch.int32)
    rows[:, 0] = R - 1  # all-empty row: (0, -inf)
    return o, lse, rows.to(device)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_merge_states_gather_op(out_dtype, gen):
    from esp_kernels.decode.merge_gather import merge_states_gather, prepare_merge_states_gather
    o, lse, rows = gather_case("cpu", gen)
    ref_o, ref_l = esp.merge_states_multi(o[rows.long()], lse[rows.long()], out_dtype=torch.float32)
    out, lse_out = merge_states_gather(o, lse, rows, out=torch.empty(5, 4, 16, dtype=out_dtype))
    assert_close(out.float(), ref_o, out_dtype)
    assert torch.equal(lse_out, ref_l)
    assert torch.all(out[0] == 0) and torch.all(lse_out[0] == -math.inf)
    prepared = prepare_merge_states_gather(o, lse, rows, out_dtype=out_dtype)
    again = torch.full((5, 4, 16), math.nan, dtype=out_dtype)
    assert prepared(again) is again and torch.equal(again, out)
    with pytest.raises(ValueError, match="rows must lie in"):
        merge_states_gather(o, lse, rows + 9)
    with pytest.raises(ValueError, match="lse_pool"):
        merge_states_gather(o, lse[:3], rows)


def test_prepared_decode_partial_matches_the_op_per_layer(gen):
    from esp_kernels.decode.partial import prepare_decode_partial
    cache = esp.PagedKVCache(3, 12, 4, 2, 16, torch.float32, "cpu")
    cache.kv.normal_(generator=gen)
    cache.allocate("a", range(13))
    cache.allocate("b", range(2))
    bt, lens = cache.block_table(["a", "none", "b"])
    q = torch.randn(3, 4, 16, generator=gen)
    o, lse = torch.empty(3, 4, 16), torch.empty(3, 4)
    prepared = prepare_decode_partial(torch.empty_like(q), *cache.layers(), bt, lens, o=o, lse=lse)
    for layer in range(3):
        prepared(layer, q, softmax_scale=0.3)
        ref_o, ref_l = decode_partial(q, *cache.layer(layer), bt, lens, softmax_scale=0.3)
        assert torch.equal(o, ref_o) and torch.equal(lse, ref_l)
    with pytest.raises(ValueError, match="q must be a contiguous"):
        prepared(0, q[:2], softmax_scale=0.3)


# ---------------------------------------------------------------- GPU tier


def paged_case(lens, hq, hkv, d, page_size, dtype, gen):
    """A cache with random (shuffled) pages per request; returns q, cache views and reference."""
    pages_per = [math.ceil(n / page_size) for n in lens]
    total = sum(pages_per) + 3
    k_all = torch.randn(total + 2, page_size, hkv, d, generator=gen).to(dtype)
    v_all = torch.randn(total + 2, page_size, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen)
    bt = torch.zeros(len(lens), max(1, max(pages_per)), dtype=torch.int32)
    at = 0
    refs = []
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    for b, n in enumerate(lens):
        pg = perm[at:at + pages_per[b]]
        at += pages_per[b]
        bt[b, : len(pg)] = pg.to(torch.int32)
        k = k_all[pg].reshape(-1, hkv, d)[:n].float()
        v = v_all[pg].reshape(-1, hkv, d)[:n].float()
        refs.append(esp.reference.attention(q[b:b + 1].float(), k, v, cu_seqlens([1]),
                                            cu_seqlens([n]), causal=False))
    ref_o = torch.cat([r[0] for r in refs])
    ref_l = torch.cat([r[1] for r in refs])
    return q, k_all, v_all, bt, torch.tensor(lens, dtype=torch.int32), ref_o, ref_l


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 8, 64), (16, 1, 128), (20, 1, 64),
                                      (40, 1, 128)])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("splits", [None, 1, 3, 64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_decode_partial_kernel(dtype, hq, hkv, d, page_size, splits, deterministic, gen):
    lens = [0, 1, 63, 64, 65, 1000, 333]
    q, k, v, bt, kl, ref_o, ref_l = paged_case(lens, hq, hkv, d, page_size, dtype, gen)
    o = poison_(torch.empty(len(lens), hq, d, device="cuda"))
    lse = poison_(torch.empty(len(lens), hq, device="cuda"))
    decode_partial(q.cuda(), k.cuda(), v.cuda(), bt.cuda(), kl.cuda(), num_splits=splits, o=o,
                   lse=lse, deterministic=deterministic)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.all(o[0] == 0) and torch.all(lse[0] == -math.inf)
    assert_close(o.cpu(), ref_o, dtype)
    assert_close(lse.cpu(), ref_l, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("splits", [2, 16, 17, 128])
def test_decode_partial_balanced_long(page_size, splits, gen):
    """Long shards, where the balanced schedule hands most tiles out through its counters:
    matches the reference and the deterministic schedule; the deterministic one is bitwise
    reproducible."""
    lens = [0, 5, 20000, 4097]
    q, k, v, bt, kl, ref_o, ref_l = paged_case(lens, 32, 8, 128, page_size,
                                               torch.bfloat16, gen)
    args = (q.cuda(), k.cuda(), v.cuda(), bt.cuda(), kl.cuda())
    ws = torch.empty(esp._C.decode_workspace_elems(len(lens), 32, 128, splits), device="cuda")
    runs = {}
    for det in (False, True, True):
        o = poison_(torch.empty(len(lens), 32, 128, device="cuda"))
        lse = poison_(torch.empty(len(lens), 32, device="cuda"))
        # The same workspace every time: the counters must be reset by each launch.
        decode_partial(*args, num_splits=splits, o=o, lse=lse, workspace=ws, deterministic=det)
        assert torch.all(o[0] == 0) and torch.all(lse[0] == -math.inf)
        assert_close(o.cpu(), ref_o, torch.bfloat16)
        assert_close(lse.cpu(), ref_l, torch.bfloat16)
        runs.setdefault(det, []).append((o, lse))
    (o1, l1), (o2, l2) = runs[True]
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_auto_schedule_is_static_for_short_splits():
    """The default split count's schedule (H100's 132 SMs, Hkv 8, D 128): fixed ranges where
    splits hold under 512 tokens, the balanced counters from there on."""
    from esp_kernels.decode.partial import auto_schedule_is_static, num_splits_for

    for B, L, static in ((8, 1024, True), (8, 2048, True), (64, 512, True),
                         (1, 131072, False), (16, 16384, False), (64, 4096, False)):
        splits = num_splits_for(B, 8, L, 132, 128)
        assert auto_schedule_is_static(splits, L) == static, (B, L, splits)
    assert auto_schedule_is_static(4, 2044) and not auto_schedule_is_static(4, 2045)
    assert not auto_schedule_is_static(1, 4096) and auto_schedule_is_static(1, 100)


def test_kv_evict_first_up_to_six_l2_sizes_of_kv():
    """The L2 policy rule on H100's 50 MiB L2 (Hkv 8, D 128, bf16): up to 268 MB of KV a call
    streams with evict-first, bench_decode's long shapes (537 MB, 1.07 GB) without; the bound
    is inclusive."""
    from esp_kernels.decode.partial import EVICT_FIRST_MAX_L2_MULTIPLE, kv_evict_first

    l2 = 50 << 20
    for B, L, on in ((8, 1024, True), (64, 512, True), (16, 4096, True), (1, 65536, True),
                     (1, 131072, False), (16, 16384, False), (64, 4096, False)):
        assert kv_evict_first(B, 8, L, 128, 2, l2) == on, (B, L)
    limit = EVICT_FIRST_MAX_L2_MULTIPLE * l2 // (2 * 8 * 128 * 2)  # tokens of one request
    assert kv_evict_first(1, 8, limit, 128, 2, l2)
    assert not kv_evict_first(1, 8, limit + 1, 128, 2, l2)
    assert kv_evict_first(3, 8, 0, 128, 2, 0) and not kv_evict_first(1, 1, 1, 64, 2, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (20, 1, 64)])
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_decode_partial_l2_policies_give_the_same_bits(dtype, hq, hkv, d, splits, gen):
    """The kernel with and without the evict-first policy on its KV copies, through the core's
    entry: both match the reference, and with fixed ranges they give the same bits."""
    from esp_kernels import _core

    lens = [0, 1, 65, 1000, 333]
    q, k, v, bt, kl, ref_o, ref_l = paged_case(lens, hq, hkv, d, 16, dtype, gen)
    q, k, v, bt, kl = (t.cuda() for t in (q, k, v, bt, kl))
    dev = q.device
    outs = []
    for evict_first in (False, True):
        o = poison_(torch.empty(len(lens), hq, d, device="cuda"))
        lse = poison_(torch.empty(len(lens), hq, device="cuda"))
        ws = torch.empty(max(1, esp._C.decode_workspace_elems(len(lens), hq, d, splits)),
                         device="cuda")
        esp._C.decode_partial(*(_core.desc(t) for t in (q, k, v, bt, kl, o, lse, ws)), splits,
                              1 / math.sqrt(d), True, dev.index, _core.stream_handle(dev),
                              False, evict_first)
        assert_close(o.cpu(), ref_o, dtype)
        assert_close(lse.cpu(), ref_l, dtype)
        outs.append((o, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.gpu
def test_decode_partial_picks_the_l2_policy_from_its_bound(monkeypatch, gen):
    """The op asks the rule with max_len when given, else with the block table's capacity, and
    with the device's L2 size."""
    from esp_kernels.decode import partial

    asked = []
    rule = partial.kv_evict_first
    monkeypatch.setattr(partial, "kv_evict_first",
                        lambda *a: asked.append(a) or rule(*a))
    lens = [5, 300]
    q, k, v, bt, kl, ref_o, ref_l = paged_case(lens, 8, 2, 64, 16, torch.bfloat16, gen)
    args = [t.cuda() for t in (q, k, v, bt, kl)]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for max_len, bound in ((None, 16 * bt.shape[1]), (300, 300)):
        o, lse = decode_partial(*args, max_len=max_len)
        assert_close(o.cpu(), ref_o, torch.bfloat16)
        assert asked[-1] == (2, 2, bound, 64, 2, l2)


@pytest.mark.gpu
def test_decode_partial_short_splits_default_schedule_is_reproducible(gen):
    """Default split count on short shards (splits of under 512 tokens): the fixed ranges, so
    deterministic=False gives the deterministic schedule's bits, run after run."""
    from esp_kernels.decode.partial import auto_schedule_is_static, default_num_splits

    lens = [1000, 333, 64, 1, 0, 777, 1024, 900]
    q, k, v, bt, kl, ref_o, ref_l = paged_case(lens, 32, 8, 128, 16, torch.bfloat16, gen)
    args = (q.cuda(), k.cuda(), v.cuda(), bt.cuda(), kl.cuda())
    splits = default_num_splits(len(lens), 8, 1024, torch.device("cuda"), 128)
    assert splits > 1 and auto_schedule_is_static(splits, 1024)
    outs = []
    for det in (False, False, True):
        o, lse = decode_partial(*args, max_len=1024, deterministic=det)
        assert_close(o.cpu(), ref_o, torch.bfloat16)
        assert_close(lse.cpu(), ref_l, torch.bfloat16)
        outs.append((o, lse))
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])


@pytest.mark.gpu
def test_decode_partial_strided_layer_slice(gen):
    """k/v as a layer slice of a full PagedKVCache; outputs as the driver's strided rows."""
    cache = esp.PagedKVCache(3, 40, 16, 8, 128, torch.bfloat16, "cuda")
    cache.kv.normal_()
    cache.allocate("r", range(300))
    cache.allocate("s", range(17))
    bt, kl = cache.block_table(["r", "s"])
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    row = 32 * 128 + 32
    buf = poison_(torch.empty(2, row, device="cuda"))
    o = buf.as_strided((2, 32, 128), (row, 128, 1))
    lse = buf.as_strided((2, 32), (row, 1), 32 * 128)
    k, v = cache.layer(1)
    decode_partial(q, k, v, bt, kl, o=o, lse=lse)
    for b, rid in enumerate(["r", "s"]):
        kk, vv = cache.gather(rid, 1)
        ref, ref_l = esp.reference.attention(q[b:b + 1].float(), kk.float(), vv.float(),
                                             cu_seqlens([1], "cuda"),
                                             cu_seqlens([kk.shape[0]], "cuda"), causal=False)
        assert_close(o[b:b + 1].cpu(), ref.cpu(), torch.bfloat16)
        assert_close(lse[b:b + 1].cpu(), ref_l.cpu(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
def test_decode_virtual_ranks_gpu(n):
    args = (n, 500 + n, 32, 8, 128, 16, 2, torch.bfloat16, "cuda")
    res = run_local(local_group(n, "cuda"), decode_rank, *[[a] * n for a in args])
    check_decode(res, n, 500 + n, 32, 8, 128, 2, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("with_out", [False, True])
def test_decode_run_steps_gpu(n, with_out):
    res = decode_all_steps(n, 600 + n, 32, 8, 128, 16, 2, torch.bfloat16, "cuda", with_out)
    check_decode(res, n, 600 + n, 32, 8, 128, 2, torch.bfloat16)


@pytest.mark.gpu
def test_decode_single_instance_gpu(gen):
    """Every request held only by its master (the merge reads the state rows directly)."""
    g = local_group(1, "cuda")[0]
    cache = esp.PagedKVCache(2, 200, 16, 8, 128, torch.bfloat16, "cuda")
    cache.kv.normal_()
    lens = [1, 700, 3, 2049]  # a request no instance holds is refused by DecodePlan.build
    for i, n in enumerate(lens):
        cache.allocate(i, range(n))
    plan = esp.DecodePlan.build(g, cache, list(range(4)), [0] * 4)
    q = torch.randn(4, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    out = esp.distributed_decode(q, cache, plan, g, layer=1)
    for i, n in enumerate(lens):
        k, v = cache.gather(i, 1)
        ref, _ = esp.reference.attention(q[i:i + 1].float(), k.float(), v.float(),
                                         cu_seqlens([1], "cuda"), cu_seqlens([n], "cuda"),
                                         causal=False)
        assert_close(out[i:i + 1].float().cpu(), ref.cpu(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_decode_layer_cuda_graph_replay_equals_eager(deterministic, gen):
    """One instance (the group of one virtual rank): a decode layer captured in a CUDA graph with
    a fixed plan replays to the eager result for new queries: bitwise with the deterministic
    schedule; with the balanced one (whose counters each replay must reset: the 501-token
    request needs tiles from them) up to summation order."""
    g = local_group(1, "cuda")[0]
    cache = esp.PagedKVCache(1, 300, 16, 8, 128, torch.bfloat16, "cuda")
    cache.kv.normal_()
    reqs = [f"r{i}" for i in range(6)]
    for i, r in enumerate(reqs):
        cache.allocate(r, range(100 * i + 1))
    plan = esp.DecodePlan.build(g, cache, reqs, [0] * 6)
    q = torch.randn(6, 32, 128, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (prepares the plan's runner, allocations) outside capture
            esp.distributed_decode(q, cache, plan, g, deterministic=deterministic)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out_static = esp.distributed_decode(q, cache, plan, g, deterministic=deterministic)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        q.copy_(torch.randn(6, 32, 128, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        eager = esp.distributed_decode(q, cache, plan, g, deterministic=deterministic)
        if deterministic:
            torch.testing.assert_close(out_static, eager, rtol=0, atol=0)
        else:
            assert_close(out_static, eager, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [3, 70])  # 70 > MAX_KERNEL_STATES: gathered, merged in rounds
def test_merge_states_gather_op_gpu(S, gen):
    from esp_kernels.decode.merge_gather import prepare_merge_states_gather
    o, lse, rows = gather_case("cuda", gen, S=S, T=33, H=32, D=128, R=40)
    ref_o, ref_l = esp.merge_states_multi(o[rows.long()].cpu(), lse[rows.long()].cpu(),
                                          backend="torch")
    prepared = prepare_merge_states_gather(o, lse, rows, out_dtype=torch.bfloat16)
    out = poison_(torch.empty(33, 32, 128, device="cuda")).to(torch.bfloat16)
    prepared(out)
    assert_close(out.float().cpu(), ref_o, torch.bfloat16)
    assert_close(prepared.lse_out.cpu(), ref_l, torch.float32)
    assert torch.all(out[0] == 0) and torch.all(prepared.lse_out[0] == -math.inf)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_prepared_decode_partial_gpu(deterministic, gen):
    """The prepared launch (descriptors built once, layer pointers swapped, counters left zero
    by each launch) equals the op on every layer, several times over."""
    from esp_kernels.decode.partial import prepare_decode_partial
    cache = esp.PagedKVCache(3, 400, 16, 8, 128, torch.bfloat16, "cuda")
    cache.kv.normal_()
    for i, n in enumerate([1, 3000, 0, 700]):
        cache.allocate(i, range(n))
    bt, lens = cache.block_table(range(4))
    q = torch.randn(4, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    o = poison_(torch.empty(4, 32, 128, device="cuda"))
    lse = poison_(torch.empty(4, 32, device="cuda"))
    prepared = prepare_decode_partial(q.clone(), *cache.layers(), bt, lens, o=o, lse=lse,
                                      max_len=3000)
    for _ in range(2):
        for layer in (2, 0, 1):
            for q_in in (None, q):
                if q_in is None:
                    prepared.q.copy_(q)
                prepared(layer, q_in, softmax_scale=0.1, deterministic=deterministic)
                ref_o, ref_l = decode_partial(q, *cache.layer(layer), bt, lens,
                                              softmax_scale=0.1, backend="torch")
                assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)
                assert_close(lse.cpu(), ref_l.cpu(), torch.bfloat16)


@pytest.mark.gpu
def test_decode_runner_gpu_equals_one_call_form(gen):
    g = local_group(1, "cuda")[0]
    cache = esp.PagedKVCache(2, 200, 16, 8, 128, torch.bfloat16, "cuda")
    cache.kv.normal_()
    for i, n in enumerate([5, 900, 2049]):
        cache.allocate(i, range(n))
    plan = esp.DecodePlan.build(g, cache, [0, 1, 2], [0, 0, 0])
    runner = esp.DecodeRunner(plan, g, cache, 32, 128, torch.bfloat16)
    q = torch.randn(3, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    for layer in range(2):
        a = runner.run(q, layer, deterministic=True)
        b = esp.distributed_decode(q, cache, plan, g, layer=layer, deterministic=True)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        ref = reference_decode(cache, [0, 1, 2], q.float(), layer)
        assert_close(a.float(), ref, torch.bfloat16)
