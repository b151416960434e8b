"""`python -m esp_kernels demo`: serve a model with elastic sequence parallelism, verified.

A Poisson workload with mixed prompt lengths is served by N virtual instances of this device
(esp_kernels.runtime.VirtualCluster: one engine each, one copy of the weights) under the ESP
scheduler (esp_kernels.scheduler.ESPScheduler). The model is a random-init Llama-family model
(tiny on a CPU, ~1B parameters with prompts up to 32k tokens on a GPU) or a local checkpoint
(`--model DIR`). Printed: the elastic decisions of every iteration (prefill rings, retention,
decode masters, scale-ups, migrations, preemptions), then every output checked against
Hugging Face transformers (fp32: greedy tokens identical; bf16: each token within a stated
logit tolerance of HF's greedy choice under teacher forcing), throughput, TTFT/TPOT
percentiles, and a PNG timeline of what each instance did.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from ._checks import resolve_device
from .config import config

# Per device kind: model preset, workload and per-instance KV slots. The CPU case finishes in
# ~10 s on two cores (tiny model: the time goes to host work per iteration); KV slots are
# tight so that long prompts spread their retention over instances and decode scales up.
CASES = {
    "cpu": dict(preset="tiny", dtype=torch.float32, requests=24, rate=100.0,
                prompt=(4, 900), new=(2, 24), kv_slots=320, page_size=16),
    "cuda": dict(preset="1b", dtype=torch.bfloat16, requests=24, rate=4.0,
                 prompt=(64, 32768), new=(8, 64), kv_slots=40960, page_size=16),
}
# bf16: a served token is accepted if HF's bf16 logit for it is within this of HF's maximum at
# the same step (teacher forcing); random-init logits have std ~1, bf16 rounding of 16 layers
# moves them by a few hundredths.
BF16_LOGIT_TOL = 0.15


def _scheduler():
    try:
        from .scheduler import CostModel, ESPScheduler
    except ImportError as exc:
        raise SystemExit(f"demo: the ESP scheduler (esp_kernels.scheduler) is not available in "
                         f"this build ({exc}); the runtime demo needs it.") from None
    return CostModel, ESPScheduler


def _workload(n, rate, prompt, new, vocab, seed):
    """Poisson arrivals; prompt lengths log-uniform in `prompt` (mixed short and long)."""
    from .runtime import Arrival
    g = torch.Generator().manual_seed(seed)
    t, out = 0.0, []
    lo, hi = math.log(prompt[0]), math.log(prompt[1])
    for i in range(n):
        t += float(torch.empty(1).exponential_(rate, generator=g))
        L = int(math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g))))
        m = int(torch.randint(new[0], new[1] + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        out.append(Arrival(f"r{i}", tuple(ids), m, t))
    return out


def _ranges(ranges) -> str:
    return ",".join(f"{i}:{s}-{e}" for i, s, e in ranges)


def describe(plan, took: float, max_items: int = 6) -> list[str]:
    """The elastic decisions of one iteration, one line per batch."""
    lines = [f"it {plan.index:4d} t={plan.now:7.3f}s took {took * 1e3:8.1f} ms "
             f"(cost model: {plan.predicted_time * 1e3:.1f} ms on H100 8B)"]
    for rid in plan.preemptions:
        lines.append(f"    preempt {rid} (KV freed; recomputed later)")
    for m in plan.migrations:
        lines.append(f"    migrate {m.request}[{m.start},{m.end}) {m.src}->{m.dst}")
    for pg in plan.prefills:
        reqs = [f"{r}({L}) keep {_ranges(k)}" for r, L, k in
                zip(pg.requests, pg.seqlens, pg.retention)]
        more = f" +{len(reqs) - max_items} more" if len(reqs) > max_items else ""
        lines.append(f"    prefill #{pg.batch_id} ring {list(pg.instances)}: "
                     f"{'; '.join(reqs[:max_items])}{more}")
    for db in plan.decodes:
        masters: dict = {}
        for m in db.masters:
            masters[m] = masters.get(m, 0) + 1
        spills = [f"{r}->{t}" for r, m, t in zip(db.requests, db.masters, db.append_to)
                  if t != m]
        spread = sum(len(s) > 1 for s in db.shards)
        lines.append(f"    decode #{db.batch_id} on {list(db.instances)}: {len(db.requests)} "
                     f"reqs, masters {masters}, {spread} spread over >1 instance"
                     + (f", scale-up {' '.join(spills[:max_items])}" if spills else ""))
    return lines


def elastic_summary(plans) -> str:
    prefills = [p for it in plans for p in it.prefills]
    decodes = [d for it in plans for d in it.decodes]
    return (f"elastic: {len(prefills)} prefill groups "
            f"({sum(len(p.instances) > 1 for p in prefills)} on rings of 2+, "
            f"{sum(len(r) > 1 for p in prefills for r in p.retention)} requests kept on 2+ "
            f"instances), {len(decodes)} decode batches ("
            f"{sum(len(s) > 1 for d in decodes for s in d.shards)} request steps over 2+ "
            f"instances, {sum(t != m for d in decodes for m, t in zip(d.masters, d.append_to))}"
            f" scale-up appends), {sum(len(it.migrations) for it in plans)} migrations, "
            f"{sum(len(it.preemptions) for it in plans)} preemptions")


def _hf_model(adapter, dtype, device, model_dir):
    try:
        import transformers
    except ImportError:
        raise SystemExit("demo: checking outputs needs transformers (pip install "
                         "transformers), or pass --no-verify") from None
    # No dtype keyword (its name changed across transformers versions): cast afterwards.
    if model_dir:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="sdpa")
        return cast_weights(model.to(device), dtype).eval()
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[adapter.config.get("model_type", "llama")]
    cfg = cfg_cls(**{k: v for k, v in adapter.config.items() if k != "model_type"})
    # SDPA, not eager attention: eager materialises [heads, T, T] scores (130 GiB in fp32 for a
    # 33k-token prompt of the 1B preset), SDPA's memory-efficient kernel streams them.
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(adapter.state_dict(), strict=True)
    cast_weights(model, dtype)
    return model.eval()


def cast_weights(model, dtype):
    """Cast a transformers model's parameters only. `model.to(dtype)` also rounds RoPE's
    `inv_freq` buffer to bf16 (a relative error of 2^-9 in every frequency: at position 2000 the
    fastest rotation is off by ~4 rad), which made HF's own bf16 forward, and an fp32 one cast
    back from it, the wrong reference for prompts of more than a few hundred tokens."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def last_logits(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    """HF's float32 logits [n, vocab] of the last n positions of ids [1, T] (the base model and
    the LM head: `logits_to_keep` is not in every transformers version)."""
    h = hf.model(input_ids=ids).last_hidden_state[0, -n:]
    return hf.lm_head(h).float()


def verify(hf, result, workload, exact: bool, progress=print) -> tuple[int, float]:
    """Every output against HF: (number that pass, worst logit margin seen)."""
    ok, worst = 0, 0.0
    dev = next(hf.parameters()).device
    t0 = time.perf_counter()
    for n, a in enumerate(workload, 1):
        got = result.requests[a.rid].tokens
        ids = torch.tensor([list(a.prompt)], device=dev)
        with torch.no_grad():
            if exact:
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=len(got))[0, ids.shape[1]:].tolist()
                good = ref == got
            else:
                seq = torch.tensor([list(a.prompt) + got[:-1]], device=dev)
                logits = last_logits(hf, seq, len(got))
                margin = (logits.max(-1).values -
                          logits.gather(1, torch.tensor(got, device=dev)[:, None])[:, 0])
                worst = max(worst, float(margin.max()))
                good = bool((margin <= BF16_LOGIT_TOL).all())
        ok += good
        if not good:
            detail = "" if exact else (f", prompt {len(a.prompt)}, first step off by more "
                                       f"than the tolerance: "
                                       f"{int((margin > BF16_LOGIT_TOL).nonzero()[0])}, "
                                       f"margins {[round(float(x), 2) for x in margin[:6]]}")
            progress(f"    MISMATCH {a.rid}: served {got[:12]}{detail}")
        if time.perf_counter() - t0 > 2 or n == len(workload):
            progress(f"  verified {n}/{len(workload)} against transformers")
            t0 = time.perf_counter()
    return ok, worst


def _percentiles(xs) -> str:
    if not xs:
        return "n/a"
    t = torch.tensor(xs, dtype=torch.float64)
    return " ".join(f"p{q}={float(t.quantile(q / 100)) * 1e3:.1f}ms" for q in (50, 90, 99))


def timeline(result, num_instances: int, path: str) -> None:
    """PNG: one row per instance, one bar per iteration it took part in, by activity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"prefill": "tab:blue", "decode master": "tab:green",
              "decode holder": "tab:olive", "migrate": "tab:orange"}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * num_instances))
    for it in result.iterations:
        plan, span = it.plan, (it.start, max(it.end - it.start, 1e-6))
        roles: dict = {}
        for m in plan.migrations:
            roles.setdefault(m.src, "migrate")
            roles.setdefault(m.dst, "migrate")
        for pg in plan.prefills:
            for i in pg.instances:
                roles[i] = "prefill"
        for db in plan.decodes:
            for i in db.instances:
                roles[i] = "decode master" if i in db.masters else "decode holder"
        for inst, role in roles.items():
            ax.broken_barh([span], (inst - 0.4, 0.8), color=colors[role])
    ax.set_yticks(range(num_instances))
    ax.set_yticklabels([f"instance {i}" for i in range(num_instances)])
    ax.set_xlabel("seconds")
    ax.invert_yaxis()
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=k) for k, c in colors.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8)
    ax.set_title("ESP runtime: what each instance did per iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(device=None, instances: int = 4, model_dir: str | None = None,
             requests: int | None = None, rate: float | None = None, seed: int = 0,
             verify_outputs: bool = True, timeline_path: str | None = "esp_timeline.png",
             quiet: bool = False) -> int:
    CostModel, ESPScheduler = _scheduler()
    if instances < 1:
        raise SystemExit(f"demo: --instances must be >= 1, got {instances}")
    if device is not None and torch.device(device).type == "cuda" and \
            not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda, but torch sees no CUDA device")
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # The tiny model's ops are microseconds: intra-op threads only add hand-offs, worse
        # with the virtual instances' threads (16 requests served in 9.7 s with 2 threads,
        # 1.6 s with one, on a loaded 2-core machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(device, instances, model_dir, requests, rate, seed, verify_outputs,
                        timeline_path, quiet)
        finally:
            torch.set_num_threads(threads)
    return _run(device, instances, model_dir, requests, rate, seed, verify_outputs,
                timeline_path, quiet)


def _run(device, instances, model_dir, requests, rate, seed, verify_outputs, timeline_path,
         quiet) -> int:
    from .runtime import LlamaAdapter, VirtualCluster, serve
    from .runtime.llama import PRESETS

    CostModel, ESPScheduler = _scheduler()
    case = dict(CASES["cuda" if device.type == "cuda" else "cpu"])
    cfg = config()
    print(f"esp_kernels {cfg['version']} ({cfg['commit']}) on {device}, compiled core: "
          f"{cfg['compiled_module']}")
    t = time.perf_counter()
    if model_dir:
        adapter = LlamaAdapter.from_dir(model_dir, dtype=case["dtype"], device=device)
    else:
        adapter = LlamaAdapter.random(PRESETS[case["preset"]], case["dtype"], device, seed)
    print(f"model: {adapter} ({'checkpoint ' + model_dir if model_dir else 'random init'}, "
          f"{time.perf_counter() - t:.1f} s)")
    n = requests or case["requests"]
    work = _workload(n, rate or case["rate"], case["prompt"], case["new"], adapter.vocab_size,
                     seed)
    if adapter.max_len:
        work = [a for a in work if len(a.prompt) + a.max_new_tokens - 1 <= adapter.max_len]
    slots, page = case["kv_slots"], case["page_size"]
    longest = max(len(a.prompt) + a.max_new_tokens for a in work)
    slots = max(slots, -(-longest // (instances * page)) * page)   # every request can fit
    sched = ESPScheduler(instances, slots, CostModel.default(), page_size=page)
    cluster = VirtualCluster(adapter, instances, slots, page)
    lens = sorted(len(a.prompt) for a in work)
    print(f"workload: {len(work)} requests, Poisson {rate or case['rate']}/s, prompt tokens "
          f"{lens[0]}..{lens[-1]} (median {lens[len(lens) // 2]}), {instances} virtual "
          f"instances of {slots} KV slots (page {page})\n")

    last = [0.0]

    def show(it):
        if not quiet or it.plan.prefills or it.plan.migrations or it.plan.preemptions:
            print("\n".join(describe(it.plan, it.end - it.start)), flush=True)
        elif it.end - last[0] > 2:   # progress through long decode-only stretches
            done = sum(cluster.state(a.rid).finished for a in work if a.rid in
                       cluster.engines[0].requests)
            print(f"it {it.plan.index:4d} t={it.end:7.3f}s: {done}/{len(work)} requests done",
                  flush=True)
        last[0] = it.end
    res = serve(cluster, sched, work, on_iteration=show)
    ttft = [r.ttft for r in res.requests.values()]
    tpot = [r.tpot for r in res.requests.values() if r.tpot is not None]
    print(f"\nserved {len(work)} requests, {res.generated_tokens} tokens in {res.wall:.2f} s "
          f"over {len(res.iterations)} iterations: {res.generated_tokens / res.wall:.1f} tok/s")
    print(f"TTFT {_percentiles(ttft)}   TPOT {_percentiles(tpot)}")
    print(elastic_summary([it.plan for it in res.iterations]))
    if timeline_path:
        try:
            timeline(res, instances, timeline_path)
            print(f"timeline: {timeline_path}")
        except ImportError:
            print("timeline: skipped (pip install matplotlib)")
    if not verify_outputs:
        print("outputs not verified (--no-verify)")
        return 0
    exact = case["dtype"] == torch.float32
    how = "greedy tokens identical" if exact else f"teacher-forced, logit tol {BF16_LOGIT_TOL}"
    print(f"\nchecking every output against transformers ({how})")
    print("  building the transformers model ...", flush=True)
    hf = _hf_model(adapter, case["dtype"], device, model_dir)
    ok, worst = verify(hf, res, work, exact)
    extra = "" if exact else f", worst logit margin {worst:.3f}"
    print(f"{'PASS' if ok == len(work) else 'FAIL'}: {ok}/{len(work)} outputs match "
          f"transformers{extra}")
    return 0 if ok == len(work) else 1


if __name__ == "__main__":
    sys.exit(run_demo())
