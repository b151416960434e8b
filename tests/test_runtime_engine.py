"""The runtime's parts: central append targets (DecodePlan.allocate_appends), the checkpoint
loader, one Engine per process over torch.distributed (gloo), and the demo."""

from __future__ import annotations

import pytest
import torch

import esp_kernels as esp
from esp_kernels.runtime import Engine, LlamaAdapter, VirtualCluster
from esp_kernels.runtime.llama import PRESETS
from dist_utils import run_gloo
from runtime_fakes import Script


def test_allocate_appends_follows_central_targets():
    caches = [esp.PagedKVCache(1, 4, 4, 1, 8, torch.float32, "cpu") for _ in range(2)]
    caches[0].allocate("a", range(0, 5))
    caches[1].allocate("a", range(5, 8))
    caches[1].allocate("b", range(0, 4))
    plan = esp.DecodePlan(["a", "b"], [0, 1], [{0: 5, 1: 3}, {1: 4}], append_to=[1, 0])
    # The plan is data: shards stay the KV before the step, the slots live in the caches.
    assert plan.allocate_appends(caches[0], 0) is plan
    assert plan.allocate_appends(caches[1], 1) is plan
    assert plan.shards == ({0: 5, 1: 3}, {1: 4}) and plan.append_to == (1, 0)
    assert plan.kv_shards(0) == {0: 5, 1: 4} and plan.kv_shards(1) == {0: 1, 1: 4}
    assert caches[0].positions("b").tolist() == [4]
    assert caches[1].positions("a").tolist() == [5, 6, 7, 8]
    assert caches[1].last_token("a") == (8, int(caches[1].slots("a")[-1]))
    assert plan.reserve(caches[1], 1) == {"a": int(caches[1].slots("a")[-1])}  # idempotent
    # All or nothing: instance 0 has 1 free page left after b's; two new requests need two.
    full = esp.DecodePlan(["c", "d"], [0, 0], [{}, {}], append_to=[0, 0])
    before = caches[0].stats()
    with pytest.raises(esp.CacheOutOfMemory):
        full.allocate_appends(caches[0], 0)
    assert caches[0].stats() == before
    with pytest.raises(ValueError, match="append_to has 1 entries for 2"):
        esp.DecodePlan(["a", "b"], [0, 1], [{}, {}], append_to=[0])


def _hf_tiny(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tie,
                                   initializer_range=0.1, eos_token_id=None, pad_token_id=0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_from_dir_equals_from_hf(tmp_path, tie):
    pytest.importorskip("safetensors")
    model = _hf_tiny(tie)
    model.save_pretrained(tmp_path)
    a, b = LlamaAdapter.from_hf(model), LlamaAdapter.from_dir(str(tmp_path))
    assert b.config["model_type"] == "qwen2" and b.dtype == torch.float32
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaAdapter.from_dir(str(tmp_path / "missing"))


def test_adapter_rejects_other_families():
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        LlamaAdapter({"model_type": "gpt2"}, {})


def _plans():
    s = Script(3, {"a": (11, 5), "b": (2, 3)})
    s.iteration(prefills=[((2, 0, 1), {"a": ((0, 0, 6), (1, 6, 11)), "b": 2})])
    s.iteration(decodes=[({"a": 2, "b": 0}, {"b": 1})])
    s.iteration(migrations=[("a", 0, 6, 0, 2)], decodes=[({"a": 1, "b": 1}, {})])
    s.iteration(preempt=["a"], prefills=[((1, 0), {"a": ((0, 0, 7), (1, 7, 14))})])
    s.iteration(decodes=[({"a": 0}, {"a": 2})])
    return s.plans


PROMPTS = {"a": [5, 9, 1, 33, 2, 7, 40, 41, 3, 3, 8], "b": [17, 4]}
MAX_NEW = {"a": 5, "b": 3}


def _serve_in_process(group):
    """One process = one instance: the same Engine code as VirtualCluster's, over gloo."""
    adapter = LlamaAdapter.random(PRESETS["tiny"], seed=5)
    engine = Engine.create(group, adapter, 64, 4)
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, MAX_NEW[rid])
    for plan in _plans():
        engine.execute(plan)
    return {rid: st.generated for rid, st in engine.requests.items()}


def test_engine_per_process_over_gloo_equals_virtual_instances():
    got = run_gloo(3, _serve_in_process)
    cluster = VirtualCluster(LlamaAdapter.random(PRESETS["tiny"], seed=5), 3, 64, 4)
    for rid, p in PROMPTS.items():
        cluster.add_request(rid, p, MAX_NEW[rid])
    for plan in _plans():
        cluster.execute(plan)
    want = {rid: cluster.state(rid).generated for rid in PROMPTS}
    assert all(len(want[r]) == MAX_NEW[r] for r in PROMPTS)
    assert got == [want] * 3


def test_demo_runs_or_says_why(capsys):
    from esp_kernels.demo import run_demo
    try:
        import esp_kernels.scheduler  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="scheduler .* is not available"):
            run_demo("cpu", requests=4)
        return
    pytest.importorskip("transformers")
    assert run_demo("cpu", instances=3, requests=8, timeline_path=None) == 0
    out = capsys.readouterr().out
    assert "PASS: 8/8 outputs match transformers" in out and "TTFT p50=" in out


def test_sliding_window_models_are_served_up_to_their_window():
    cfg = dict(PRESETS["tiny"], model_type="mistral", sliding_window=8)
    adapter = LlamaAdapter.random(cfg)
    assert adapter.max_len == 8
    cluster = VirtualCluster(adapter, 1, 32, 4)
    cluster.add_request("ok", [1] * 5, 4)                     # 5 + 4 - 1 = 8 tokens
    with pytest.raises(ValueError, match="sliding window"):
        cluster.add_request("long", [1] * 6, 4)
    qwen = dict(cfg, model_type="qwen2", use_sliding_window=False)
    assert LlamaAdapter.random(qwen).max_len is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_hf_rotate_half_bit_for_bit(dtype):
    from esp_kernels.runtime.rope import apply_rope, rope_tables
    g = torch.Generator().manual_seed(0)
    x, cos, sin = (torch.randn(*s, generator=g).to(dtype) for s in ((9, 3, 16), (9, 16),
                                                                  (9, 16)))
    hf = x * cos[:, None] + torch.cat((-x[..., 8:], x[..., :8]), -1) * sin[:, None]
    assert torch.equal(apply_rope(x, rope_tables(cos, sin)), hf)


class _CountingExecutor:
    """Serves any plan: one token per request of each batch; counts its iterations."""

    def __init__(self):
        self.iterations, self.left = 0, {}

    def add_request(self, rid, prompt, max_new_tokens, sampling=None):
        self.left[rid] = max_new_tokens

    def execute(self, plan):
        from types import SimpleNamespace
        self.iterations += 1
        tokens, finished = {}, []
        for batch in plan.batches:
            for rid in batch.requests:
                tokens[rid] = 7
                self.left[rid] -= 1
                if not self.left[rid]:
                    finished.append(rid)
        return SimpleNamespace(tokens=tokens, eos=[], finished=finished)


def test_serve_on_a_logical_clock_jumps_idle_gaps():
    """A clock counting iterations (what processes share) does not move while the loop waits
    for an arrival: time jumps to it (the loop slept on wall seconds and never saw it come)."""
    from esp_kernels.runtime.serve import Arrival, serve
    from esp_kernels.scheduler import CostModel, ESPScheduler

    ex = _CountingExecutor()
    waits = []
    res = serve(ex, ESPScheduler(2, 4096, CostModel.default(), page_size=16),
                [Arrival("a", (1,) * 10, 2, 0.0), Arrival("b", (1,) * 10, 2, 2.05)],
                clock=lambda: float(ex.iterations), sleep=waits.append, max_iterations=50)
    assert waits == [pytest.approx(0.05)]  # the gap after 'a' finished (2 iterations)
    assert (res.requests["a"].first_token, res.requests["a"].finish) == (1.0, 2.0)
    assert (res.requests["b"].first_token, res.requests["b"].finish) == pytest.approx((3.05, 4.05))
    assert ex.iterations == 4 and res.wall == pytest.approx(4.05)
