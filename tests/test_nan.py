"""NaN propagation: a NaN in an input row gives NaN in the output rows that read it, in every op
and path (reference, merge, ring step, decode partial, ring prefill, distributed decode), while
(0, -inf) stays the empty state and still merges NaN-free.

Expected NaN rows are computed here from the mask rule, independently of the ops under test.
"""

import math

import pytest
import torch

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from esp_kernels.decode import decode_partial
from esp_kernels.prefill.step import ring_step
from esp_kernels.testing import cu_seqlens, random_paged_cache, stripe, unstripe

NAN = math.nan


def seen_by(lens_q, lens_k, b, key, shift, causal=True):
    """Bool [Tq]: query rows of the packed batch that see key `key` (local) of request b, under
    the ring step's rule: query a sees key j iff j <= a + shift."""
    rows = []
    for r, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        for a in range(lq):
            rows.append(r == b and key < lk and (not causal or key <= a + shift))
    return torch.tensor(rows, dtype=torch.bool)


def head_rows(mask_t, hq, hkv, kv_head):
    """[Tq, Hq] mask: rows of mask_t for the query heads that read kv_head."""
    g = hq // hkv
    heads = torch.zeros(hq, dtype=torch.bool)
    heads[kv_head * g:(kv_head + 1) * g] = True
    return mask_t[:, None] & heads[None, :]


def assert_nan_exactly(x, mask, name):
    """x [T, H] or [T, H, D]: NaN in every element of the masked rows, none elsewhere (rows that
    see no key hold the empty state, lse -inf)."""
    nan = torch.isnan(x).cpu()
    mask = mask.cpu()
    assert bool(mask.any()), "test setup: no row sees the NaN"
    rows_all = nan.all(-1) if x.dim() == 3 else nan
    rows_any = nan.any(-1) if x.dim() == 3 else nan
    assert torch.equal(rows_all, mask), f"{name}: NaN rows differ from the rows that read the NaN"
    assert torch.equal(rows_any, mask), f"{name}: NaN in a row that reads no NaN"


def causal_lens_batch(gen, lens, hq, hkv, d, dtype=torch.float32, device="cpu"):
    T = sum(lens)
    mk = lambda h: torch.randn(T, h, d, generator=gen).to(device=device, dtype=dtype)
    return mk(hq), mk(hkv), mk(hkv), cu_seqlens(lens, device)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_nan_in_q_k_v(hq, hkv, gen):
    lens = [5, 9, 3]
    q, k, v, cu = causal_lens_batch(gen, lens, hq, hkv, 8)
    clean_o, clean_l = esp.reference.attention(q, k, v, cu, cu)
    # q: only that (token, head) row.
    qn = q.clone()
    qn[7, 1, 3] = NAN
    o, lse = esp.reference.attention(qn, k, v, cu, cu)
    mask = torch.zeros(sum(lens), hq, dtype=torch.bool)
    mask[7, 1] = True
    assert_nan_exactly(o, mask, "out (q NaN)")
    assert_nan_exactly(lse, mask, "lse (q NaN)")
    torch.testing.assert_close(o[~mask], clean_o[~mask])
    # k: the rows of request 1 at or after key 2, query heads of its KV head.
    kn = k.clone()
    kn[5 + 2, hkv - 1, 0] = NAN
    o, lse = esp.reference.attention(q, kn, v, cu, cu)
    mask = head_rows(seen_by(lens, lens, 1, 2, 0), hq, hkv, hkv - 1)
    assert_nan_exactly(o, mask, "out (k NaN)")
    assert_nan_exactly(lse, mask, "lse (k NaN)")
    torch.testing.assert_close(lse[~mask], clean_l[~mask])
    # v: element 5 of the out rows that see it; lse does not read v.
    vn = v.clone()
    vn[5 + 2, 0, 5] = NAN
    o, lse = esp.reference.attention(q, k, vn, cu, cu)
    mask = head_rows(seen_by(lens, lens, 1, 2, 0), hq, hkv, 0)
    assert bool(torch.isnan(o[mask][:, 5]).all())
    torch.testing.assert_close(lse, clean_l)


def test_reference_nan_key_hidden_by_mask_stays_out():
    """A NaN key in the future of every query (causal) is masked, not propagated."""
    q, k, v = torch.randn(4, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    k[5] = NAN
    o, lse = esp.reference.attention(q, k, v, cu_seqlens([4]), cu_seqlens([6]),
                                     q_positions=torch.arange(4), k_positions=torch.arange(6))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------- merge


def merge_cases(device, dtype, d):
    """(o_a, lse_a, o_b, lse_b, expected NaN rows [T, H] of out, of lse) covering NaN next to
    empty states."""
    T, H = 6, 3
    o_a, o_b = torch.randn(T, H, d, device=device).to(dtype), torch.randn(T, H, d, device=device).to(dtype)
    l_a, l_b = torch.randn(T, H, device=device), torch.randn(T, H, device=device)
    nan = torch.zeros(T, H, dtype=torch.bool)
    l_a[0, 0], l_b[0, 0] = NAN, -math.inf; nan[0, 0] = True            # NaN next to empty
    l_a[1, 1], l_b[1, 1] = -math.inf, NAN; nan[1, 1] = True            # empty next to NaN
    l_a[2, 2] = NAN; nan[2, 2] = True                                    # NaN next to a state
    nan_lse = nan.clone()
    o_b[3, 0, 1] = NAN; nan[3, 0] = True                                 # NaN in a non-empty o
    l_a[4, 1], l_b[4, 1] = -math.inf, -math.inf                          # both empty, garbage o
    o_a[4, 1], o_b[4, 1] = NAN, NAN
    l_a[5, 0] = -math.inf; o_a[5, 0] = NAN                               # empty with NaN o
    return o_a, l_a, o_b, l_b, (nan, nan_lse)


def check_merge(o, lse, nans):
    nan, nan_lse = nans
    assert torch.equal(torch.isnan(lse).cpu(), nan_lse), "lse NaN rows"
    assert torch.equal(torch.isnan(o).any(-1).cpu(), nan), "out NaN rows"
    assert torch.equal(torch.isnan(o).all(-1).cpu(), nan_lse), "a NaN lse makes the out row NaN"
    assert bool((o[4, 1] == 0).all()) and lse[4, 1] == -math.inf, "empty + empty is (0, -inf)"
    assert torch.isfinite(lse[5, 0]), "an empty state's NaN o leaked"


@pytest.mark.parametrize("d", [8, 5])
def test_merge_nan_torch(d):
    o_a, l_a, o_b, l_b, nan = merge_cases("cpu", torch.float32, d)
    check_merge(*esp.merge_states(o_a, l_a, o_b, l_b), nan)
    check_merge(*esp.merge_states_multi(torch.stack([o_a, o_b]), torch.stack([l_a, l_b])), nan)
    # three states, the NaN one among two empty ones
    e = torch.full_like(l_a, -math.inf)
    o, lse = esp.merge_states_multi(torch.stack([o_a, o_a, o_b]), torch.stack([e, l_a, e]))
    assert torch.equal(torch.isnan(lse), torch.isnan(l_a))


# ---------------------------------------------------------------- ring step


def step_case(gen, dtype, device, hq=4, hkv=2, d=16):
    lens_q, lens_k = [5, 11, 3], [6, 11, 2]
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(device=device, dtype=dtype)
    return lens_q, lens_k, q, k, v


def run_step(backend, q, k, v, lens_q, lens_k, shift, accumulate, o=None, lse=None):
    dev = q.device
    if o is None:
        o = torch.randn(q.shape, device=dev)
        lse = torch.randn(q.shape[:2], device=dev)
    ring_step(q, k, v, cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev), max(lens_q), o, lse,
              mask_shift=shift, accumulate=accumulate, softmax_scale=0.25, backend=backend)
    return o, lse


def check_step_nan(backend, dtype, device, gen, d=16):
    lens_q, lens_k, q, k, v = step_case(gen, dtype, device, d=d)
    hq, hkv = q.shape[1], k.shape[1]
    key = 4  # request 1, key 4 of 11 (keys 6..16 of k)
    k[6 + key, 1, 3] = NAN
    for shift in (0, -1):
        for accumulate in (False, True):
            o, lse = run_step(backend, q, k, v, lens_q, lens_k, shift, accumulate)
            mask = head_rows(seen_by(lens_q, lens_k, 1, key, shift), hq, hkv, 1)
            assert_nan_exactly(o, mask, f"{backend} out shift={shift} acc={accumulate}")
            assert_nan_exactly(lse, mask, f"{backend} lse shift={shift} acc={accumulate}")
    # A NaN running state stays NaN, whether the block is empty for its row or not.
    lens_q, lens_k, q, k, v = step_case(gen, dtype, device, d=d)
    o = torch.randn(q.shape, device=q.device)
    lse = torch.randn(q.shape[:2], device=q.device)
    lse[0, 0] = NAN             # request 0, token 0: sees key 0 (shift 0) or nothing (shift -1)
    o[0, 0] = NAN
    for shift in (0, -1):
        o2, lse2 = run_step(backend, q, k, v, lens_q, lens_k, shift, True, o.clone(), lse.clone())
        assert torch.isnan(lse2[0, 0]) and torch.isnan(o2[0, 0]).all()
        assert torch.isfinite(lse2[1:]).all() and torch.isfinite(o2[1:]).all()


def test_ring_step_nan_torch(gen):
    check_step_nan("torch", torch.float32, "cpu", gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ring_step_nan_triton_interpreter(dtype, gen):
    if torch.cuda.is_available():
        pytest.skip("CPU test of the Triton interpreter; the GPU tier covers compiled Triton")
    pytest.importorskip("triton")
    check_step_nan("triton", dtype, "cpu", gen)


# ---------------------------------------------------------------- decode partial


def check_decode_nan(device, dtype, gen, **kw):
    lens, hq, hkv, d = [9, 40, 0, 17], 8, 2, 64
    cache = random_paged_cache(gen, lens, 32, 4, hkv, d, dtype, device)
    k, v = cache.layer(0)
    slot = int(cache.slots(1)[23])
    k.view(-1, hkv, d)[slot, 0, 7] = NAN    # request 1, token 23, kv head 0
    bt, kl = cache.block_table(range(len(lens)))
    q = torch.randn(len(lens), hq, d, generator=gen).to(device=device, dtype=dtype)
    o, lse = decode_partial(q, k, v, bt, kl, **kw)
    mask = torch.zeros(len(lens), hq, dtype=torch.bool)
    mask[1, : hq // hkv] = True
    assert_nan_exactly(o, mask, "decode out")
    assert_nan_exactly(lse[[0, 1, 3]], mask[[0, 1, 3]], "decode lse")
    assert bool((o[2] == 0).all()) and bool((lse[2] == -math.inf).all()), "empty request"
    # NaN in a query head: that head only
    q[3, 5, 0] = NAN
    o, lse = decode_partial(q, k, v, bt, kl, **kw)
    mask[3, 5] = True
    assert_nan_exactly(o, mask, "decode out (q NaN)")


def test_decode_partial_nan_torch(gen):
    check_decode_nan("cpu", torch.float32, gen)


# ---------------------------------------------------------------- drivers


def check_ring_prefill_nan(device, dtype, backend, gen, d=16):
    P, lens, hq, hkv = 2, [7, 12], 4, 2
    q, k, v, _ = causal_lens_batch(gen, lens, hq, hkv, d, dtype, device)
    k[7 + 5, 0, 2] = NAN                    # request 1, global token 5, kv head 0
    groups = local_group(P, device)
    parts = [stripe(t, lens, P) for t in (q, k, v)]
    res = run_local(groups, lambda g, a, b, c: esp.ring_prefill(a, b, c, lens, g, backend=backend),
                    *parts)
    o = unstripe([r[0] for r in res], lens)
    lse = unstripe([r[1] for r in res], lens)
    mask = head_rows(seen_by(lens, lens, 1, 5, 0), hq, hkv, 0)
    assert_nan_exactly(o, mask, f"ring_prefill[{backend}] out")
    assert_nan_exactly(lse, mask, f"ring_prefill[{backend}] lse")


def test_ring_prefill_nan_cpu(gen):
    check_ring_prefill_nan("cpu", torch.float32, "torch", gen)


def check_distributed_decode_nan(device, dtype, gen):
    """Request "a" is split over instances 0 and 1 with a NaN key on instance 1; "b" is clean."""
    hq, hkv, d = 4, 2, 64
    g = local_group(2, device)
    caches = [esp.PagedKVCache(1, 8, 4, hkv, d, dtype, device) for _ in range(2)]
    for inst, (pa, pb) in enumerate(((range(0, 6), range(0, 3)), (range(6, 13), range(3, 5)))):
        caches[inst].allocate("a", pa)
        caches[inst].allocate("b", pb)
        k, v = caches[inst].layer(0)
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    k1, _ = caches[1].layer(0)
    k1.view(-1, hkv, d)[int(caches[1].slots("a")[2]), 1, 0] = NAN
    q = torch.randn(2, hq, d, generator=gen).to(device=device, dtype=dtype)

    def body(group, cache):
        plan = esp.DecodePlan.build(group, cache, ["a", "b"], [0, 1])
        mine = plan.mastered_by(group.rank)
        return esp.distributed_decode(q[mine], cache, plan, group)

    out_a, out_b = run_local(g, body, caches)
    assert torch.isnan(out_a[0, 2:]).all() and torch.isfinite(out_a[0, :2]).all()
    assert torch.isfinite(out_b).all()


def test_distributed_decode_nan_cpu(gen):
    check_distributed_decode_nan("cpu", torch.float32, gen)


# ---------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 5])  # 16-byte vector path and scalar path
def test_merge_nan_cuda(dtype, d):
    o_a, l_a, o_b, l_b, nan = merge_cases("cuda", dtype, d)
    check_merge(*esp.merge_states(o_a, l_a, o_b, l_b), nan)                         # pair
    check_merge(*esp.merge_states_multi(torch.stack([o_a, o_b]), torch.stack([l_a, l_b])),
                nan)
    e = torch.full_like(l_a, -math.inf)
    o, lse = esp.merge_states_multi(torch.stack([o_a, o_a, o_b]), torch.stack([e, l_a, e]))
    assert torch.equal(torch.isnan(lse), torch.isnan(l_a))                          # S states


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_ring_step_nan_in_v_stays_in_its_request(backend, dtype, d, gen):
    """A NaN in V reaches the rows whose block holds it (p = 0 times NaN is NaN, so rows of the
    same request may get it even when masked), never another request's rows."""
    lens_q, lens_k, q, k, v = step_case(gen, dtype, "cuda", d=d)
    v[6 + 4, 1, 3] = NAN  # request 1, key 4
    for accumulate in (False, True):
        o, lse = run_step(backend, q, k, v, lens_q, lens_k, 0, accumulate)
        others = torch.ones(sum(lens_q), dtype=torch.bool)
        others[lens_q[0]:lens_q[0] + lens_q[1]] = False
        assert not torch.isnan(o[others.cuda()]).any(), f"{backend} acc={accumulate}"
        assert not torch.isnan(lse[others.cuda()]).any(), f"{backend} acc={accumulate}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_ring_step_nan_cuda(backend, dtype, d, gen):
    lens_q, lens_k, q, k, v = step_case(gen, dtype, "cuda", d=d)
    hq, hkv = q.shape[1], k.shape[1]
    for where in ("k", "q"):
        qn, kn = q.clone(), k.clone()
        if where == "k":
            kn[6 + 4, 1, 3] = NAN
            mask = head_rows(seen_by(lens_q, lens_k, 1, 4, 0), hq, hkv, 1)
        else:
            qn[8, 2, 0] = NAN
            mask = torch.zeros(sum(lens_q), hq, dtype=torch.bool)
            mask[8, 2] = True
        for accumulate in (False, True):
            o, lse = run_step(backend, qn, kn, v, lens_q, lens_k, 0, accumulate)
            assert_nan_exactly(o, mask, f"{backend} {where} acc={accumulate} out")
            assert_nan_exactly(lse, mask, f"{backend} {where} acc={accumulate} lse")
    check_step_nan(backend, dtype, "cuda", gen, d=d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_decode_partial_nan_cuda(dtype, splits, deterministic, gen):
    check_decode_nan("cuda", dtype, gen, num_splits=splits, deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_ring_prefill_nan_cuda(backend, gen):
    check_ring_prefill_nan("cuda", torch.float16, backend, gen, d=64)  # Gluon kernel: D 64/128


@pytest.mark.gpu
def test_distributed_decode_nan_cuda(gen):
    check_distributed_decode_nan("cuda", torch.float16, gen)
