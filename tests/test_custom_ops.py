"""torch.library registration of the public ops: schemas and fake implementations (opcheck), and
torch.compile(fullgraph=True) of a function calling the ring step, decode partial, copy_rows and
the merges: it traces without a graph break, every op is one node of the graph, and the compiled
function matches eager (CPU with the eager / aot_eager backends; CUDA with inductor)."""

import math

import pytest
import torch

import esp_kernels as esp
from esp_kernels.kvcache import copy_rows
from esp_kernels.prefill.step import ring_step
from esp_kernels.testing import cu_seqlens, random_paged_cache

OPS = esp.ops.OPS


def inputs(gen, device="cpu", dtype=torch.float32, hq=4, hkv=2, d=16, page_size=4):
    lens = [5, 9]
    T = sum(lens)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    cache = random_paged_cache(gen, lens, 8, page_size, hkv, d, dtype, device)
    k_c, v_c = cache.layer(0)
    bt, kl = cache.block_table([0, 1])
    return dict(q=rnd(T, hq, d), k=rnd(T, hkv, d), v=rnd(T, hkv, d), cu=cu_seqlens(lens, device),
                max_len=max(lens), qd=rnd(len(lens), hq, d), k_c=k_c, v_c=v_c, bt=bt, kl=kl,
                rows=cache.slot_rows(0),
                idx=torch.tensor([3, 0, 5], dtype=torch.int32, device=device))


def layer(x, backend):
    """One of everything: a ring step (write then accumulate), decode partial merged with a
    second state, the multi-state merge, and a row copy into a fresh buffer."""
    q, k, v, cu = x["q"], x["k"], x["v"], x["cu"]
    o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    ring_step(q, k, v, cu, cu, x["max_len"], o, lse, accumulate=False, backend=backend)
    ring_step(q, k * 0.5, v, cu, cu, x["max_len"], o, lse, mask_shift=-1, backend=backend)
    od, ld = esp.decode_partial(x["qd"], x["k_c"], x["v_c"], x["bt"], x["kl"],
                                backend="torch" if backend == "torch" else "auto")
    om, lm = esp.merge_states(od, ld, od * 2, ld - 1.0)
    esp.merge_states_(om, lm, od, ld)
    o3, l3 = esp.merge_states_multi(torch.stack([om, od]), torch.stack([lm, ld]))
    rows = torch.zeros(2, 3, x["rows"].shape[2], dtype=x["rows"].dtype, device=q.device)
    copy_rows(x["rows"], x["idx"], rows, None)
    return o + 1.0, lse, o3, l3, rows


def graph_ops(fn, *args):
    """Compile fn with a backend that records the graph's call targets; returns (result, ops)."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=record, fullgraph=True)(*args)
    return out, seen


def assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("name", OPS)
def test_ops_are_registered_with_mutation_annotations(name):
    schema = getattr(torch.ops.esp_kernels, name).default._schema
    assert schema.returns == [] and any(a.alias_info is not None and a.alias_info.is_write
                                        for a in schema.arguments), str(schema)


def test_opcheck(gen):
    """Schema, fake implementation, functionalization (aot_dispatch) of each op on CPU."""
    x = inputs(gen)
    q, k, v, cu = x["q"], x["k"], x["v"], x["cu"]
    o, lse = torch.zeros(q.shape), torch.full(q.shape[:2], -math.inf)
    od, ld = torch.empty(x["qd"].shape), torch.empty(x["qd"].shape[:2])
    samples = {
        "ring_step": (q, k, v, cu, cu, x["max_len"], o, lse, True, 0, False, 0.25, "torch"),
        "decode_partial": (x["qd"], x["k_c"], x["v_c"], x["bt"], x["kl"], od, ld, None, None,
                           None, 0.25, False, "torch"),
        "merge_states_out": (od + 1, ld.clone().normal_(), od, ld.clone().normal_(),
                             torch.empty_like(od), torch.empty_like(ld), "auto"),
        "merge_states_": (od + 1, ld.clone().normal_(), od, ld.clone().normal_(), "auto"),
        "merge_states_multi_out": (torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4),
                                   torch.empty(2, 4, 16), torch.empty(2, 4), "auto"),
        "copy_rows": (x["rows"], x["idx"], torch.zeros(2, 3, x["rows"].shape[2]), None, "auto"),
    }
    assert set(samples) == set(OPS)
    for name, args in samples.items():
        torch.library.opcheck(getattr(torch.ops.esp_kernels, name), args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_compile_traces_every_op_without_graph_breaks(gen):
    x = inputs(gen)
    out, targets = graph_ops(layer, x, "torch")
    for name in ("ring_step", "decode_partial", "merge_states_out", "merge_states_",
                 "merge_states_multi_out", "copy_rows"):
        assert sum(t in (f"esp_kernels.{name}", f"esp_kernels.{name}.default")
                   for t in targets) == (
            2 if name == "ring_step" else 1), (name, targets)
    assert_same(out, layer(x, "torch"))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_matches_eager_cpu(compile_backend, gen):
    x = inputs(gen)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=compile_backend, fullgraph=True)
    assert_same(compiled(x, "torch"), layer(x, "torch"))


def test_compiled_triton_step_interpreter(gen):
    """The Triton ring step inside a compiled graph (interpreter on CPU, fp32)."""
    if torch.cuda.is_available():
        pytest.skip("CPU test of the Triton interpreter; the GPU test compiles the real kernels")
    pytest.importorskip("triton")
    x = inputs(gen)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_same(compiled(x, "triton"), layer(x, "torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_matches_eager_cuda(backend, dtype, gen):
    x = inputs(gen, "cuda", dtype, hq=8, hkv=2, d=64, page_size=16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # inductor
    got, want = compiled(x, backend), layer(x, backend)
    for a, b in zip(got, want):
        # Same kernels either way; the decode splits share tiles through a counter, so allow
        # last-bit differences of its fp32 sums.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _, targets = graph_ops(layer, x, backend)
    assert sum(t.startswith("esp_kernels.") for t in targets) == 7, targets
