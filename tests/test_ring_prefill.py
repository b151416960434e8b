"""Striped ring prefill vs the reference on the full batch: gloo processes, virtual ranks, the
Triton step under the interpreter (CPU) and the Triton/Gluon kernels on GPU."""

import gc
import inspect
import math
import weakref

import pytest
import torch

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local, run_steps
from esp_kernels.prefill.step import resolve_backend, ring_step, run_step, step_tiles
from esp_kernels.testing import (assert_close, cu_seqlens, poison_, random_varlen_batch, stripe,
                                 stripe_lengths, unstripe)
from dist_utils import run_gloo

CONFIGS = [(8, 8, 64), (8, 2, 128), (8, 1, 64)]  # (Hq, Hkv, D): GQA 1, 4, 8


def lengths_for(P):
    return [L for L in (1, P - 1, P, P + 1, 97, 1000) if L > 0]


def batch(seed, lens, hq, hkv, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return random_varlen_batch(lens, hq, hkv, d, dtype=dtype, device=device, generator=g)


def ring_order(P):
    return [(3 * i + 1) % P for i in range(P)] if P in (2, 4) else list(range(P))[::-1]


def rank_batches(world, seed):
    """Per config: a ring ordered unlike the world, the batch's lengths and this rank's
    (q, k, v) stripes."""
    P = world.size
    ring = world.subgroup(ring_order(P))
    for hq, hkv, d in CONFIGS:
        lens = lengths_for(P)
        b = batch(seed, lens, hq, hkv, d)
        yield ring, lens, tuple(stripe(t, lens, P)[ring.rank] for t in (b.q, b.k, b.v))


def prefill_rank(world, seed):
    """Per rank: run every config on a ring ordered unlike the world; return its stripes."""
    return [(ring.rank, *esp.ring_prefill(*qkv, lens, ring))
            for ring, lens, qkv in rank_batches(world, seed)]


def check_gathered(per_rank, P, seed):
    for c, (hq, hkv, d) in enumerate(CONFIGS):
        lens = lengths_for(P)
        b = batch(seed, lens, hq, hkv, d)
        parts = sorted((res[c] for res in per_rank), key=lambda x: x[0])
        o = unstripe([p[1] for p in parts], lens)
        lse = unstripe([p[2] for p in parts], lens)
        ref_o, ref_l = esp.reference.attention(b.q.double(), b.k.double(), b.v.double(),
                                               b.cu_seqlens, b.cu_seqlens)
        assert_close(o, ref_o, torch.float32, name=f"out P={P} cfg={hq, hkv, d}")
        assert_close(lse, ref_l, torch.float32, name=f"lse P={P} cfg={hq, hkv, d}")


@pytest.mark.slow
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_prefill_gloo(P):
    check_gathered(run_gloo(P, prefill_rank, 1234 + P), P, 1234 + P)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_prefill_virtual_ranks(P):
    check_gathered(run_local(local_group(P), prefill_rank, [77 + P] * P), P, 77 + P)


def prefill_rank_steps(world, seed):
    """prefill_rank as one step generator per rank (each config's ring in turn)."""
    out = []
    for ring, lens, qkv in rank_batches(world, seed):
        o, lse = yield from esp.prefill.ring_prefill_steps(*qkv, lens, ring)
        out.append((ring.rank, o, lse))
    return out


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_prefill_steps_from_one_thread(P):
    """ring_prefill_steps: every rank's ring advanced from one thread (run_steps) equals the
    reference, and drive() runs it to the same result as ring_prefill on one rank."""
    groups = local_group(P)
    check_gathered(run_steps(groups, [prefill_rank_steps(g, 91 + P) for g in groups]), P, 91 + P)
    if P == 1:
        b = batch(3, [9, 4], 4, 2, 16)
        o, lse = esp.comm.drive(esp.prefill.ring_prefill_steps(b.q, b.k, b.v, [9, 4], groups[0]))
        o2, lse2 = esp.ring_prefill(b.q, b.k, b.v, [9, 4], groups[0])
        assert torch.equal(o, o2) and torch.equal(lse, lse2)


def test_one_runner_runs_one_ring_at_a_time():
    """Two rings on one runner interleaved would share its message buffers: the second one
    raises when it starts, and the runner takes a ring again once the first ends (here closed
    after its first exchange; that world is then left with unmatched messages)."""
    P, lens = 2, [7, 4]
    b = random_varlen_batch(lens, 4, 2, 16, generator=torch.Generator().manual_seed(5))
    groups = local_group(P)
    runners = [esp.RingPrefillRunner(lens, g, 4, 2, 16, torch.float32) for g in groups]
    mine = [tuple(stripe(t, lens, P)[r] for t in (b.q, b.k, b.v)) for r in range(P)]
    first = runners[0].steps(*mine[0])
    next(first)
    with pytest.raises(RuntimeError, match="already running a ring"):
        next(runners[0].steps(*mine[0]))
    first.close()
    again = runners[0].steps(*mine[0])
    assert next(again) is not None  # started: posted its first exchange
    again.close()


def test_a_failed_wait_ends_the_ring_before_the_error_reaches_the_caller():
    """drive() throws a wait's error into the step generator, so the runner's cleanup has run
    when the caller sees it: a retry inside the handler starts a ring (it raised "already
    running a ring" while the first one's generator was still alive); the timeout aborted the
    world, so the retry's first post says so."""
    from esp_kernels.comm import CommAborted, CommTimeout
    g = local_group(2, timeout=0.2)[0]   # rank 1 never joins
    runner = esp.RingPrefillRunner([4], g, 1, 1, 2, torch.float32)
    q = torch.randn(2, 1, 2)
    with pytest.raises(CommAborted, match="because rank 0 failed: CommTimeout"):
        try:
            runner.run(q, q, q)
        except CommTimeout:
            runner.run(q, q, q)  # started, not "already running a ring"
            raise AssertionError("the retry ran to its end without its peer")


def test_ring_prefill_steps_checks_its_arguments_when_called():
    """The one-call checks raise from ring_prefill_steps itself, before any generator runs (a
    rank whose arguments are wrong fails before its peers post anything)."""
    g = local_group(2)[0]
    q = torch.randn(5, 4, 16)
    k = v = torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        esp.prefill.ring_prefill_steps(q, k, v, [8], g)
    with pytest.raises(TypeError, match="share one dtype"):
        esp.prefill.ring_prefill_steps(q, k.half(), v, [10], g)


def test_non_causal_and_scale(gen):
    P, lens = 3, [5, 40]
    b = random_varlen_batch(lens, 4, 2, 64, generator=gen)
    groups = local_group(P)

    def body(g):
        q, k, v = (stripe(t, lens, P)[g.rank] for t in (b.q, b.k, b.v))
        return esp.ring_prefill(q, k, v, lens, g, softmax_scale=0.05, causal=False)

    res = run_local(groups, body)
    o = unstripe([r[0] for r in res], lens)
    ref_o, _ = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens, causal=False,
                                       softmax_scale=0.05)
    assert_close(o, ref_o, torch.float32)


def test_bad_input():
    g = local_group(2)[0]
    lens = [5, 3]
    n = sum(stripe_lengths(lens, 2, 0))
    q, k = torch.randn(n, 4, 64), torch.randn(n, 2, 64)
    with pytest.raises(ValueError, match="q has 3 tokens but rank 0 of 2 holds 5"):
        esp.ring_prefill(q[:3], k[:3], k[:3], lens, g)
    with pytest.raises(ValueError, match="multiple"):
        esp.ring_prefill(q, torch.randn(n, 3, 64), torch.randn(n, 3, 64), lens, g)
    with pytest.raises(TypeError, match="share one dtype"):
        esp.ring_prefill(q, k.half(), k.half(), lens, g)
    with pytest.raises(ValueError, match="head dim"):
        esp.ring_prefill(q, k[..., :32], k[..., :32], lens, g)
    with pytest.raises(ValueError, match="seqlens"):
        esp.ring_prefill(q, k, k, [5, -3], g)
    with pytest.raises(ValueError, match="ring group communicates"):
        esp.ring_prefill(q.to("meta"), k, k, lens, g)
    with pytest.raises(ValueError, match="backend"):
        esp.ring_prefill(q, k, k, lens, g, backend="fast")
    with pytest.raises(ValueError, match="backend='gluon' needs CUDA tensors"):
        esp.ring_prefill(q, k, k, lens, g, backend="gluon")  # the Hopper kernel on CPU tensors


REMOVED = "the compiled CUDA ring-step kernel was removed because it lost to the Gluon and Triton"


def test_removed_cuda_step_backend_says_why_and_what_to_use(monkeypatch, gen):
    """The compiled step kernel ("cuda") was deleted: every door to it raises a ValueError that
    says why and names the backends to use, on any device, before any work."""
    gone = "cuda"  # the removed backend's name (not a device here)
    use = "use 'auto', 'gluon' or 'triton'"
    for dev in ("cpu", "meta"):
        with pytest.raises(ValueError, match=f"backend='cuda' is not available: {REMOVED}") as e:
            resolve_backend(gone, torch.device(dev))
        assert use in str(e.value) and "bench/NOTES.md" in str(e.value)
    args, _ = _step_case(torch.float32, 4, 2, 16, 0, True, gen)
    o, l = args[6].clone(), args[7].clone()
    with pytest.raises(ValueError, match=REMOVED):
        ring_step(*args, backend=gone)
    with pytest.raises(ValueError, match=REMOVED):  # the custom op (what torch.compile calls)
        torch.ops.esp_kernels.ring_step(*args, True, 0, True, 0.25, gone)
    assert torch.equal(args[6], o) and torch.equal(args[7], l), "the state was touched"
    lens = [5, 3]
    g = local_group(1)[0]
    b = batch(0, lens, 4, 2, 16)
    with pytest.raises(ValueError, match=REMOVED):
        esp.ring_prefill(b.q, b.k, b.v, lens, g, backend=gone)
    with pytest.raises(ValueError, match=REMOVED):
        esp.RingPrefillRunner(lens, g, 4, 2, 16, torch.float32, backend=gone)
    monkeypatch.setenv("ESP_PREFILL_BACKEND", gone)
    with pytest.raises(ValueError, match=f"ESP_PREFILL_BACKEND='cuda' is not available: "
                                         f"{REMOVED}") as e:
        esp.ring_prefill(b.q, b.k, b.v, lens, g)
    assert use in str(e.value)
    with pytest.raises(ValueError, match="ESP_PREFILL_BACKEND='cuda'"):
        ring_step(*args)
    monkeypatch.setenv("ESP_PREFILL_BACKEND", "triton")  # a kept backend still resolves
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    monkeypatch.setenv("ESP_PREFILL_BACKEND", "fast")
    with pytest.raises(ValueError, match="ESP_PREFILL_BACKEND must be one of"):
        resolve_backend("auto", torch.device("cpu"))


def test_ring_prefill_runner_prepared_once_run_per_layer():
    """RingPrefillRunner: one batch prepared once (layout, buffers, retention writer), run per
    layer; equal to ring_prefill, checked against its prepared shapes."""
    P, lens = 2, [5, 40, 1]
    layers = [random_varlen_batch(lens, 4, 2, 16, generator=torch.Generator().manual_seed(l))
              for l in range(2)]
    plan = esp.RetentionPlan.fill_first(lens, {1: 8}, 8, request_ids=["a", "b", "c"])
    caches = [esp.PagedKVCache(2, 8, 8, 2, 16, torch.float32, "cpu") for _ in range(P)]

    def body(g, cache):
        runner = esp.RingPrefillRunner(lens, g, 4, 2, 16, torch.float32, retain=(plan, cache))
        outs = []
        for layer, b in enumerate(layers):
            q, k, v = (stripe(t, lens, P)[g.rank] for t in (b.q, b.k, b.v))
            o, lse = runner.run(q, k, v, layer)
            o2, lse2 = esp.ring_prefill(q, k, v, lens, g)
            assert torch.equal(o, o2) and torch.equal(lse, lse2)
            outs.append(o)
        with pytest.raises(ValueError, match="layer is required"):
            runner.run(q, k, v)
        with pytest.raises(ValueError, match=r"k must be \[\d+, 2, 16\]"):
            runner.run(q, k[:, :1], v, 0)
        with pytest.raises(ValueError, match="float32"):
            runner.run(q.double(), k, v, 0)
        return outs

    res = run_local(local_group(P), body, caches)
    for layer, b in enumerate(layers):
        o = unstripe([r[layer] for r in res], lens)
        ref, _ = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens)
        assert_close(o, ref, torch.float32)
        for bi, rid in enumerate(plan.request_ids):  # retained on instance 1 only
            k, v = caches[1].gather(rid, layer)
            start = int(b.cu_seqlens[bi])
            assert torch.equal(k, b.k[start:start + lens[bi]])
            assert torch.equal(v, b.v[start:start + lens[bi]])
            assert caches[0].num_tokens(rid) == 0


def test_one_call_form_frees_its_runner_with_the_ring_handle():
    P, lens = 2, [5, 3]
    b = random_varlen_batch(lens, 2, 1, 8, generator=torch.Generator().manual_seed(0))
    world = local_group(P)
    caches = [esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32, "cpu") for _ in range(P)]
    plan = esp.RetentionPlan.fill_first(lens, {0: 4}, 4, request_ids=["a", "b"])

    def body(g, cache):
        ring = g.subgroup([1, 0])
        q, k, v = (stripe(t, lens, P)[ring.rank] for t in (b.q, b.k, b.v))
        esp.ring_prefill(q, k, v, lens, ring, retain=(plan, cache, 0))
        return weakref.ref(ring)

    rings = run_local(world, body, caches)
    gones = [weakref.ref(c) for c in caches]
    del caches
    gc.collect()
    assert all(r() is None for r in rings) and all(c() is None for c in gones)


def _step_case(dtype, hq, hkv, d, shift, accumulate, gen, device="cpu", lq=None, lk=None,
               causal=True):
    lq = lq or [5, 1, 37, 0, 19, 70]
    lk = lk or [5, 0, 37, 3, 18, 70]
    q = torch.randn(sum(lq), hq, d, generator=gen).to(device, dtype)
    k = torch.randn(sum(lk), hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(sum(lk), hkv, d, generator=gen).to(device, dtype)
    o0 = torch.randn(sum(lq), hq, d, generator=gen).to(device)
    l0 = (torch.randn(sum(lq), hq, generator=gen) * 2).to(device)
    l0.view(-1)[::3] = -math.inf
    o0.view(-1, d)[::3] = 0
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    ref_o, ref_l = o0.clone().double(), l0.clone().double()
    ring_step(q.double(), k.double(), v.double(), cq, ck, max(lq), ref_o, ref_l, mask_shift=shift,
              accumulate=accumulate, softmax_scale=0.3, backend="torch", causal=causal)
    return (q, k, v, cq, ck, max(lq), o0, l0), (ref_o, ref_l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 32), (6, 2, 64), (8, 8, 32)])
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-1, True), (0, True)])
def test_triton_step_interpreter(dtype, hq, hkv, d, shift, accumulate, gen):
    """The Triton step kernel under TRITON_INTERPRET=1 (fp16/fp32: bf16 dot is wrong there)."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter tier runs on CPU machines; the GPU tier covers Triton")
    for causal in (True, False):
        args, (ref_o, ref_l) = _step_case(dtype, hq, hkv, d, shift, accumulate, gen,
                                          causal=causal)
        o, l = args[6], args[7]
        ring_step(*args, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
                  backend="triton", causal=causal)
        assert_close(o, ref_o, dtype)
        assert_close(l, ref_l, torch.float32)


def test_ring_step_wants_a_unit_stride_along_d_for_its_kernels(gen):
    """The step kernels read q, k, v and o_state with a unit stride along D: another stride is an
    error naming the tensor there (it read garbage before), while the torch path takes any."""
    q, k, v = (torch.randn(12, 2, 32, generator=gen)[..., ::2] for _ in range(3))
    cu = [0, 5, 12]
    o, lse = torch.empty(12, 2, 16), torch.empty(12, 2)
    ring_step(q, k, v, cu, cu, 7, o, lse, accumulate=False, backend="torch")
    ref_o, ref_l = esp.reference.attention(q, k, v, cu, cu)
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)
    dense = q.contiguous()
    for name, args in (("q", (q, dense, dense, o)), ("k", (dense, k, dense, o)),
                       ("v", (dense, dense, v, o)),
                       ("o_state", (dense, dense, dense, torch.empty(12, 2, 32)[..., ::2]))):
        with pytest.raises(ValueError, match=f"{name} must have a unit stride along its last"):
            ring_step(*args[:3], cu, cu, 7, args[3], lse, backend="triton")


def test_ring_prefill_takes_q_with_any_strides():
    """ring_prefill hands its kernels a dense copy of a q strided along D (the Triton kernel
    under the interpreter on CPU)."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter tier runs on CPU machines")
    lens = [9, 4]
    b = batch(3, lens, 4, 2, 32)
    wide = torch.zeros(b.q.shape[0], 4, 64)
    wide[..., ::2] = b.q
    g = local_group(1)[0]
    out, lse = esp.ring_prefill(wide[..., ::2], b.k, b.v, lens, g, backend="triton")
    ref_o, ref_l = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens)
    assert_close(out, ref_o, torch.float32)
    assert_close(lse, ref_l, torch.float32)


def test_ring_step_float64_computes_in_float64(gen):
    """The torch path's float64 (reference) steps keep float64 all through."""
    q, k, v = (torch.randn(10, 4, 16, dtype=torch.float64, generator=gen) for _ in range(3))
    cu = [0, 6, 10]
    o = torch.zeros(10, 4, 16, dtype=torch.float64)
    lse = torch.zeros(10, 4, dtype=torch.float64)
    ring_step(q, k, v, cu, cu, 6, o, lse, accumulate=False)
    ref_o, ref_l = esp.reference.attention(q, k, v, cu, cu)
    assert ref_l.dtype == torch.float64
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_l, rtol=1e-12, atol=1e-12)


def test_ring_step_host_offsets_are_checked_and_an_empty_batch_runs():
    q = torch.randn(6, 2, 16)
    o, lse = torch.zeros(6, 2, 16), torch.zeros(6, 2)
    for cu_q, cu_k, match in (([0, 4, 3, 6], [0, 2, 4, 6], "cu_q must be non-decreasing"),
                              ([0, 2, 6], [1, 3, 6], r"cu_k\[0\] must be 0"),
                              ([0, 2, 5], [0, 3, 6], r"cu_q\[-1\] = 5 disagrees")):
        with pytest.raises(ValueError, match=match):
            ring_step(q, q, q, cu_q, cu_k, 6, o, lse)
    with pytest.raises(ValueError, match=r"max_q_len = 3 is less than the longest request of q "
                                         r"\(4 tokens"):
        ring_step(q, q, q, [0, 2, 6], [0, 2, 6], 3, o, lse)
    empty = torch.zeros(0, 2, 16)
    ring_step(empty, empty, empty, [0], [0], 0, empty.clone(), torch.zeros(0, 2))


# ---------------------------------------------------------------- GPU tier

STEP_BACKENDS = ["triton", "gluon"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(8, 8, 64), (32, 8, 128), (16, 2, 128), (6, 2, 64),
                                      (8, 1, 128), (32, 8, 64)])  # the last: Llama-3.2-1B's
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-1, True), (0, True)])
def test_step_kernel_gpu(backend, dtype, hq, hkv, d, shift, accumulate, gen):
    lq = [5, 1, 37, 0, 19, 700, 130]
    lk = [5, 0, 37, 3, 18, 700, 129]
    args, (ref_o, ref_l) = _step_case(dtype, hq, hkv, d, shift, accumulate, gen, "cuda", lq, lk)
    o, l = args[6], args[7]
    ring_step(*args, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
              backend=backend)
    assert not torch.isnan(o).any(), "NaN in output state"
    assert_close(o.cpu(), ref_o.cpu(), dtype)
    assert_close(l.cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)


def _launched_schedules(monkeypatch, gluon_step) -> list:
    """Wrap the Gluon step's launcher: the returned list fills with each launch's `dynamic`
    flag (found by its parameter's name), so a test sees which schedule ran, and that the
    kernel ran."""
    seen = []
    launch = gluon_step._launch
    dynamic = list(inspect.signature(launch).parameters).index("dynamic")

    def record(*args, warmup=False):
        if not warmup:
            seen.append(args[dynamic])
        return launch(*args, warmup=warmup)
    monkeypatch.setattr(gluon_step, "_launch", record)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 1, 64), (8, 8, 64), (32, 8, 64)])
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-1, True), (0, True)])
@pytest.mark.parametrize("lq,lk", [([5, 1, 37, 0, 19, 700, 130], [5, 0, 37, 3, 18, 700, 129]),
                                   ([5, 0, 3000, 1, 700], [5, 3, 3000, 1, 699])])
@pytest.mark.parametrize("schedule", ["snake", "dynamic"])
def test_gluon_step_walks_the_tile_table(hq, hkv, d, shift, accumulate, lq, lk, schedule, gen,
                                         monkeypatch):
    """The Gluon kernel over the host-built tile table (what the ring driver passes), on a
    batch with empty and one-token requests: the same result as the reference, under both
    schedules. The second batch has several items per CTA (an H100 has 132 SMs), so under the
    snake CTAs walk odd rounds backwards and end on a partial round, and under the dynamic
    schedule they take items from the counter until it runs past the last."""
    from esp_kernels.prefill import gluon_step

    monkeypatch.setattr(gluon_step, "DYNAMIC_ROUNDS", 0 if schedule == "dynamic" else 1 << 30)
    launched = _launched_schedules(monkeypatch, gluon_step)
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, hq, hkv, d, shift, accumulate, gen, "cuda",
                                      lq, lk)
    tiles = step_tiles(lq, hq, hkv, "cuda", "gluon")
    assert tiles is not None and tiles.device.type == "cuda"
    o, l = args[6], args[7]
    run_step(*args, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
             backend="gluon", tiles=tiles)
    assert not gluon_step._compile_error, "the Gluon kernel did not compile: Triton ran"
    assert launched == [schedule == "dynamic"], "not one Gluon launch under this schedule"
    assert not torch.isnan(o).any(), "NaN in output state"
    assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)
    assert_close(l.cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-1, True)])
@pytest.mark.parametrize("schedule", ["snake", "dynamic"])
def test_gluon_last_step_writes_the_output(dtype, shift, accumulate, schedule, gen, monkeypatch):
    """run_step(out=...): the Gluon kernel stores the merged o in out's dtype in place of the
    fp32 state; bit for bit the state the same step writes, cast (both round to nearest even),
    with the same lse."""
    from esp_kernels.prefill import gluon_step

    monkeypatch.setattr(gluon_step, "DYNAMIC_ROUNDS", 0 if schedule == "dynamic" else 10 ** 9)
    lq = [5, 1, 3000, 0, 19, 700, 130]
    lk = [5, 0, 3000, 3, 18, 700, 129]
    args, (ref_o, ref_l) = _step_case(dtype, 32, 8, 128, shift, accumulate, gen, "cuda", lq, lk)
    q, o0, l0 = args[0], args[6], args[7]
    tiles = step_tiles(lq, 32, 8, "cuda", "gluon")
    o1, l1 = o0.clone(), l0.clone()
    run_step(*args[:6], o1, l1, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
             backend="gluon", tiles=tiles)
    out = torch.full_like(q, float("nan"))
    o2, l2 = o0.clone(), l0.clone()
    run_step(*args[:6], o2, l2, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
             backend="gluon", tiles=tiles, out=out)
    assert not gluon_step._compile_error, "the Gluon kernel did not compile: Triton ran"
    assert torch.equal(out, o1.to(dtype)) and torch.equal(l2, l1)
    assert_close(out.float().cpu(), ref_o.cpu(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True])
def test_gluon_direct_launch_matches_tritons_launcher(accumulate, gen, monkeypatch):
    """After one launch through Triton's launcher a specialization is launched directly: bit for
    bit the same state, and a launch whose arguments Triton would specialize differently (token
    counts divisible by 16 or not, a misaligned state) goes through Triton's launcher again."""
    from esp_kernels.prefill import gluon_step

    monkeypatch.setattr(gluon_step, "_direct_kernels", {})
    kernel = gluon_step._ring_step_gluon_kernel
    through_triton = []
    run = kernel.run

    def counted(*args, **kwargs):
        if not kwargs.get("warmup"):
            through_triton.append(1)
        return run(*args, **kwargs)
    monkeypatch.setattr(kernel, "run", counted)
    cases = {"odd": ([5, 1, 3000, 0, 19, 700, 130], [5, 0, 3000, 3, 18, 700, 129]),
             "by 16": ([16, 3008, 0, 16, 736], [16, 3008, 3, 18, 736])}  # 3776 / 3781 tokens
    for name in ("odd", "by 16", "odd"):
        lq, lk = cases[name]
        args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, -1, accumulate, gen,
                                          "cuda", lq, lk)
        states = []
        for _ in range(2):
            o, l = args[6].clone(), args[7].clone()
            run_step(*args[:6], o, l, mask_shift=-1, accumulate=accumulate, softmax_scale=0.3,
                     backend="gluon")
            states.append((o, l))
        assert not gluon_step._compile_error, "the Gluon kernel did not compile: Triton ran"
        assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
        assert_close(states[1][0].cpu(), ref_o.cpu(), torch.bfloat16)
    # odd: Triton then direct; by 16: Triton then direct; odd again: direct twice
    assert len(through_triton) == 2 and len(gluon_step._direct_kernels) == 2
    # A state 4 bytes off 16-byte alignment: Triton's launcher once, then direct, each the
    # reference's result.
    lq, lk = cases["odd"]
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, -1, accumulate, gen, "cuda",
                                      lq, lk)
    states = []
    for _ in range(2):
        o = torch.empty(args[6].numel() + 1, device="cuda")[1:].view_as(args[6]).copy_(args[6])
        l = args[7].clone()
        run_step(*args[:6], o, l, mask_shift=-1, accumulate=accumulate, softmax_scale=0.3,
                 backend="gluon")
        assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)
        assert_close(l.cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)
        states.append((o, l))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert not gluon_step.supports(*args[:3], o, l) or \
        (len(through_triton) == 3 and len(gluon_step._direct_kernels) == 3)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 1, 64)])
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-1, True)])
def test_gluon_step_dynamic_schedule_without_a_table(hq, hkv, d, shift, accumulate, gen,
                                                     monkeypatch):
    """Without a tile table the grid's items include tiles past their request's end (nothing to
    attend): under the dynamic schedule the loader posts those without a Q load and the
    consumers hand their buffer back; the result matches the reference."""
    from esp_kernels.prefill import gluon_step

    monkeypatch.setattr(gluon_step, "DYNAMIC_ROUNDS", 0)
    launched = _launched_schedules(monkeypatch, gluon_step)
    lq = [5, 1, 3000, 0, 19, 700, 130]
    lk = [5, 0, 3000, 3, 18, 700, 129]
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, hq, hkv, d, shift, accumulate, gen, "cuda",
                                      lq, lk)
    o, l = args[6], args[7]
    run_step(*args, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
             backend="gluon")
    assert not gluon_step._compile_error, "the Gluon kernel did not compile: Triton ran"
    assert launched == [True], "not one Gluon launch under the dynamic schedule"
    assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)
    assert_close(l.cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)


@pytest.mark.gpu
def test_gluon_dynamic_counter_is_left_at_zero(gen, monkeypatch):
    """Launched steps under the dynamic schedule share one counter per stream, which each launch
    must leave at zero for the next: batches with fewer items than SMs (a grid of one CTA per
    item) and with several rounds, back to back on the current stream and on a side stream,
    each matching the reference; the counters read zero after every launch. A captured step
    replayed twice matches too (graphs zero their own counter)."""
    from esp_kernels.prefill import gluon_step

    monkeypatch.setattr(gluon_step, "DYNAMIC_ROUNDS", 0)
    launched = _launched_schedules(monkeypatch, gluon_step)
    batches = [([5, 1, 37, 0, 19], [5, 0, 37, 3, 18]),       # 7 tiles x 8 KV heads < 132 SMs
               ([5, 0, 3000, 1, 700], [5, 3, 3000, 1, 699]),  # several rounds
               ([130], [129])]
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            for lq, lk in batches:
                args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, -1, True, gen,
                                                  "cuda", lq, lk)
                run_step(*args, mask_shift=-1, accumulate=True, softmax_scale=0.3,
                         backend="gluon", tiles=step_tiles(lq, 32, 8, "cuda", "gluon"))
                torch.cuda.synchronize()
                assert_close(args[6].cpu(), ref_o.cpu(), torch.bfloat16)
                assert_close(args[7].cpu(), ref_l.cpu(), torch.float32,
                             factor=0.1 / 2e-5 * 1e-3)
                counter = gluon_step._dynamic_counter(torch.device("cuda"))
                assert counter.item() == 0, f"counter left at {counter.item()} after {lq}"
    assert not gluon_step._compile_error, "the Gluon kernel did not compile: Triton ran"
    assert launched == [True] * 9, "not nine Gluon launches under the dynamic schedule"

    lq, lk = batches[1]
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, 0, False, gen, "cuda", lq, lk)
    tiles = step_tiles(lq, 32, 8, "cuda", "gluon")

    def step():
        run_step(*args, mask_shift=0, accumulate=False, softmax_scale=0.3, backend="gluon",
                 tiles=tiles)
    step()  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        args[6].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(args[6].cpu(), ref_o.cpu(), torch.bfloat16)
        assert_close(args[7].cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 1, 64), (64, 1, 128)])
@pytest.mark.parametrize("shift,accumulate", [(0, False), (-300, True), (200, True)])
def test_step_kernel_gpu_non_causal_and_long(backend, dtype, hq, hkv, d, shift, accumulate, gen):
    """Many KV blocks per tile (the stage ring wraps several times), shifts that hide or show
    whole blocks, and the non-causal mask (only the ragged tail masked)."""
    lq = [1500, 3, 600, 129]
    lk = [1400, 1, 1100, 257]
    for causal in (True, False):
        args, (ref_o, ref_l) = _step_case(dtype, hq, hkv, d, shift, accumulate, gen, "cuda", lq,
                                          lk, causal=causal)
        o, l = args[6], args[7]
        ring_step(*args, mask_shift=shift, accumulate=accumulate, softmax_scale=0.3,
                  backend=backend, causal=causal)
        assert not torch.isnan(o).any(), f"NaN in output state (causal={causal})"
        assert_close(o.cpu(), ref_o.cpu(), dtype)
        assert_close(l.cpu(), ref_l.cpu(), torch.float32, factor=0.1 / 2e-5 * 1e-3)


@pytest.mark.gpu
def test_gluon_step_takes_the_hopper_cases():
    """The Gluon backend's tests above must run the Gluon kernel, not its Triton fallback."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon step kernel is for sm_90 (Hopper)")
    from esp_kernels.prefill.gluon_step import supports

    def qkv(hq, hkv, d, dtype=torch.bfloat16, t=64):
        return (torch.empty(t, hq, d, device="cuda", dtype=dtype),
                torch.empty(t, hkv, d, device="cuda", dtype=dtype),
                torch.empty(t, hkv, d, device="cuda", dtype=dtype))

    assert supports(*qkv(32, 8, 128)) and supports(*qkv(8, 8, 64)) and supports(*qkv(8, 1, 128))
    assert supports(*qkv(32, 8, 128, torch.float16))
    assert not supports(*qkv(6, 2, 64))                      # group of 3
    assert not supports(*qkv(32, 8, 128, torch.float32))
    assert not supports(*qkv(8, 8, 96))
    assert not supports(*qkv(8, 8, 64)[:1] + qkv(8, 8, 64, t=0)[1:])  # no keys
    q, k, v = qkv(8, 4, 64)
    assert not supports(q, k[:, ::2], v[:, ::2])             # heads not contiguous
    state64 = torch.empty(64, 8, 64, device="cuda", dtype=torch.float64)
    assert not supports(q, k, v, state64, state64[..., 0])   # a float64 state (references)
    from esp_kernels.prefill import gluon_step
    assert not gluon_step._compile_error, "the Gluon kernel failed to compile: tests ran Triton"


@pytest.mark.gpu
def test_gluon_step_that_cannot_compile_warns_and_runs_triton(monkeypatch, gen):
    """A Triton whose Gluon cannot build the kernel: one warning, then the Triton twin's result
    (this call and every later one)."""
    import ast

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon step kernel is for sm_90 (Hopper)")
    from triton.compiler.errors import CompilationError

    from esp_kernels.prefill import gluon_step

    def broken(*args, **kwargs):
        raise CompilationError(None, ast.parse("x").body[0], "simulated API drift")

    monkeypatch.setattr(gluon_step, "_launch", broken)
    monkeypatch.setattr(gluon_step, "_compile_error", [])
    monkeypatch.setattr(gluon_step, "_compiled", set())
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, 0, True, gen, "cuda")
    o = args[6]
    with pytest.warns(RuntimeWarning, match="does not compile"):
        ring_step(*args, mask_shift=0, accumulate=True, softmax_scale=0.3, backend="gluon")
    assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)
    assert not gluon_step.supports(args[0], args[1], args[2])  # later calls go to Triton


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_kernel_overwrites_poisoned_state(backend, gen):
    args, (ref_o, ref_l) = _step_case(torch.bfloat16, 32, 8, 128, -1, False, gen, "cuda")
    o, l = poison_(args[6]), poison_(args[7])
    ring_step(*args, mask_shift=-1, accumulate=False, softmax_scale=0.3, backend=backend)
    assert not torch.isnan(o).any() and not torch.isnan(l).any()
    assert_close(o.cpu(), ref_o.cpu(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_prefill_virtual_ranks_gpu(backend, P, dtype):
    lens = lengths_for(P) + [4099]
    b = batch(5 + P, lens, 32, 8, 128, dtype=dtype, device="cuda")
    groups = local_group(P, "cuda")
    rings = [g.subgroup(ring_order(P)) for g in groups]

    def body(ring):
        q, k, v = (stripe(t, lens, P)[ring.rank] for t in (b.q, b.k, b.v))
        return ring.rank, esp.ring_prefill(q, k, v, lens, ring, backend=backend)

    res = sorted(run_local(rings, body), key=lambda x: x[0])
    o = unstripe([r[1][0] for r in res], lens)
    lse = unstripe([r[1][1] for r in res], lens)
    ref_o, ref_l = esp.reference.attention(b.q.float(), b.k.float(), b.v.float(), b.cu_seqlens,
                                           b.cu_seqlens)
    assert_close(o.float(), ref_o, dtype)
    assert_close(lse, ref_l, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("P", [2, 4])
def test_ring_prefill_steps_virtual_ranks_gpu(backend, P):
    """Every rank's ring advanced from one thread: the ranks' steps and copies interleave on
    their streams as run_steps resumes them; equal to run_local's ring_prefill bit for bit."""
    lens = lengths_for(P) + [4099]
    b = batch(21 + P, lens, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    groups = local_group(P, "cuda")
    rings = [g.subgroup(ring_order(P)) for g in groups]
    mine = [tuple(stripe(t, lens, P)[ring.rank] for t in (b.q, b.k, b.v)) for ring in rings]
    res = run_steps(rings, [esp.prefill.ring_prefill_steps(*mine[i], lens, rings[i],
                                                            backend=backend)
                             for i in range(P)])
    threads = run_local(rings, lambda ring, qkv: esp.ring_prefill(*qkv, lens, ring,
                                                                  backend=backend), mine)
    by_rank = sorted(zip((r.rank for r in rings), res), key=lambda x: x[0])
    o = unstripe([r[1][0] for r in by_rank], lens)
    lse = unstripe([r[1][1] for r in by_rank], lens)
    ref_o, ref_l = esp.reference.attention(b.q.float(), b.k.float(), b.v.float(), b.cu_seqlens,
                                           b.cu_seqlens)
    assert_close(o.float(), ref_o, torch.bfloat16)
    assert_close(lse, ref_l, torch.bfloat16)
    for (o1, l1), (o2, l2) in zip(res, threads):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_ring_prefill_64k_gpu(backend):
    """64k tokens on 4 virtual ranks; checked on sampled query rows against the reference."""
    P, L = 4, 65536
    b = batch(11, [L], 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    groups = local_group(P, "cuda")

    def body(ring):
        q, k, v = (stripe(t, [L], P)[ring.rank] for t in (b.q, b.k, b.v))
        return esp.ring_prefill(q, k, v, [L], ring, backend=backend)

    res = run_local(groups, body)
    o = unstripe([r[0] for r in res], [L])
    rows = torch.tensor([0, 1, 5, 4097, 30000, 65534, 65535], device="cuda")
    ref_o, _ = esp.reference.attention(b.q[rows].float(), b.k.float(), b.v.float(),
                                       cu_seqlens([rows.numel()], "cuda"), cu_seqlens([L], "cuda"),
                                       q_positions=rows, k_positions=torch.arange(L, device="cuda"))
    assert_close(o[rows].float(), ref_o, torch.bfloat16)
