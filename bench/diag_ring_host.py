"""Where the 64k striped ring on 4 and 8 virtual ranks loses time over its step kernels
(EXTRA="python3 bench/diag_ring_host.py"). On one H100 (684013c) one P=4 ring under the profiler
kept the GPU busy 95% of its span, the first step kernel starting 3.2 ms after the first copy;
at 528a876 (h100_ring_drivers) that start took 3.09 ms on fresh threads, 1.32 on threads kept
from call to call (a pool run_local had for a while: 1% on the ring, and state of one call's
thread leaking into the next, so it went) and 0.53 from one thread (run_steps); interleaved
without the profiler the P=8 ring from one thread ended 5% sooner than from threads.

- each ring two ways, interleaved: `ring_prefill` in one thread per rank (`run_local`) and
  `ring_prefill_steps` with every rank advanced from one thread (`run_steps`); for each, when
  the driver returned (everything enqueued) and when the GPU was done;
- the host time of one small copy as the first CUDA call of 4 fresh threads at once, against the
  same copy in threads that already made one (is it thread start-up?);
- each driver's P=4 ring under torch.profiler: the GPU's busy time (the union of kernel, memcpy
  and memset intervals over all streams) against the span, by kind of work, and when the first
  step kernel started; the traces saved as $OUT/ring_p4_<driver>_trace.json.

The step's own host path (1k tokens per rank launched: 96.7 TFLOP/s against 278 from a graph) is
`diag_step.py --only host`; `--short` profiles the host path of the 8k ring on 8 ranks instead.
"""

import collections
import os
import threading
import time

# harness first: it puts this checkout's esp_kernels on the path
from harness import busy_and_span_us, cprofile_top, gpu_trace_events, host_us
import torch

from ring_cases import StripedRing, random_qkv

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local, run_steps


def main(L=65536, Hq=32, Hkv=8, D=128, reps=5):
    first_call_in_fresh_threads()
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        groups = local_group(P, "cuda")
        def threads():
            return run_local(groups, lambda gr: esp.ring_prefill(
                ring.qs[gr.rank], ring.ks[gr.rank], ring.vs[gr.rank], [L], gr))

        rings = {
            "threads (run_local)": threads,
            "one thread (run_steps)": lambda: run_steps(groups, [esp.prefill.ring_prefill_steps(
                ring.qs[r], ring.ks[r], ring.vs[r], [L], groups[r]) for r in range(P)]),
        }
        for fn in rings.values():
            for _ in range(2):
                fn()
        torch.cuda.synchronize()
        for _ in range(reps):
            for name, fn in rings.items():
                t = time.perf_counter()
                fn()
                host = (time.perf_counter() - t) * 1e3
                torch.cuda.synchronize()
                total = (time.perf_counter() - t) * 1e3
                print(f"ring L={L} P={P}, {name}: the driver returned after {host:6.2f} ms, "
                      f"the GPU done after {total:6.2f} ms", flush=True)
        if P == 4:
            for name, fn in rings.items():
                ring_timeline(fn, name)


def first_call_in_fresh_threads(n=4, reps=5):
    """Host time of one 1 MiB device copy as each of n threads' first CUDA call, the n threads
    started together, against the same copy made again in those threads."""
    src = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    dsts = [torch.empty_like(src) for _ in range(n)]
    torch.cuda.synchronize()
    for _ in range(reps):
        first, again = [0.0] * n, [0.0] * n
        go = threading.Barrier(n)

        def body(r):
            go.wait()
            t = time.perf_counter()
            dsts[r].copy_(src)
            first[r] = (time.perf_counter() - t) * 1e6
            t = time.perf_counter()
            dsts[r].copy_(src)
            again[r] = (time.perf_counter() - t) * 1e6

        threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        torch.cuda.synchronize()
        print(f"copy as the first CUDA call of {n} fresh threads: "
              f"{' '.join(f'{x:7.1f}' for x in first)} us; again: "
              f"{' '.join(f'{x:6.1f}' for x in again)} us", flush=True)


def ring_timeline(ours, name):
    """GPU busy time of one ring against its span, from a profiler trace (kernels, copies)."""
    tag = name.split(" (")[0].replace(" ", "_")
    events = gpu_trace_events(
        ours, os.path.join(os.environ.get("OUT", "/tmp"), f"ring_p4_{tag}_trace.json"))
    if not events:
        print(f"ring P=4, {name}, under the profiler: the trace holds no GPU events (no CUPTI?)")
        return
    busy, span = busy_and_span_us(events)
    start = min(e["ts"] for e in events)
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        kind = "ring step" if "ring_step" in e["name"] else f"{e['cat']}: {e['name'][:60]}"
        by_kind[kind][0] += 1
        by_kind[kind][1] += e["dur"]
    first_step = min(e["ts"] for e in events if "ring_step" in e["name"]) - start
    print(f"ring P=4, {name}, under the profiler: span {span / 1e3:.2f} ms, GPU busy "
          f"{busy / 1e3:.2f} ms ({busy / span:.1%}); the first step kernel began "
          f"{first_step / 1e3:.2f} ms after the first GPU work; streams "
          f"{len({e['tid'] for e in events})}")
    for kind, (count, dur) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:<72} {count:5d} x, {dur / 1e3:8.2f} ms")


def short_ring_profile(L=8192, P=8, Hq=32, Hkv=8, D=128, rings=50):
    """`--short`: the 8k ring on 8 virtual ranks (1k tokens per rank, 64 steps) is host-bound
    (h100 at 1a6e780: 12.8 ms against 7.1 for its steps launched back to back and ~2 from a
    graph): host time per ring and step from one thread, and a cProfile of it."""
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    ring = StripedRing(q, k, v, P)
    groups = local_group(P, "cuda")

    def one():
        return run_steps(groups, [esp.prefill.ring_prefill_steps(
            ring.qs[r], ring.ks[r], ring.vs[r], [L], groups[r]) for r in range(P)])
    host, total = host_us(one, rings, warmup=5)
    print(f"short ring L={L} P={P}: host {host / 1e3:.2f} ms a ring ({host / P / P:.1f} us a "
          f"step), GPU done after {total / 1e3:.2f} ms a ring", flush=True)
    print(cprofile_top(one, rings, 24))


if __name__ == "__main__":
    import sys

    short_ring_profile() if "--short" in sys.argv[1:] else main()
