"""Whether the 64k striped ring on 4 and 8 virtual ranks waits on its host threads or on its
message copies (EXTRA="python3 bench/diag_ring_host.py"): bench_ring's ring_prefill took 63.1 /
69.1 ms against its step kernels alone 57.1 / 62.6 on one H100 (7a4385d), ~10% over them where
h100_snake had 6% and the H200 1.8-4.1%.

- run_local's return (every rank's thread has launched its work; no synchronize) against the
  time until the GPU is done: equal times mean the ring waits on its host threads;
- each ring three ways, interleaved: as `local_group` builds it, with the message copies' streams
  at the highest priority (`high_priority_comm`, its prediction there);
- and with the dynamic schedule's counter zeroed per launch, as before it reset itself
  (`counter_zeroed_per_launch`, its prediction there);
- one P=4 ring under torch.profiler: the GPU's busy time (the union of kernel, memcpy and memset
  intervals over all streams) against the span, by kind of work, the trace saved as
  $OUT/ring_p4_trace.json.

The step's own host path (1k tokens per rank launched: 96.7 TFLOP/s against 278 from a graph) is
`diag_step.py --only host`.
"""

import collections
import json
import os
import time

import harness  # noqa: F401  (first: puts this checkout's esp_kernels on the path)
import torch

from ring_cases import StripedRing, random_qkv

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from esp_kernels.prefill import gluon_step


def main(L=65536, Hq=32, Hkv=8, D=128, reps=5):
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        worlds = {"comm streams at default priority": local_group(P, "cuda"),
                  "comm streams at high priority": high_priority_comm(local_group(P, "cuda"))}

        def ring_on(groups):
            return lambda: run_local(groups, lambda gr: esp.ring_prefill(
                ring.qs[gr.rank], ring.ks[gr.rank], ring.vs[gr.rank], [L], gr))
        rings = {name: ring_on(groups) for name, groups in worlds.items()}
        rings["counter zeroed per launch"] = counter_zeroed_per_launch(
            ring_on(local_group(P, "cuda")))
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
                print(f"ring L={L} P={P}, {name}: run_local returned after {host:6.2f} ms, "
                      f"the GPU done after {total:6.2f} ms", flush=True)
        if P == 4:
            ring_timeline(rings["comm streams at default priority"])


def high_priority_comm(groups):
    """The virtual ranks' world with its communication streams (where the message copies run)
    recreated at the highest priority, as its constructor makes them otherwise: a copy kernel
    then takes the next SM a persistent step kernel frees, ahead of queued step CTAs. Prediction
    (before any run): if the ring's ~10% over its kernels is copies waiting behind other ranks'
    steps, this cuts it to <= 5% at P=4; if it is the host, nothing moves."""
    world = groups[0]._world
    dev = world.comm_streams[0].device
    # torch maps a priority past the device's range to its highest (torch has no range query)
    world.comm_streams = [torch.cuda.Stream(dev, priority=-100) for _ in world.comm_streams]
    if world.box is not None:
        world.box = type(world.box)(len(world.comm_streams), dev.index,
                                    [s.cuda_stream for s in world.comm_streams])
    return groups


def counter_zeroed_per_launch(ring):
    """The ring with the dynamic schedule's counter as before it reset itself: a fresh one per
    launch, zeroed by a fill kernel on the step's stream, which on virtual ranks waits for an SM
    that another rank's persistent step holds. Prediction (before any run): the self-resetting
    counter is >= 1% faster at P=4 if these fills sit on the ring's critical path, else tied."""
    def zeroed(device):
        return torch.zeros(1, dtype=torch.int32, device=device)

    def run():
        kept = gluon_step._dynamic_counter
        gluon_step._dynamic_counter = zeroed
        try:
            return ring()
        finally:
            gluon_step._dynamic_counter = kept
    return run


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
