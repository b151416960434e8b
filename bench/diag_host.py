"""Where the host time of a decode layer goes on virtual ranks (gpu_check.sh host_diag):
exchange cost with CPU vs GPU tensors, then cProfile of rank 0's decode loop with 2 ranks."""

import cProfile
import io
import pstats
import time

import torch

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from bench_decode import build_sharded, Hq, D


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


def main():
    for n in (1, 2, 4):
        print(f"exchange, {n} virtual ranks: cpu {exchange_us(n, 'cpu'):.1f} us, "
              f"cuda {exchange_us(n, 'cuda'):.1f} us")
    gen = torch.Generator(device="cuda").manual_seed(0)
    groups = local_group(2, "cuda")
    caches, plans = build_sharded(groups, 8, 256, 2, gen)
    qs = [torch.randn(4, Hq, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def loop(g, c, p, q):
        for _ in range(10):
            esp.distributed_decode(q, c, p, g)
        prof = cProfile.Profile() if g.rank == 0 else None
        if prof:
            prof.enable()
        for _ in range(100):
            esp.distributed_decode(q, c, p, g)
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            return s.getvalue()
        return ""

    print(run_local(groups, loop, caches, plans, qs)[0])


if __name__ == "__main__":
    main()
