"""Where a runtime decode iteration's time goes (GPU): wall per iteration, host functions
(cProfile), CPU ops and CUDA API calls (torch.profiler), on the cost model's model shape, one
instance.

  python bench/diag_runtime.py [--case 16x1024] [--pool-tokens N] [--iters 10]

--pool-tokens sizes the instance's KV pool (default: the case's tokens + appends); the cost rows
of bench_runtime.py share one large pool across all their cases.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runtime import DecodeBench, llama_cfg  # noqa: E402

from esp_kernels.runtime import LlamaAdapter, VirtualCluster  # noqa: E402
from esp_kernels.scheduler import CostModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="16x1024")
    ap.add_argument("--pool-tokens", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model's")
    args = ap.parse_args()
    B, L = (int(x) for x in args.case.split("x"))
    dev = torch.device("cuda")
    model = CostModel.default().model
    cfg = llama_cfg(model, layers=args.layers or None)
    adapter = LlamaAdapter.random(cfg, torch.bfloat16, dev)
    slots = max(args.pool_tokens, B * (L + 64))
    cluster = VirtualCluster(adapter, 1, (slots // 16 + 4) * 16, 16)
    bench = DecodeBench(cluster, [L] * B, spread=False)
    with torch.no_grad():
        bench.run(3)
        wall = statistics.median(bench.run(args.iters))
        print(f"decode {B}x{L}, pool {slots} tokens, {cfg['num_hidden_layers']} layers: "
              f"{wall * 1e3:.2f} ms per iteration (median of {args.iters}); phases (ms) "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in vars(cluster.last_times).items()))
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        bench.run(args.iters)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print("\n--- cProfile, by own time,", args.iters, "iterations ---")
        print("\n".join(s.getvalue().splitlines()[:45]))
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            bench.run(3)
        print("\n--- torch.profiler, 3 iterations, by self CPU time ---")
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        print("\n--- by device time ---")
        print(tp.key_averages().table(sort_by="self_device_time_total", row_limit=20))


if __name__ == "__main__":
    main()
