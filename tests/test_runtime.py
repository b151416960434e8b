"""The runtime against Hugging Face transformers: greedy tokens identical in fp32 (CPU tier).

Tiny random-init Llama / Qwen2 / Mistral models built here (no downloads) are served by
VirtualCluster engines executing hand-made iteration plans (tests/runtime_fakes.py) that force
every elastic mechanism: prompts shorter than the ring, a reordered ring, retention spread over
several instances, scale-up spills, masters without KV, a migration, a preemption with recompute,
and a ring of one; then by the real ESPScheduler when it is importable.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp_kernels.runtime import (Arrival, LlamaAdapter, SamplingParams, VirtualCluster, sample,
                                 serve)
from esp_kernels.runtime.sampling import _draw
from runtime_fakes import Script, ScriptedScheduler, random_plans

transformers = pytest.importorskip("transformers", reason="runtime tests compare against "
                                   "transformers (pip install transformers)")

VOCAB = 128


def tiny_model(family="llama", seed=0, **overrides):
    """A random-init HF causal LM (fp32, eval) of the given family; init std 0.1 so that greedy
    tokens are well separated (std 0.02 leaves near-ties among the logits)."""
    cfgs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM"}[family])(cfgs[family](**kw))
    return model.eval()


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def prompts_for(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {rid: torch.randint(0, VOCAB, (L,), generator=g).tolist()
            for rid, L in lengths.items()}


def serve_plans(adapter, num_instances, plans, prompts, max_new, kv_slots=96, page_size=4,
                sampling=None, sampler=sample):
    cluster = VirtualCluster(adapter, num_instances, kv_slots, page_size, sampler=sampler,
                             timeout=30)   # a failing instance fails its peers in 30 s
    work = [Arrival(rid, tuple(p), max_new[rid], 0.0, sampling) for rid, p in prompts.items()]
    res = serve(cluster, ScriptedScheduler(plans), work)
    return {rid: rec.tokens for rid, rec in res.requests.items()}, cluster


def elastic_script(lengths, max_new):
    """Seven iterations over 4 instances using every mechanism (see the comments)."""
    s = Script(4, {rid: (lengths[rid], max_new[rid]) for rid in lengths})
    # 0: reordered ring (2, 0, 3, 1); c (3 tokens) and d (1 token) are shorter than the ring;
    #    a's KV is kept on two instances, neither of them the rank sampling it.
    s.iteration(prefills=[((2, 0, 3, 1), {"a": ((0, 0, 5), (3, 5, 13)), "b": 1, "c": 2,
                                          "d": 0})])
    # 1: one decode batch, masters on the holders (a's master 0 holds 5 of its 13 tokens).
    s.iteration(decodes=[({"a": 0, "b": 1, "c": 2, "d": 0}, {})])
    # 2: a migration (every token of a on 0: positions 0-4 and 13), then a scale-up spill: a's
    #    new token goes to 1, which holds none of it, while its master 3 holds part.
    s.iteration(migrations=[("a", 0, 14, 0, 2)],
                decodes=[({"a": 3, "b": 1, "c": 2, "d": 0}, {"a": 1})])
    # 3: b is preempted (3 tokens generated, KV freed), e prefills on a ring of 2 with retention
    #    on both, c decodes alone with its token spilling onto 0.
    s.iteration(preempt=["b"], prefills=[((1, 3), {"e": ((1, 0, 10), (3, 10, 21))})],
                decodes=[({"c": 2}, {"c": 0})])
    # 4: b recomputed over prompt + 3 generated tokens on a ring of one; a and e decode on
    #    (1, 2, 3) with two masters.
    s.iteration(prefills=[((0,), {"b": 0})], decodes=[({"a": 3, "e": 1}, {})])
    # 5: everything left in one batch over all instances.
    s.iteration(decodes=[({"a": 2, "b": 0, "e": 3}, {})])
    # 6: both remaining requests mastered by 1, e's token spilling onto 0.
    s.iteration(decodes=[({"a": 1, "e": 1}, {"e": 0})])
    assert s.finished == set(lengths), f"script leaves {set(lengths) - s.finished} unfinished"
    return s.plans


LENGTHS = {"a": 13, "b": 7, "c": 3, "d": 1, "e": 21}
MAX_NEW = {"a": 6, "b": 5, "c": 4, "d": 3, "e": 4}


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("qwen2", {}),                                                 # q/k/v biases
    ("mistral", {"num_key_value_heads": 1}),                       # GQA 4:1
    ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
])
def test_elastic_plan_matches_hf_greedy(family, extra):
    model = tiny_model(family, **extra)
    prompts = prompts_for(LENGTHS)
    got, cluster = serve_plans(LlamaAdapter.from_hf(model), 4,
                               elastic_script(LENGTHS, MAX_NEW), prompts, MAX_NEW)
    for rid, p in prompts.items():
        assert got[rid] == hf_greedy(model, p, MAX_NEW[rid]), f"request {rid}"
    assert cluster.state("b").recomputes == 1
    for e in cluster.engines:   # every request finished: all KV freed
        assert e.cache.stats().used_tokens == 0


def test_ring_members_without_tokens():
    """A 2-token prompt on a ring of 4: ring ranks 2 and 3 (instances 0 and 2) hold no token,
    and instance 0 still keeps the whole KV for decode."""
    model = tiny_model(seed=9)
    prompts = prompts_for({"s": 2}, seed=10)
    s = Script(4, {"s": (2, 3)})
    s.iteration(prefills=[((3, 1, 0, 2), {"s": 0})])
    s.iteration(decodes=[({"s": 2}, {"s": 3})])
    s.iteration(decodes=[({"s": 0}, {})])
    got, _ = serve_plans(LlamaAdapter.from_hf(model), 4, s.plans, prompts, {"s": 3})
    assert got["s"] == hf_greedy(model, prompts["s"], 3)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_instances=st.integers(1, 4))
def test_random_elastic_plans_match_hf_greedy(seed, num_instances):
    """Random valid plan sequences (rings of any order and size, random retention ranges,
    masters, spills, migrations, preemptions) serve the same greedy tokens as HF."""
    rng = random.Random(seed)
    lengths = {f"q{i}": rng.randint(1, 24) for i in range(rng.randint(1, 5))}
    max_new = {rid: rng.randint(1, 6) for rid in lengths}
    plans = random_plans(rng, num_instances, {r: (lengths[r], max_new[r]) for r in lengths})
    prompts = prompts_for(lengths, seed=seed % 1000)
    got, cluster = serve_plans(_MODEL["adapter"], num_instances, plans, prompts, max_new,
                               kv_slots=128)
    for rid, p in prompts.items():
        assert got[rid] == hf_greedy(_MODEL["hf"], p, max_new[rid]), f"request {rid}"
    assert all(e.cache.stats().used_tokens == 0 for e in cluster.engines)


_MODEL = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_model():
    """One model for the property test's examples (hypothesis forbids function fixtures)."""
    model = tiny_model(seed=6)
    _MODEL.update(hf=model, adapter=LlamaAdapter.from_hf(model))
    yield


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_hf(rope):
    """Prompts longer than max_position_embeddings = 16, so dynamic NTK scales too; one request
    per HF model (dynamic keeps process-wide state in transformers)."""
    lengths, max_new = {"x": 23, "y": 5}, {"x": 4, "y": 3}
    prompts = prompts_for(lengths, seed=3)
    s = Script(3, {r: (lengths[r], max_new[r]) for r in lengths})
    s.iteration(prefills=[((1, 2, 0), {"x": ((0, 0, 11), (2, 11, 23)), "y": 1})])
    s.iteration(decodes=[({"x": 1, "y": 0}, {"y": 2})])
    s.iteration(decodes=[({"x": 0, "y": 1}, {})])
    s.iteration(decodes=[({"x": 2}, {})])
    params = dict(rope, rope_theta=10000.0)
    kw = dict(max_position_embeddings=16, rope_parameters=params)
    got, _ = serve_plans(LlamaAdapter.from_hf(tiny_model(**kw)), 3, s.plans, prompts, max_new)
    for rid, p in prompts.items():
        assert got[rid] == hf_greedy(tiny_model(**kw), p, max_new[rid]), f"request {rid}"


def test_dynamic_rope_recompute_matches_hf_logits():
    """A request preempted and re-prefilled over prompt + generated tokens: each token's K is
    rotated at the length transformers' generate rotated it (the prompt's for prompt tokens,
    position + 1 for generated ones). Rotating all of them at the recompute's length moved the
    logits after it by up to 0.08 while greedy tokens happened to agree, so logits are
    compared, step by step."""
    kw = dict(max_position_embeddings=16,
              rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4})
    prompt = prompts_for({"r": 20}, seed=6)["r"]
    n = 6
    s = Script(2, {"r": (20, n)})
    s.iteration(prefills=[((0, 1), {"r": 0})])
    s.iteration(decodes=[({"r": 0}, {})])
    s.iteration(decodes=[({"r": 1}, {})])
    s.iteration(preempt=["r"], prefills=[((1, 0), {"r": ((0, 0, 10), (1, 10, 23))})])
    s.iteration(decodes=[({"r": 0}, {})])
    s.iteration(decodes=[({"r": 1}, {})])
    seen = []

    def record(states, logits):
        seen.append(logits[0].clone())
        return logits.argmax(-1)
    serve_plans(LlamaAdapter.from_hf(tiny_model(seed=21, **kw)), 2, s.plans, {"r": prompt},
                {"r": n}, kv_slots=128, sampler=record)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = tiny_model(seed=21, **kw).generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            output_logits=True, return_dict_in_generate=True).logits
    assert len(seen) == n
    for step, (got, want) in enumerate(zip(seen, ref)):
        torch.testing.assert_close(got, want[0], rtol=0, atol=1e-4, msg=f"step {step}")


def test_rope_tables_match_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from esp_kernels.runtime import Rope
    cases = [{"rope_type": "linear", "factor": 3.0},
             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
              "beta_fast": 16, "beta_slow": 2},
             {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
              "mscale": 1.0, "mscale_all_dim": 0.5}]
    for rope in cases:
        cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2,
                                       max_position_embeddings=32768,
                                       rope_parameters=dict(rope, rope_theta=500000.0))
        want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        mine = Rope.from_config(cfg.to_dict(), 128)
        torch.testing.assert_close(mine.inv_freq, want, rtol=1e-6, atol=0)
        assert mine.attention_scaling == pytest.approx(want_scale), rope
    # config.json of older checkpoints: rope_theta + rope_scaling with "type"
    old = Rope.from_config({"rope_theta": 1e6, "max_position_embeddings": 8,
                            "rope_scaling": {"type": "linear", "factor": 2.0}}, 64)
    assert old.kind == "linear" and old.base == 1e6
    with pytest.raises(NotImplementedError, match="longrope"):
        Rope.from_config({"rope_scaling": {"rope_type": "longrope"}}, 64)
    # config.json files as transformers reads them (a KeyError, and 2x wrong frequencies, before):
    # the scaled types' original_max_position_embeddings missing from rope_scaling (then
    # max_position_embeddings), or also at the top level (Phi3-style: the top level wins)
    for scaling, top in (({"type": "yarn", "factor": 4.0}, {}),
                         ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}, {}),
                         ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
                          {"original_max_position_embeddings": 4096}),
                         ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                          {"original_max_position_embeddings": 4096})):
        raw = {"hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": 16384,
               "rope_theta": 500000.0, "rope_scaling": scaling, **top}
        cfg = transformers.LlamaConfig(**copy.deepcopy(raw))  # (it fills in rope_scaling)
        kind = scaling.get("rope_type", scaling.get("type"))
        want, want_scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
        mine = Rope.from_config(raw, 128)
        torch.testing.assert_close(mine.inv_freq, want, rtol=1e-6, atol=0, msg=str(raw))
        assert mine.attention_scaling == pytest.approx(want_scale), raw


def test_state_dict_loads_into_transformers_strictly():
    """Every HF weight comes back, biases included (o_proj's and the MLP's were left out)."""
    for extra in ({}, {"attention_bias": True, "mlp_bias": True}):
        src = tiny_model(seed=4, **extra)
        dst = tiny_model(seed=5, **extra)
        dst.load_state_dict(LlamaAdapter.from_hf(src).state_dict(), strict=True)
        for name, t in src.state_dict().items():
            assert torch.equal(dst.state_dict()[name], t), name


def test_sliding_window_defaults_as_transformers_does():
    """A Mistral config.json without sliding_window gets transformers' 4096 (it was served with
    no window: 0.05 off in the logits at 4200 tokens); an explicit null keeps none."""
    from esp_kernels.runtime.llama import _sliding_window
    for raw, want in (({"model_type": "mistral"}, 4096), ({"model_type": "mistral",
                                                          "sliding_window": None}, None),
                      ({"model_type": "llama"}, None),
                      ({"model_type": "qwen2", "use_sliding_window": True}, 4096),
                      ({"model_type": "qwen2"}, None)):
        family = raw["model_type"]
        cfg = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "llama": transformers.LlamaConfig}[family](
                   **{k: v for k, v in raw.items() if k != "model_type"})
        hf_window = getattr(cfg, "sliding_window", None)
        if family == "qwen2" and not raw.get("use_sliding_window"):
            hf_window = None  # every layer full attention
        assert _sliding_window(raw) == want == hf_window, raw


def test_eos_stops_and_frees():
    """EOS = the third greedy token of request a: HF and the engine both stop there; the
    scheduler is told (update's finished) and b goes on to its max_new_tokens."""
    model = tiny_model()
    prompts = prompts_for({"a": 9, "b": 6}, seed=5)
    eos = hf_greedy(model, prompts["a"], 6)[2]
    model.generation_config.eos_token_id = eos
    ref = {rid: hf_greedy(model, p, 6) for rid, p in prompts.items()}
    assert len(ref["a"]) == 3 and ref["a"][-1] == eos
    n_b = next((i + 1 for i, t in enumerate(ref["b"]) if t == eos), 6)
    s = Script(2, {"a": (9, 3), "b": (6, n_b)})   # the script ends a where EOS will
    s.iteration(prefills=[((0, 1), {"a": 0, "b": 1})])
    while s.finished != {"a", "b"}:
        s.iteration(decodes=[({r: i for i, r in enumerate("ab") if r not in s.finished}, {})])
    cluster = VirtualCluster(LlamaAdapter.from_hf(model), 2, 64, 4)
    sched = ScriptedScheduler(s.plans)
    res = serve(cluster, sched, [Arrival(r, tuple(p), 6) for r, p in prompts.items()])
    assert {r: rec.tokens for r, rec in res.requests.items()} == ref
    assert cluster.state("a").finish_reason == "eos"
    assert [f for _, f in sched.updates if f] == [("a",)]
    assert all(e.cache.stats().used_tokens == 0 for e in cluster.engines)


def test_seeded_sampling_is_plan_independent_and_follows_hf_logits():
    """temperature/top-p with a seed: the same tokens whichever instances sample them, and each
    one the seeded draw from HF's logits of the same prefix."""
    model = tiny_model(seed=7)
    prompts = prompts_for({"a": 10, "b": 4}, seed=8)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    outs = []
    for ring, masters in (((0, 1, 2), ({"a": 0, "b": 1}, {"a": 2, "b": 0})),
                          ((2, 1), ({"a": 1, "b": 2}, {"a": 1, "b": 1}))):
        s = Script(3, {"a": (10, 3), "b": (4, 3)})
        s.iteration(prefills=[(ring, {"a": ring[0], "b": ring[-1]})])
        for m in masters:
            s.iteration(decodes=[(m, {})])
        got, _ = serve_plans(LlamaAdapter.from_hf(model), 3, s.plans, prompts,
                             {"a": 3, "b": 3}, sampling=params)
        outs.append(got)
    assert outs[0] == outs[1]
    for rid, p in prompts.items():
        toks = outs[0][rid]
        with torch.no_grad():
            logits = model(torch.tensor([p + toks[:-1]])).logits[0, len(p) - 1:].float()
        assert toks == [_draw(logits[i], params, i) for i in range(len(toks))], rid


def test_teacher_forced_logits_match_hf():
    """Per-step fp32 logits against HF's forward over the same sequence (a custom sampler
    records them and forces the continuation)."""
    model = tiny_model(seed=2)
    prompt = prompts_for({"a": 17}, seed=4)["a"]
    forced = prompts_for({"f": 5}, seed=9)["f"]
    seen = []

    def forcing(states, logits):
        seen.append(logits.clone())
        return torch.tensor([forced[len(st.generated)] for st in states])
    s = Script(3, {"a": (17, 5)})
    s.iteration(prefills=[((2, 0, 1), {"a": ((0, 0, 6), (1, 6, 17))})])
    for m, app in ((1, {}), (2, {"a": 0}), (0, {}), (2, {})):
        s.iteration(decodes=[({"a": m}, app)])
    got, _ = serve_plans(LlamaAdapter.from_hf(model), 3, s.plans, {"a": prompt}, {"a": 5},
                         sampler=forcing)
    assert got["a"] == forced
    with torch.no_grad():
        ref = model(torch.tensor([prompt + forced[:-1]])).logits[0, len(prompt) - 1:]
    torch.testing.assert_close(torch.cat(seen), ref, rtol=1e-4, atol=1e-5)


def test_plan_engine_divergence_raises():
    """A plan whose shards disagree with the caches must fail loudly, not decode over wrong KV."""
    model = tiny_model()
    prompts = prompts_for({"a": 6})
    s = Script(2, {"a": (6, 3)})
    s.iteration(prefills=[((0, 1), {"a": 0})])
    bad = s.iteration(decodes=[({"a": 1}, {})])
    wrong = bad.decodes[0].__class__(**{**bad.decodes[0].__dict__,
                                        "shards": (((1, 6),),), "instances": (0, 1)})
    plans = [s.plans[0], bad.__class__(**{**bad.__dict__, "decodes": (wrong,)})]
    with pytest.raises(RuntimeError, match="should hold 0 KV tokens on instance 0|"
                                           "should hold 6 KV tokens on instance 1"):
        serve_plans(LlamaAdapter.from_hf(model), 2, plans, prompts, {"a": 3})


def test_bad_requests_raise():
    cluster = VirtualCluster(LlamaAdapter.from_hf(tiny_model()), 2, 32, 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cluster.add_request("x", [VOCAB], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        cluster.add_request("y", [1, 2], 0)
    with pytest.raises(ValueError, match="at least one token"):
        cluster.add_request("z", [], 2)
    cluster.add_request("w", [1], 2)
    with pytest.raises(ValueError, match="already known"):
        cluster.add_request("w", [1], 2)
    with pytest.raises(ValueError, match="multiple of page_size"):
        VirtualCluster(cluster.adapter, 2, 30, 4)


def _esp_scheduler():
    try:
        from esp_kernels.scheduler import CostModel, ESPScheduler
    except ImportError as exc:
        pytest.skip(f"esp_kernels.scheduler is not available yet ({exc})")
    return CostModel, ESPScheduler


@pytest.mark.parametrize("num_instances", [2, 4])
def test_esp_scheduler_workload_matches_hf(num_instances):
    """The real ESPScheduler drives the engines over a mixed workload with tight KV memory
    (so it must spread, scale up, migrate or preempt); every output equals HF's greedy one."""
    CostModel, ESPScheduler = _esp_scheduler()
    model = tiny_model(seed=4)
    g = torch.Generator().manual_seed(12)
    lengths = [int(x) for x in torch.randint(1, 60, (10,), generator=g)]
    news = [int(x) for x in torch.randint(1, 8, (10,), generator=g)]
    prompts = {f"r{i}": torch.randint(0, VOCAB, (L,), generator=g).tolist()
               for i, L in enumerate(lengths)}
    # Tight memory: at most ~2 prompts per instance (40 slots each of 2, 64 of 4).
    page, slots = 4, {2: 40, 4: 64}[num_instances]
    sched = ESPScheduler(num_instances, slots, CostModel.default(), page_size=page)
    cluster = VirtualCluster(LlamaAdapter.from_hf(model), num_instances, slots, page)
    work = [Arrival(rid, tuple(p), news[i], 0.0) for i, (rid, p) in enumerate(prompts.items())]
    res = serve(cluster, sched, work)
    plans = [it.plan for it in res.iterations]
    print("rings > 1:", sum(len(p.instances) > 1 for it in plans for p in it.prefills),
          "spread retention:", sum(len(r) > 1 for it in plans for p in it.prefills
                                   for r in p.retention),
          "scale-ups:", sum(m != a for it in plans for d in it.decodes
                            for m, a in zip(d.masters, d.append_to)),
          "migrations:", sum(len(it.migrations) for it in plans),
          "preemptions:", sum(len(it.preemptions) for it in plans))
    for i, (rid, p) in enumerate(prompts.items()):
        assert res.requests[rid].tokens == hf_greedy(model, p, news[i]), rid
    assert all(e.cache.stats().used_tokens == 0 for e in cluster.engines)
