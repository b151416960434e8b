"""merge_states: exactness, -inf (empty) states, in-place and multi-state forms, CUDA kernel."""

import math

import pytest
import torch

import esp_kernels as esp
from esp_kernels.testing import assert_close, poison_


def random_state(T, H, D, gen, empty_every=0, dtype=torch.float32):
    o = torch.randn(T, H, D, generator=gen).to(dtype)
    lse = torch.randn(T, H, generator=gen) * 3
    if empty_every:
        lse.view(-1)[::empty_every] = -math.inf
        o.view(T * H, D)[::empty_every] = math.nan  # garbage in empty states must not leak
    return o, lse


def exact_merge(os, lses):
    """float64 merge of S states for comparison."""
    lse = torch.logsumexp(torch.stack([l.double() for l in lses]), 0)
    o = torch.zeros(os[0].shape, dtype=torch.float64)
    for oi, li in zip(os, lses):
        w = torch.exp(li.double() - lse)
        w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
        o += torch.where(w[..., None] > 0, oi.double() * w[..., None], 0)
    return o, lse


def test_two_states_exact(gen):
    a = random_state(37, 5, 64, gen, empty_every=3)
    b = random_state(37, 5, 64, gen, empty_every=5)
    o, lse = esp.merge_states(*a, *b)
    ref_o, ref_l = exact_merge([a[0], b[0]], [a[1], b[1]])
    assert not torch.isnan(o).any()
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)


def test_empty_states_give_zero_and_minus_inf(gen):
    o_a = torch.full((4, 2, 8), math.nan)
    o_b = torch.full((4, 2, 8), math.nan)
    inf = torch.full((4, 2), -math.inf)
    o, lse = esp.merge_states(o_a, inf, o_b, inf.clone())
    assert torch.all(o == 0) and torch.all(lse == -math.inf)
    x = random_state(4, 2, 8, gen)
    o, lse = esp.merge_states(o_a, inf, *x)  # empty merged with x is exactly x
    assert torch.equal(o, x[0]) and torch.equal(lse, x[1])


def test_in_place_and_multi(gen):
    states = [random_state(19, 3, 32, gen, empty_every=k + 2) for k in range(5)]
    ref_o, ref_l = exact_merge([s[0] for s in states], [s[1] for s in states])
    o, lse = states[0][0].clone(), states[0][1].clone()
    for s in states[1:]:
        ret = esp.merge_states_(o, lse, *s)
        assert ret[0] is o and ret[1] is lse
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)
    mo, ml = esp.merge_states_multi([s[0] for s in states], [s[1] for s in states])
    assert_close(mo, ref_o, torch.float32)
    assert_close(ml, ref_l, torch.float32)


def test_bad_input(gen):
    o, lse = random_state(4, 2, 8, gen)
    with pytest.raises(ValueError, match="lse_b"):
        esp.merge_states(o, lse, o, lse[:3])
    with pytest.raises(TypeError, match="lse_a must have dtype"):
        esp.merge_states(o, lse.half(), o, lse)
    with pytest.raises(ValueError, match="differ in shape"):
        esp.merge_states(o, lse, o[:3], lse[:3])
    with pytest.raises(ValueError, match="contiguous"):
        esp.merge_states(o.transpose(1, 2).contiguous().transpose(1, 2), lse, o, lse)
    with pytest.raises(ValueError, match="backend"):
        esp.merge_states(o, lse, o, lse, backend="nope")
    with pytest.raises(ValueError, match="at least one"):
        esp.merge_states_multi(o[None][:0], lse[None][:0])
    # merge_states_multi's outputs, checked as merge_states' (an int32 out or lse_out truncated,
    # a [2, T, H] lse_out was filled by broadcasting, a list out raised AttributeError)
    os_, ls = torch.stack([o, o]), torch.stack([lse, lse])
    for kw, err, match in ((dict(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
                           (dict(out=o.int()), TypeError, "out must have dtype"),
                           (dict(out=[1, 2]), TypeError, "out must be a torch.Tensor"),
                           (dict(out=o[:3]), ValueError, r"out \(3, 2, 8\) must be"),
                           (dict(lse_out=lse.long()), TypeError, "lse_out must have dtype"),
                           (dict(lse_out=ls), ValueError, "lse_out must have 2 dims")):
        with pytest.raises(err, match=match):
            esp.merge_states_multi(os_, ls, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (37, 5, 64), (1000, 32, 128), (3, 7, 96),
                                   (5, 3, 13)])
def test_kernel_matches_torch(in_dtype, shape, gen):
    T, H, D = shape
    a = [t.cuda() for t in random_state(T, H, D, gen, empty_every=3, dtype=in_dtype)]
    b = [t.cuda() for t in random_state(T, H, D, gen, empty_every=4, dtype=in_dtype)]
    out = poison_(torch.empty(T, H, D, device="cuda", dtype=in_dtype))
    lse_out = poison_(torch.empty(T, H, device="cuda"))
    esp.merge_states(*a, *b, out=out, lse_out=lse_out)
    ref_o, ref_l = exact_merge([a[0].cpu(), b[0].cpu()], [a[1].cpu(), b[1].cpu()])
    assert not torch.isnan(out).any()
    assert_close(out.cpu(), ref_o.to(in_dtype), in_dtype)
    assert_close(lse_out.cpu(), ref_l, torch.float32)
    # the in-place form on an fp32 running state (out aliases state a)
    run_o, run_l = a[0].float().clone(), a[1].clone()
    esp.merge_states_(run_o, run_l, b[0].float(), b[1])
    assert_close(run_o.cpu(), ref_o, torch.float32)
    assert_close(run_l.cpu(), ref_l, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 3, 8, 70])
def test_kernel_multi_and_strided(S, gen):
    T, H, D = 129, 8, 128
    states = [random_state(T, H, D, gen, empty_every=s + 2) for s in range(S)]
    o = torch.stack([s[0] for s in states]).cuda()
    lse = torch.stack([s[1] for s in states]).cuda()
    ref_o, ref_l = exact_merge([s[0] for s in states], [s[1] for s in states])
    out, lse_out = esp.merge_states_multi(o, lse, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out.cpu(), ref_o.to(torch.bfloat16), torch.bfloat16)
    assert_close(lse_out.cpu(), ref_l, torch.float32)
    # strided rows [o | lse] as the decode driver lays them out
    row = H * D + H
    buf = torch.empty(S, T, row, device="cuda")
    buf[..., : H * D] = o.reshape(S, T, H * D)
    buf[..., H * D:] = lse
    o_v = buf.as_strided((S, T, H, D), (T * row, row, D, 1))
    l_v = buf.as_strided((S, T, H), (T * row, row, 1), H * D)
    out2, lse2 = esp.merge_states_multi(o_v, l_v)
    assert_close(out2.cpu(), ref_o, torch.float32)
    assert_close(lse2.cpu(), ref_l, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 2, 5])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_kernel_gather_from_state_rows(S, out_dtype, gen):
    """The decode driver's merge: state s of row t is row rows[s, t] of a pool laid out as
    strided [o | lse | pad] rows (empty pool rows included: NaN o, -inf lse)."""
    from esp_kernels import _core
    R, T, H, D = 23, 17, 8, 128
    pool_o, pool_l = random_state(R, H, D, gen, empty_every=5)
    row = H * D + H + 8
    buf = torch.full((R, row), math.nan, device="cuda")
    buf[:, : H * D] = pool_o.reshape(R, H * D).cuda()
    buf[:, H * D: H * D + H] = pool_l.cuda()
    x_o = buf.as_strided((R, H, D), (row, D, 1))
    x_l = buf.as_strided((R, H), (row, 1), H * D)
    rows = torch.randint(0, R, (S, T), generator=gen, dtype=torch.int32)
    out = poison_(torch.empty(T, H, D, device="cuda", dtype=out_dtype))
    lse_out = poison_(torch.empty(T, H, device="cuda"))
    d = _core.desc
    _core._C.merge_states_gather(d(x_o), d(x_l), d(rows.cuda()), d(out), d(lse_out), 0,
                                 _core.stream_handle(torch.device("cuda", 0)))
    idx = rows.long()
    ref_o, ref_l = exact_merge([pool_o[idx[s]] for s in range(S)], [pool_l[idx[s]] for s in range(S)])
    assert not torch.isnan(out).any()
    assert_close(out.cpu(), ref_o.to(out_dtype), out_dtype)
    assert_close(lse_out.cpu(), ref_l, torch.float32)
    # no rows: nothing to do, as merge_states with T = 0
    empty = torch.empty(0, H, D, device="cuda")
    _core._C.merge_states_gather(d(x_o), d(x_l), d(rows[:, :0].contiguous().cuda()), d(empty),
                                 None, 0, _core.stream_handle(torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="rows must be contiguous int32"):
        _core._C.merge_states_gather(d(x_o), d(x_l), d(rows.cuda().long()), d(out), d(lse_out),
                                     0, _core.stream_handle(torch.device("cuda", 0)))
