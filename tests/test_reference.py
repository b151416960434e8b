"""esp.reference.attention against a float64 naive attention, striped decomposition, bad input."""

import math

import pytest
import torch

import esp_kernels as esp
from esp_kernels.testing import (assert_close, cu_seqlens, random_varlen_batch, stripe_indices,
                                 stripe_positions)


def naive_attention(q, k, v, lq, lk, causal, scale, qpos=None, kpos=None):
    """Float64, one request at a time, full score matrix (small inputs only)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    qs = ks = 0
    for a, b in zip(lq, lk):
        if b == 0:  # no keys: rows stay (0, -inf)
            qs += a
            continue
        qb, kb, vb = q[qs:qs + a].double(), k[ks:ks + b].double(), v[ks:ks + b].double()
        kb = kb.repeat_interleave(G, dim=1)
        vb = vb.repeat_interleave(G, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        if causal:
            qp = qpos[qs:qs + a] if qpos is not None else torch.arange(b - a, b)
            kp = kpos[ks:ks + b] if kpos is not None else torch.arange(b)
            s = s.masked_fill(kp[None, None, :] > qp[None, :, None], -math.inf)
        m = s.amax(-1, keepdim=True)
        seen = torch.isfinite(m)
        p = torch.where(seen, torch.exp(s - torch.where(seen, m, 0)), 0)
        den = p.sum(-1)
        o = torch.einsum("hqk,khd->qhd", p / torch.where(den > 0, den, 1)[..., None], vb)
        out[qs:qs + a] = o
        lse[qs:qs + a] = torch.where(den > 0, (m[..., 0] + torch.log(torch.where(den > 0, den, 1))),
                                     -math.inf).T
        qs += a
        ks += b
    return out, lse


@pytest.mark.parametrize("hq,hkv", [(1, 1), (3, 1), (8, 1), (6, 2)])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_reference_matches_float64(hq, hkv, d, gen):
    lens = [1, 7, 33, 257]
    b = random_varlen_batch(lens, hq, hkv, d, generator=gen)
    scale = 0.7 / math.sqrt(d)
    for causal in (True, False):
        out, lse = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens,
                                           causal=causal, softmax_scale=scale)
        ref_o, ref_l = naive_attention(b.q, b.k, b.v, lens, lens, causal, scale)
        assert out.dtype == b.q.dtype and lse.dtype == torch.float32
        assert_close(out, ref_o, torch.float32)
        assert_close(lse, ref_l, torch.float32)


def test_unequal_lengths_and_empty_rows(gen):
    # Queries at the end of longer key sets (bottom-right alignment), a request with no keys,
    # and positions that leave some query rows with nothing to see.
    lq, lk = [3, 2, 4], [10, 0, 4]
    q = torch.randn(sum(lq), 4, 64, generator=gen)
    k = torch.randn(sum(lk), 2, 64, generator=gen)
    v = torch.randn(sum(lk), 2, 64, generator=gen)
    out, lse = esp.reference.attention(q, k, v, cu_seqlens(lq), cu_seqlens(lk))
    ref_o, ref_l = naive_attention(q, k, v, lq, lk, True, 1 / 8)
    assert_close(out, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)
    assert torch.all(out[3:5] == 0) and torch.all(lse[3:5] == -math.inf)
    qpos = torch.tensor([0, 1, 2, 0, 0, 0, 1, 2, 3])
    kpos = torch.cat([torch.arange(10) + 1, torch.arange(4) + 2])
    out, lse = esp.reference.attention(q, k, v, cu_seqlens(lq), cu_seqlens(lk), q_positions=qpos,
                                       k_positions=kpos)
    ref_o, ref_l = naive_attention(q, k, v, lq, lk, True, 1 / 8, qpos, kpos)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert lse[0, 0] == -math.inf and torch.all(out[0] == 0)
    assert_close(out, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_striped_decomposition_merges_to_full(P, gen):
    """Keys split into P stripes, each attended with global positions, merged == full causal."""
    lens = [1, P - 1, P, P + 1, 97]
    b = random_varlen_batch(lens, 8, 2, 64, generator=gen)
    full_o, full_l = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens)
    qpos = torch.cat([torch.arange(L) for L in lens])
    o, lse = None, None
    for r in range(P):
        idx = stripe_indices(lens, P, r)
        kpos = stripe_positions(lens, P, r)
        cu_k = cu_seqlens([len(range(r, L, P)) if r < L else 0 for L in lens])
        o_r, l_r = esp.reference.attention(b.q, b.k[idx], b.v[idx], b.cu_seqlens, cu_k,
                                           q_positions=qpos, k_positions=kpos)
        o, lse = (o_r, l_r) if o is None else esp.merge_states(o, lse, o_r, l_r)
    assert_close(o, full_o, torch.float32)
    assert_close(lse, full_l, torch.float32)


def test_long_input_is_blocked():
    """8k tokens x 8 heads: a T x T score matrix would be 2 GiB; blocked it stays small."""
    L = 8192
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, 8, 32, generator=g)
    k = torch.randn(L, 2, 32, generator=g)
    v = torch.randn(L, 2, 32, generator=g)
    cu = cu_seqlens([L])
    out, lse = esp.reference.attention(q[-4:], k, v, cu_seqlens([4]), cu)
    ref_o, ref_l = naive_attention(q[-4:], k, v, [4], [L], True, 1 / math.sqrt(32))
    assert_close(out, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)


def test_bad_input():
    q = torch.randn(10, 6, 32)
    k = torch.randn(10, 4, 32)
    v = torch.randn(10, 4, 32)
    cu = cu_seqlens([4, 6])
    with pytest.raises(ValueError, match="multiple"):
        esp.reference.attention(q, k, v, cu, cu)
    k, v = k[:, :2], v[:, :2]
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        esp.reference.attention(q, k, v, cu.long(), cu)
    with pytest.raises(ValueError, match="cu_seqlens_k.*disagrees"):
        esp.reference.attention(q, k, v, cu, cu_seqlens([4, 7]))
    with pytest.raises(ValueError, match="requests"):
        esp.reference.attention(q, k, v, cu, cu_seqlens([10]))
    with pytest.raises(ValueError, match="head dim"):
        esp.reference.attention(q, k[..., :16], v[..., :16], cu, cu)
    with pytest.raises(ValueError, match="q_positions"):
        esp.reference.attention(q, k, v, cu, cu, q_positions=torch.arange(3))
    with pytest.raises(TypeError, match="q must have dtype"):
        esp.reference.attention(q.int(), k, v, cu, cu)
    with pytest.raises(ValueError, match="3 dims"):
        esp.reference.attention(q[0], k, v, cu, cu)
    meta = torch.empty(10, 2, 32, device="meta")
    with pytest.raises(ValueError, match="device"):
        esp.reference.attention(q, meta, v, cu, cu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_on_gpu(dtype, gen):
    lens = [1, 7, 33, 257]
    b = random_varlen_batch(lens, 8, 2, 128, generator=gen)
    ref_o, ref_l = naive_attention(b.q, b.k, b.v, lens, lens, True, 128 ** -0.5)
    cu = b.cu_seqlens.cuda()
    out, lse = esp.reference.attention(b.q.to("cuda", dtype), b.k.to("cuda", dtype),
                                       b.v.to("cuda", dtype), cu, cu)
    assert out.dtype == dtype
    assert_close(out.cpu(), ref_o, dtype)
    assert_close(lse.cpu(), ref_l, dtype)
