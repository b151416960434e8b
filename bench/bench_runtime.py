"""Runtime benchmark (GPU machine): host overhead, kernel share, cost model vs measured.

  python bench/bench_runtime.py [--out bench/results/bench.jsonl] [--only host,share,cost]
  python bench/bench_runtime.py --smoke        # CPU, tiny sizes: checks the code paths only

Parts:
  host   host overhead per decode iteration per instance: a model with the cost model's 32
         layers but tiny matrices (hidden 256), so the GPU keeps up with the host and an
         iteration's wall time is host time; 1, 2 and 4 virtual instances (KV of every request
         spread over all of them, masters spread), against the 30 us per layer budget.
  share  share of a decode iteration's wall time spent in our kernels (decode partial, merge,
         KV copies) and in all kernels, on the cost model's model shape (Llama-3-8B), one
         instance, from a torch.profiler trace.
  cost   esp_kernels.scheduler.CostModel.default()'s predicted iteration time against measured
         one-instance iterations (prefill and decode batches) of the same model shape; the
         relative error per case and its mean (target < 10%).

Decode cases start from KV placed directly in the caches (zeroed pool, request state set as
after a prefill): what a step costs does not depend on the values.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Recorder, parse_out  # noqa: E402

import esp_kernels  # noqa: E402,F401  (harness put this checkout first on the path)
from esp_kernels.runtime import LlamaAdapter, VirtualCluster  # noqa: E402

OUR_KERNELS = ("decode_partial", "decode_merge", "merge_states", "copy_rows", "copy_batch",
               "ring_step")


def _plans():
    try:
        from esp_kernels.scheduler import (CostModel, DecodeBatch, IterationPlan, MigrationOrder,
                                           PrefillGroup)
    except ImportError as exc:
        raise SystemExit(f"bench_runtime: esp_kernels.scheduler is not available ({exc})") \
            from None
    return CostModel, DecodeBatch, IterationPlan, PrefillGroup, MigrationOrder


def llama_cfg(model, layers=None, hidden=None, heads=None, kv_heads=None, intermediate=None,
              vocab=None) -> dict:
    """A Llama config dict of the cost model's ModelConfig, optionally shrunk."""
    return dict(model_type="llama", num_hidden_layers=layers or model.num_layers,
                hidden_size=hidden or model.hidden,
                num_attention_heads=heads or model.num_q_heads,
                num_key_value_heads=kv_heads or model.num_kv_heads, head_dim=model.head_dim,
                intermediate_size=intermediate or model.intermediate,
                vocab_size=vocab or model.vocab, max_position_embeddings=1 << 20,
                rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.02,
                eos_token_id=None)


class DecodeBench:
    """Requests with KV already in the caches; `plan()` is the next decode iteration."""

    made = 0   # request ids stay unique across the benches sharing one cluster

    def __init__(self, cluster, kv_lens, spread: bool):
        _, self.DecodeBatch, self.IterationPlan, _, _ = _plans()
        self.cluster, n = cluster, cluster.num_instances
        DecodeBench.made += 1
        self.rids = [f"d{DecodeBench.made}-{i}" for i in range(len(kv_lens))]
        self.held = []      # per request: {instance: tokens}
        self.masters = [i % n for i in range(len(kv_lens))]
        for e in cluster.engines:
            e.cache.kv.zero_()
        for rid, L in zip(self.rids, kv_lens):
            cluster.add_request(rid, [1] * L, 1 << 30)
            parts = [L // n + (j < L % n) for j in range(n)] if spread else [L] + [0] * (n - 1)
            held, start = {}, 0
            for inst, cnt in enumerate(parts):
                if cnt:
                    cluster.engines[inst].cache.allocate(rid, range(start, start + cnt))
                    held[inst] = cnt
                    start += cnt
            self.held.append(held)
            for e in cluster.engines:
                e.requests[rid].generated.append(1)
        self.index = 0

    def plan(self):
        n = self.cluster.num_instances
        self.index += 1
        db = self.DecodeBatch(self.index, tuple(range(n)), tuple(self.rids),
                              tuple(self.masters), tuple(tuple(sorted(h.items()))
                                                         for h in self.held),
                              tuple(self.masters), 0.0)
        for h, m in zip(self.held, self.masters):   # after this step: the master appended
            h[m] = h.get(m, 0) + 1
        return self.IterationPlan(self.index, 0.0, (), (db,), (), (), 0.0)

    def close(self):
        """Free the requests' KV everywhere (the cluster serves the next case)."""
        for e in self.cluster.engines:
            for rid in self.rids:
                e.cache.free(rid)
                e.requests[rid].finished = True

    def run(self, iters: int) -> list[float]:
        """Wall seconds of each iteration (execute ends with the token exchange's sync)."""
        times = []
        for _ in range(iters):
            plan = self.plan()
            t0 = time.perf_counter()
            self.cluster.execute(plan)
            times.append(time.perf_counter() - t0)
        return times


def part_host(rec, model, dev, dtype, smoke):
    layers = model.num_layers
    cfg = llama_cfg(model, hidden=256, heads=2, kv_heads=1, intermediate=512, vocab=1024)
    if smoke:
        cfg.update(num_hidden_layers=2, head_dim=16, hidden_size=32, intermediate_size=64)
        layers = 2
    adapter = LlamaAdapter.random(cfg, dtype, dev)
    B, L = (16, 512) if not smoke else (2, 8)
    for n in (1, 2, 4):
        cluster = VirtualCluster(adapter, n, ((B * (L + 64)) // n // 16 + 4) * 16, 16)
        bench = DecodeBench(cluster, [L] * B, spread=True)
        bench.run(3)
        t = statistics.median(bench.run(5 if smoke else 30))
        per_inst_us = t / n * 1e6
        rec.add(f"decode B{B} kv{L} spread over {n}, {layers} layers", "host/iter/instance",
                per_inst_us, "budget 30 us x layers", 30.0 * layers, "us",
                higher_is_better=False, per_layer_us=per_inst_us / layers,
                phases={k: v * 1e6 for k, v in vars(cluster.last_times).items()})


def part_share(rec, model, dev, dtype, smoke):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    if dev.type != "cuda":
        print("  share: needs CUDA kernels (skipped on CPU)")
        return
    adapter = LlamaAdapter.random(llama_cfg(model), dtype, dev)
    for B, L in ((1, 32768), (16, 4096), (64, 1024)):
        cluster = VirtualCluster(adapter, 1, (B * (L + 64) // 16 + 4) * 16, 16)
        bench = DecodeBench(cluster, [L] * B, spread=False)
        bench.run(3)
        iters = 10
        # Wall time unprofiled (the profiler's own host cost would dilute the shares); kernel
        # time from a profiled run of as many iterations.
        wall = statistics.median(bench.run(iters)) * iters
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            bench.run(iters)
        ours = total = 0.0
        for evt in prof.events():
            if evt.device_type == DeviceType.CUDA:
                us = evt.time_range.elapsed_us()
                total += us
                if any(k in evt.name for k in OUR_KERNELS):
                    ours += us
        wall_us = wall * 1e6
        rec.add(f"decode B{B} kv{L}, 1 instance, {model.num_layers} layers",
                "our kernels % of wall", 100 * ours / wall_us, "all kernels % of wall",
                100 * total / wall_us, "%", wall_ms=wall_us / iters / 1e3)
        del cluster, bench
        torch.cuda.empty_cache()


def part_cost(rec, model, dev, dtype, smoke):
    CostModel, _, IterationPlan, PrefillGroup, _ = _plans()
    cm = CostModel.default()
    cfg = llama_cfg(cm.model)
    if smoke:
        cfg.update(num_hidden_layers=2, hidden_size=64, head_dim=16, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    adapter = LlamaAdapter.random(cfg, dtype, dev)
    errors = []
    prefills = ([4096], [16384], [32768], [1024] * 8) if not smoke else ([64], [16] * 3)
    decodes = ([1024] * 16, [4096] * 32, [16384] * 4, [65536]) if not smoke else ([32] * 2,)
    # One pool for every case: the largest one plus its decode appends (cases free their KV).
    slots = max(sum(c) + 64 * len(c) for c in prefills + decodes)
    cluster = VirtualCluster(adapter, 1, (slots // 16 + 4) * 16, 16)
    for k, seqlens in enumerate(prefills):
        def run(tag):
            rids = [f"p{k}-{tag}-{i}" for i in range(len(seqlens))]
            for rid, L in zip(rids, seqlens):
                cluster.add_request(rid, [1] * L, 1)   # finishes at its prefill: KV freed
            pg = PrefillGroup(0, (0,), tuple(rids), tuple(seqlens),
                              tuple(((0, 0, L),) for L in seqlens), 0.0)
            t0 = time.perf_counter()
            cluster.execute(IterationPlan(0, 0.0, (pg,), (), (), (), 0.0))
            return time.perf_counter() - t0
        for w in range(2):
            run(f"w{w}")
        measured = statistics.median(run(f"r{r}") for r in range(3 if smoke else 5))
        predicted = cm.prefill_time(1, seqlens)
        err = abs(predicted - measured) / measured
        errors.append(err)
        rec.add(f"prefill {len(seqlens)}x{seqlens[0]}, 1 instance", "measured", measured * 1e3,
                "cost model predicted", predicted * 1e3, "ms", higher_is_better=False,
                rel_err=err)
    for kv_lens in decodes:
        bench = DecodeBench(cluster, kv_lens, spread=False)
        bench.run(3)
        measured = statistics.median(bench.run(5 if smoke else 20))
        bench.close()
        predicted = cm.decode_time(kv_lens, 1, 1)
        err = abs(predicted - measured) / measured
        errors.append(err)
        rec.add(f"decode {len(kv_lens)}x{kv_lens[0]}, 1 instance", "measured", measured * 1e3,
                "cost model predicted", predicted * 1e3, "ms", higher_is_better=False,
                rel_err=err)
    print(f"  cost model vs measured one-instance iterations: mean relative error "
          f"{100 * statistics.mean(errors):.1f}%, max {100 * max(errors):.1f}% "
          f"({len(errors)} cases; target < 10%)")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    smoke = "--smoke" in argv
    if smoke:
        argv.remove("--smoke")
    args = parse_out(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    CostModel = _plans()[0]
    model = CostModel.default().model
    parts = (args.only or "host,share,cost").split(",")
    out = None if smoke else args.out
    with torch.no_grad():
        for name, fn in (("host", part_host), ("share", part_share), ("cost", part_cost)):
            if name in parts:
                fn(Recorder(f"runtime_{name}", out), model, dev, dtype, smoke)


if __name__ == "__main__":
    main()
