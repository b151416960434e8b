"""GPU tier: the runtime in bf16 against transformers, a ~1B random-init Llama, up to a 33k prompt.

Teacher forcing: the engine serves the prompt then decodes a fixed continuation (a sampler that
records the logits and forces the next token) over 4 virtual instances of one GPU, with a
reordered ring, retention spread over all four, master changes and a scale-up spill. Its
per-step logits are compared with HF's fp32 forward over the same sequence: tolerance, per step,
2x the error of HF's own bf16 forward (docs/DESIGN.md §8: bf16 error at most about 2x the error of
the same math done by PyTorch in bf16), plus 1e-3 for steps where HF bf16 is near-exact.
Memory ~15 GB (weights: ours bf16 2 GB, HF bf16 2 GB, HF fp32 4 GB; activations of a 33k-token
fp32 forward), well under 40 GB.
"""

from __future__ import annotations

import time

import pytest
import torch

from esp_kernels.demo import cast_weights, last_logits
from esp_kernels.runtime import Arrival, LlamaAdapter, VirtualCluster, serve
from esp_kernels.runtime.llama import PRESETS
from esp_kernels.testing import rel_err
from runtime_fakes import Script, ScriptedScheduler

FORCED = 6


def _script(instances: int, prompt: int):
    """One request: prefill over a reordered ring of all instances with its KV spread over all of
    them, then decode steps with master changes and scale-up spills (on one instance: a plain
    prefill and decode)."""
    s = Script(instances, {"a": (prompt, FORCED)})
    if instances == 1:
        s.iteration(prefills=[((0,), {"a": ((0, 0, prompt),)})])
        for _ in range(FORCED - 1):
            s.iteration(decodes=[({"a": 0}, {})])
        return s
    q = prompt // 4
    s.iteration(prefills=[((3, 1, 0, 2), {"a": ((0, 0, q), (1, q, 2 * q), (2, 2 * q, 3 * q),
                                                (3, 3 * q, prompt))})])
    for master, spill in ((1, {}), (3, {"a": 0}), (0, {}), (2, {"a": 2}), (1, {})):
        s.iteration(decodes=[({"a": master}, spill)])
    return s


# A short prompt on one instance and on the elastic ring first: they localize a failure of the
# 33k case (which the issue asks for) to the model path or to the elastic one.
@pytest.mark.gpu
@pytest.mark.parametrize("instances, PROMPT", [(1, 2048), (4, 2048), (4, 33_000)])
def test_bf16_teacher_forced_logits_1b(instances, PROMPT, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations import sdpa_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    cfg = PRESETS["1b"]
    adapter = LlamaAdapter.random(cfg, torch.bfloat16, dev, seed=1)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg["vocab_size"], (PROMPT,), generator=g).tolist()
    forced = torch.randint(0, cfg["vocab_size"], (FORCED,), generator=g).tolist()
    seen = []

    def forcing(states, logits):
        seen.append(logits.float().cpu())
        return torch.tensor([forced[len(st.generated)] for st in states], device=dev)

    s = _script(instances, PROMPT)
    q = -(-PROMPT // instances)
    cluster = VirtualCluster(adapter, instances, (q // 16 + 8) * 16, 16, sampler=forcing)
    res = serve(cluster, ScriptedScheduler(s.plans), [Arrival("a", tuple(prompt), FORCED)])
    assert res.requests["a"].tokens == forced
    ours = torch.cat(seen)                                          # [FORCED, vocab]
    del cluster
    torch.cuda.empty_cache()

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    hf_cfg._attn_implementation = "sdpa"  # eager attention would need 130 GiB of fp32 scores
    with torch.device(dev):
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()   # fp32, RoPE tables in fp32
    hf.load_state_dict(adapter.state_dict())
    seq = torch.tensor([prompt + forced[:-1]], device=dev)
    # HF's SDPA path asks for enable_gqa, which torch's memory-efficient kernel lacks: fp32 then
    # falls back to the math kernel (130 GiB of scores at 33k). Repeat the KV heads instead
    # (same math) and allow only the streaming kernels.
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION,
                                       SDPBackend.EFFICIENT_ATTENTION]):
        hf32 = last_logits(hf, seq, FORCED).cpu()
        hf16 = last_logits(cast_weights(hf, torch.bfloat16), seq, FORCED).cpu()
    for step in range(FORCED):
        err, err_hf = rel_err(ours[step], hf32[step]), rel_err(hf16[step], hf32[step])
        print(f"step {step}: ours {err:.2e}, HF bf16 {err_hf:.2e}")
        assert err <= 2 * err_hf + 1e-3, f"step {step}: {err:.2e} vs HF bf16 {err_hf:.2e}"
    peak = torch.cuda.max_memory_allocated(dev) / 2**30
    elapsed = time.perf_counter() - t0
    print(f"peak {peak:.1f} GiB, {elapsed:.1f} s")
    assert peak < 40, f"peak GPU memory {peak:.1f} GiB"


@pytest.mark.gpu
def test_decode_cuda_graphs_match_eager():
    """The decode step's dense work as CUDA graphs (runtime.graphs) against eager: random plans
    over 3 virtual instances (masters, scale-ups, migrations and preemptions change every
    step, so each master's batch moves between padded buckets); per-step logits of every
    request, teacher forced, within bf16 rounding of the eager ones."""
    import random

    from runtime_fakes import ScriptedScheduler, random_plans

    dev = torch.device("cuda")
    # Head dim 64: the CUDA decode kernel's smallest (the tiny preset's 16 runs on the CPU only).
    cfg = dict(PRESETS["tiny"], num_hidden_layers=3, hidden_size=256, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64)
    adapter = LlamaAdapter.random(cfg, torch.bfloat16, dev, seed=3)
    rng = random.Random(5)
    lengths = {f"r{i}": rng.randint(3, 40) for i in range(12)}
    news = {r: rng.randint(2, 9) for r in lengths}
    plans = random_plans(rng, 3, {r: (lengths[r], news[r]) for r in lengths})
    g = torch.Generator().manual_seed(6)
    prompts = {r: torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()
               for r, n in lengths.items()}
    forced = {r: torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()
              for r, n in news.items()}

    def run(cuda_graphs):
        seen = {}

        def forcing(states, logits):
            for st, row in zip(states, logits.float().cpu()):
                seen[st.rid, len(st.generated)] = row
            return torch.tensor([forced[st.rid][len(st.generated)] for st in states],
                                device=dev)
        cluster = VirtualCluster(adapter, 3, 1024, 4, sampler=forcing, cuda_graphs=cuda_graphs)
        work = [Arrival(r, tuple(p), news[r]) for r, p in prompts.items()]
        res = serve(cluster, ScriptedScheduler(list(plans)), work)
        for r in prompts:
            assert res.requests[r].tokens == forced[r]
        buckets = sorted({b for e in cluster.engines if e._graphs for b in e._graphs._buckets})
        return seen, buckets

    eager, none = run(False)
    graphed, buckets = run(True)
    assert none == [] and len(buckets) >= 3, buckets   # several padded sizes were captured
    assert eager.keys() == graphed.keys()
    for key, row in eager.items():
        assert rel_err(graphed[key], row) < 2e-2, (key, rel_err(graphed[key], row))
