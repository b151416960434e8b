"""Where a launched short ring step's host time goes (EXTRA="python3 bench/diag_step_host.py"):
the 8k-token ring on 8 ranks (1k tokens per rank), whose 64 steps launched one by one ran at
96.7 TFLOP/s against 278 from a CUDA graph (H100, 7a4385d): ~89 us a step against ~31 us of GPU
work, while the Triton twin's launches cost ~43 us.

For one off-diagonal merging step it prints:
- host microseconds per call (the loop's wall time, no synchronize inside; the GPU's queue stays
  short of full) of: the public ring_step (gluon and triton), ring_step_gluon, and the Triton
  launcher alone (`_launch`);
- the CUDA API calls per step (torch.profiler, CUPTI): a synchronizing call (a device-to-host copy,
  cudaStreamSynchronize) would serialize host and GPU;
- cProfile of 300 public gluon calls, by own time.

Then the 64k ring on 4 and 8 virtual ranks (bench_ring's ring_prefill, 63.1 / 69.1 ms against
its step kernels alone 57.1 / 62.6 on the same H100): how long run_local takes to return (every
rank's thread has launched its work; no synchronize) against the time until the GPU is done.
Equal times would mean the ring waits on its host threads, not on the GPU. Each ring runs
twice, interleaved: as `local_group` builds it, and with the message copies' streams at the
highest priority (`high_priority_comm`, its prediction there). And one P=4 ring
under torch.profiler: the GPU's busy time (the union of kernel, memcpy and memset intervals over
all streams) against the span, by kind of work, with the trace saved as $OUT/ring_p4_trace.json.
"""

import collections
import cProfile
import io
import json
import os
import pstats
import time

import harness  # noqa: F401  (first: puts this checkout's esp_kernels on the path)
import torch

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from ring_cases import StripedRing, random_qkv

from esp_kernels.prefill import gluon_step
from esp_kernels.prefill.step import ring_step


def host_us(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / reps * 1e6
    return host, total


def main():
    L, Hq, Hkv, D, P = 8192, 32, 8, 128, 8
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    ring = StripedRing(q, k, v, P)
    qi, kj, vj, cu, n, o, lse = ring.qs[1], ring.ks[0], ring.vs[0], ring.cu, ring.n, ring.o, \
        ring.lse
    o.zero_()
    lse.zero_()
    scale = D ** -0.5
    n_items = n * Hq // 128
    grid = (min(n_items, torch.cuda.get_device_properties(0).multi_processor_count),)
    dynamic = gluon_step.takes_items_dynamically(n_items, grid[0])
    assert not dynamic, "launcher() passes cu as the (unused) counter: snake schedules only"
    print(f"step: {n} queries x {n} keys, {n_items} items on {grid[0]} CTAs, "
          f"{'dynamic' if dynamic else 'snake'} schedule")

    def public(backend):
        return lambda: ring_step(qi, kj, vj, cu, cu, n, o, lse, mask_shift=0, accumulate=True,
                                 softmax_scale=scale, backend=backend)

    def direct():
        gluon_step.ring_step_gluon(qi, kj, vj, cu, cu, n, o, lse, True, 0, True, scale)

    def launcher():
        gluon_step._launch(grid, qi, kj, vj, cu, cu, None, cu, o, lse, Hq // Hkv, D,
                           n // (128 // (Hq // Hkv)), 1, n_items, True, 0, True, scale,
                           gluon_step.STAGES, gluon_step.BLOCK_N, True, dynamic)

    cases = (("ring_step, gluon", public("gluon")), ("ring_step, triton", public("triton")),
             ("ring_step_gluon", direct), ("_launch (Triton's launcher)", launcher))
    for rnd in range(2):
        for name, fn in cases:
            host, total = host_us(fn)
            print(f"round {rnd} {name:<28} host {host:7.1f} us a call, with the GPU "
                  f"{total:7.1f} us", flush=True)

    from torch.profiler import ProfilerActivity, profile
    fn = public("gluon")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    counts = collections.Counter(e.name for e in prof.events()
                                 if e.name.startswith("cu") and not e.name.startswith("cuda::"))
    print("CUDA API calls per public gluon step:",
          {k: round(c / 50, 2) for k, c in sorted(counts.items())})

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(f"--- cProfile, 300 public gluon steps ---\n{s.getvalue()}")
    ring_host()


def ring_host(L=65536, Hq=32, Hkv=8, D=128, reps=5):
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        worlds = {"comm streams at default priority": local_group(P, "cuda"),
                  "comm streams at high priority": high_priority_comm(local_group(P, "cuda"))}

        def ring_on(groups):
            return lambda: run_local(groups, lambda gr: esp.ring_prefill(
                ring.qs[gr.rank], ring.ks[gr.rank], ring.vs[gr.rank], [L], gr))
        for groups in worlds.values():
            for _ in range(2):
                ring_on(groups)()
        torch.cuda.synchronize()
        for _ in range(reps):
            for name, groups in worlds.items():
                t = time.perf_counter()
                ring_on(groups)()
                host = (time.perf_counter() - t) * 1e3
                torch.cuda.synchronize()
                total = (time.perf_counter() - t) * 1e3
                print(f"ring L={L} P={P}, {name}: run_local returned after {host:6.2f} ms, "
                      f"the GPU done after {total:6.2f} ms", flush=True)
        if P == 4:
            ring_timeline(ring_on(worlds["comm streams at default priority"]))


def high_priority_comm(groups):
    """The virtual ranks' world with its communication streams (where the message copies run)
    recreated at the highest priority, as its constructor makes them otherwise: a copy kernel
    then takes the next SM a persistent step kernel frees, ahead of queued step CTAs. Prediction
    (before any run): if the ring's ~10% over its kernels is copies waiting behind other ranks'
    steps, this cuts it to <= 5% at P=4; if it is the host, nothing moves."""
    world = groups[0]._world
    dev = world.comm_streams[0].device
    high = torch.cuda.Stream.priority_range()[1] if hasattr(torch.cuda.Stream, "priority_range") \
        else -1
    world.comm_streams = [torch.cuda.Stream(dev, priority=high) for _ in world.comm_streams]
    if world.box is not None:
        world.box = type(world.box)(len(world.comm_streams), dev.index,
                                    [s.cuda_stream for s in world.comm_streams])
    return groups


def ring_timeline(ours):
    """GPU busy time of one ring against its span, from a profiler trace (kernels, copies)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours()
        torch.cuda.synchronize()
    path = os.path.join(os.environ.get("OUT", "/tmp"), "ring_p4_trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not events:
        print("ring P=4 under the profiler: the trace holds no GPU events (no CUPTI?)")
        return
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = spans[-1][1] - spans[0][0]
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        kind = "ring step" if "ring_step" in e["name"] else f"{e['cat']}: {e['name'][:60]}"
        by_kind[kind][0] += 1
        by_kind[kind][1] += e["dur"]
    print(f"ring P=4 under the profiler: span {span / 1e3:.2f} ms, GPU busy {busy / 1e3:.2f} ms "
          f"({busy / span:.1%}); streams {len({e['tid'] for e in events})}")
    for kind, (count, dur) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:<72} {count:5d} x, {dur / 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
