"""DLPack / __cuda_array_interface__ inputs at the op level (merge_states, merge_states_,
decode_partial, copy_rows, ring step): arrays of other libraries are used without a copy
(in-place writes land in the caller's arrays) and results come back as the caller's kind.
CPU: NumPy through DLPack on the torch paths; GPU: CuPy (skipped with a reason when absent)."""

import math

import numpy as np
import pytest
import torch

import esp_kernels as esp
from esp_kernels.kvcache import copy_rows
from esp_kernels.prefill.step import ring_step
from esp_kernels.testing import cu_seqlens, random_paged_cache


def case(gen, dtype=torch.float32, d=16):
    lens, hq, hkv = [3, 6], 4, 2
    T = sum(lens)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    cache = random_paged_cache(gen, lens, 8, 4, hkv, d, dtype)
    k_c, v_c = cache.layer(0)
    bt, kl = cache.block_table([0, 1])
    return dict(q=rnd(T, hq, d), k=rnd(T, hkv, d), v=rnd(T, hkv, d), cu=cu_seqlens(lens),
                max_len=max(lens), o=torch.randn(T, hq, d, generator=gen),
                lse=torch.randn(T, hq, generator=gen), qd=rnd(2, hq, d), k_c=k_c, v_c=v_c,
                bt=bt, kl=kl, o_a=torch.randn(5, 3, 8, generator=gen),
                l_a=torch.randn(5, 3, generator=gen), o_b=torch.randn(5, 3, 8, generator=gen),
                l_b=torch.randn(5, 3, generator=gen), rows=torch.randn(2, 10, 6, generator=gen),
                idx=torch.tensor([4, -1, 0], dtype=torch.int32))


def run_all(x, conv, kind, device_backend):
    """Every op on conv(...) views of the case; checks result kinds; returns torch copies.
    `device_backend` is the ring step's backend; the other ops take "torch" with it, else
    "auto"."""
    op_backend = "torch" if device_backend == "torch" else "auto"
    a = {n: conv(t) for n, t in x.items() if isinstance(t, torch.Tensor)}
    back = lambda r: torch.from_dlpack(r) if not isinstance(r, torch.Tensor) else r
    res = {}
    o, lse = esp.merge_states(a["o_a"], a["l_a"], a["o_b"], a["l_b"])
    assert isinstance(o, kind) and isinstance(lse, kind)
    res["merge"] = (back(o).clone(), back(lse).clone())
    o_in, l_in = conv(x["o_a"].clone()), conv(x["l_a"].clone())
    ro, rl = esp.merge_states_(o_in, l_in, a["o_b"], a["l_b"])
    assert ro is o_in and rl is l_in, "an in-place result is the caller's own array"
    res["merge_"] = (back(o_in).clone(), back(l_in).clone())
    od, ld = esp.decode_partial(a["qd"], a["k_c"], a["v_c"], a["bt"], a["kl"],
                                backend=op_backend)
    assert isinstance(od, kind) and isinstance(ld, kind)
    res["decode"] = (back(od).clone(), back(ld).clone())
    dst = conv(torch.zeros(2, 3, 6, device=x["rows"].device))
    assert copy_rows(a["rows"], a["idx"], dst, None) is None
    res["copy"] = (back(dst).clone(),)
    o_s, l_s = conv(x["o"].clone()), conv(x["lse"].clone())
    ring_step(a["q"], a["k"], a["v"], a["cu"], a["cu"], x["max_len"], o_s, l_s,
              mask_shift=-1, backend=device_backend)
    res["ring_step"] = (back(o_s).clone(), back(l_s).clone())
    return res


def assert_same_results(got, want):
    for name in want:
        for g, w in zip(got[name], want[name]):
            torch.testing.assert_close(g.cpu(), w.cpu(), msg=name)


def test_numpy_through_dlpack(gen):
    x = case(gen)
    want = run_all(x, lambda t: t, torch.Tensor, "torch")
    got = run_all(x, lambda t: t.numpy(), np.ndarray, "torch")
    assert_same_results(got, want)
    assert not torch.equal(got["ring_step"][0], x["o"]), "the step did not write the caller's array"


def test_numpy_inputs_are_not_copied(gen):
    x = case(gen)
    o_a = x["o_a"].numpy().copy()
    l_a = x["l_a"].numpy().copy()
    ref = esp.merge_states(x["o_a"], x["l_a"], x["o_b"], x["l_b"])
    out = np.empty_like(o_a)
    r = esp.merge_states(o_a, l_a, x["o_b"].numpy(), x["l_b"].numpy(), out=out)  # mixed kinds
    assert r[0] is out and isinstance(r[1], np.ndarray)
    torch.testing.assert_close(torch.from_numpy(out), ref[0])
    # a view of a bigger array: the write lands in the parent
    parent = np.zeros((2, 5, 3, 8), dtype=np.float32)
    esp.merge_states(o_a, l_a, o_a, l_a, out=parent[1])
    assert np.array_equal(parent[1], o_a) and not parent[0].any()


class DLPackOnly:
    """An array that only speaks DLPack, from a library with no from_dlpack of its own."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack__(self, **kw):
        return self.arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()


def test_dlpack_only_arrays_in_place_and_unreturnable_results():
    src = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    dst = np.zeros((2, 2, 4), np.float32)
    copy_rows(DLPackOnly(src), DLPackOnly(np.array([2, 0], np.int32)), DLPackOnly(dst), None)
    assert np.array_equal(dst, src[:, [2, 0]])
    lse = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="cannot hand a result back as DLPackOnly"):
        esp.merge_states(*(DLPackOnly(a) for a in (src, lse, src, lse)))


def test_non_array_arguments_still_rejected_clearly():
    with pytest.raises(TypeError, match="o_a must be a torch.Tensor, got list"):
        esp.merge_states([[1.0]], None, None, None)


# ---------------------------------------------------------------- GPU tier


def _cupy():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed (the GPU machine has cupy-cuda13x)")
    return cupy


class CudaArrayOnly:
    """An array that only exposes __cuda_array_interface__ (like numba's device arrays)."""

    def __init__(self, arr):
        self._arr = arr
        self.__cuda_array_interface__ = arr.__cuda_array_interface__


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_cupy_arrays(backend, gen):
    cupy = _cupy()
    x = case(gen, torch.float16, d=64)  # the Gluon step and decode kernels take D 64 and 128
    x = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in x.items()}
    want = run_all(x, lambda t: t, torch.Tensor, backend)
    got = run_all(x, cupy.from_dlpack, cupy.ndarray, backend)
    assert_same_results(got, want)


@pytest.mark.gpu
def test_cupy_decode_kernel_and_cuda_array_interface(gen):
    cupy = _cupy()
    cache = esp.PagedKVCache(1, 16, 16, 2, 128, torch.float16, "cuda")
    cache.allocate("r", range(100))
    k, v = cache.layer(0)
    k.normal_()
    v.normal_()
    bt, kl = cache.block_table(["r"])
    q = torch.randn(1, 8, 128, device="cuda", dtype=torch.float16)
    want = esp.decode_partial(q, k, v, bt, kl, deterministic=True)
    got = esp.decode_partial(*(cupy.from_dlpack(t) for t in (q, k, v, bt, kl)),
                             deterministic=True)
    assert all(isinstance(r, cupy.ndarray) for r in got)
    torch.testing.assert_close(torch.from_dlpack(got[0]), want[0])
    # __cuda_array_interface__ only: in-place writes reach the caller's memory
    src = cupy.arange(2 * 5 * 4, dtype=cupy.float32).reshape(2, 5, 4)
    dst = cupy.zeros((2, 2, 4), dtype=cupy.float32)
    idx = cupy.asarray([4, 1], dtype=cupy.int32)
    copy_rows(CudaArrayOnly(src), CudaArrayOnly(idx), CudaArrayOnly(dst), None)
    torch.cuda.synchronize()
    assert bool((dst == src[:, [4, 1]]).all())
    o = cupy.empty((3, 2, 8), dtype=cupy.float32)
    l = cupy.empty((3, 2), dtype=cupy.float32)
    a = cupy.random.randn(3, 2, 8, dtype=cupy.float32)
    la = cupy.random.randn(3, 2, dtype=cupy.float32)
    out, lse_out = CudaArrayOnly(o), CudaArrayOnly(l)
    ro, rl = esp.merge_states(CudaArrayOnly(a), CudaArrayOnly(la), CudaArrayOnly(a),
                              CudaArrayOnly(la), out=out, lse_out=lse_out)
    assert ro is out and rl is lse_out
    torch.cuda.synchronize()
    assert bool(cupy.allclose(o, a)) and bool(cupy.allclose(l, la + math.log(2)))
