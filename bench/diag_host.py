"""Where the host time of a decode layer goes on virtual ranks (EXTRA="python3 bench/diag_host.py"):
exchange cost with CPU vs GPU tensors (a thread per rank, and run_steps), then cProfile of the
run_steps decode loop (all ranks in one thread) with 2 and 4 ranks.

--calls: the CUDA API calls of one decode layer per rank (torch.profiler, CUPTI), by name: the
host rows drift ~1.7x within one call on the GPU machine, the call counts do not (run it on a
baseline tree too to compare two commits)."""

import argparse
import cProfile
import io
import json
import pstats
import time

import harness  # (first: puts this checkout's esp_kernels on the path)
import torch

import esp_kernels
from esp_kernels.comm import local_group, run_local, run_steps
from bench_decode import decode_layers, host_case


def exchange_us(n, device):
    def body(g):
        x, y = torch.zeros(4, device=device), torch.zeros(4, device=device)
        P, r = g.size, g.rank
        for _ in range(20):
            g.exchange([(x, (r + 1) % P)], [(y, (r - 1) % P)]).wait()
        t = time.perf_counter()
        for _ in range(300):
            g.exchange([(x, (r + 1) % P)], [(y, (r - 1) % P)]).wait()
        return (time.perf_counter() - t) / 300 * 1e6
    return max(run_local(local_group(n, device), body))


def exchange_steps_us(n, device, reps=300):
    def body(g, reps):
        x, y = torch.zeros(4, device=device), torch.zeros(4, device=device)
        P, r = g.size, g.rank
        for _ in range(reps):
            yield g.exchange([(x, (r + 1) % P)], [(y, (r - 1) % P)])
    groups = local_group(n, device)
    run_steps(groups, [body(g, 20) for g in groups])
    t = time.perf_counter()
    run_steps(groups, [body(g, reps) for g in groups])
    return (time.perf_counter() - t) / reps / n * 1e6


def main():
    for n in (1, 2, 4):
        print(f"exchange, {n} virtual ranks, a thread each: cpu {exchange_us(n, 'cpu'):.1f} us, "
              f"cuda {exchange_us(n, 'cuda'):.1f} us")
        print(f"exchange per rank, {n} virtual ranks, run_steps: "
              f"cpu {exchange_steps_us(n, 'cpu'):.1f} us, cuda {exchange_steps_us(n, 'cuda'):.1f} us")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (2, 4):
        groups, caches, plans, qs = host_case(n, gen)
        decode_layers(groups, caches, plans, qs, 10)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        decode_layers(groups, caches, plans, qs, 200)
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(f"--- {n} ranks, 200 layers, run_steps ---\n{s.getvalue()}")


def api_calls(n, layers=50):
    """{CUDA API name: calls per decode layer and rank} of the host rows' layer on n virtual
    ranks (out= reused, run_steps), as CUPTI reports them to torch.profiler."""
    groups, caches, plans, qs = host_case(n, torch.Generator(device="cuda").manual_seed(3))
    outs = [torch.empty_like(q) for q in qs]
    decode_layers(groups, caches, plans, qs, 10, outs=outs)
    torch.cuda.synchronize()
    return harness.cuda_api_calls(lambda: decode_layers(groups, caches, plans, qs, layers,
                                                        outs=outs), per=layers * n)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", action="store_true", help="CUDA API calls per layer and rank")
    if ap.parse_args().calls:
        print("esp_kernels from", esp_kernels.__file__)
        for n in (1, 2, 4):
            c = api_calls(n)
            print(f"CUDA API calls per decode layer and rank, {n} virtual ranks: "
                  f"{sum(c.values()):.2f} {json.dumps(c)}")
    else:
        main()
