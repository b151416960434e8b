"""Why the 64k ring with proactive retention trails the ring without it by more than its copies
(EXTRA="python3 bench/diag_ring_retention.py"). bench_ring at 6868ba9 on one H100, interleaved:
P=4 55.7 -> 60.4 ms (+8.5%), P=8 58.5 -> 64.2 (+9.7%), against ~0.2 ms of row copies (two of
the P instances keep every token: 2 x 64k tokens x 4 KiB of K and V).

- the ring with and without retention, interleaved (the GPU done after; median, p10-p90);
- the retention copies alone: every rank's P writes back to back on one stream (their own time);
- one P=4 ring of each under torch.profiler: GPU busy time against the span, time by kind of
  work, and per stream the sequence of kernels and copies with the idle gap before each (the
  copy of a retained block waiting for an SM while other ranks' persistent step kernels hold
  them all is the suspect); traces saved as $OUT/ring_p4_retention_<yes|no>_trace.json.
"""

import collections
import os

# harness first: it puts this checkout's esp_kernels on the path
from harness import (busy_and_span_us, gpu_trace_events, paired_speedup, time_cuda,
                     time_wall_interleaved)
import torch

from ring_cases import StripedRing, random_qkv

import esp_kernels as esp
from esp_kernels.comm import local_group, run_steps


def main(L=65536, Hq=32, Hkv=8, D=128):
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        plain_groups, retaining_groups = local_group(P, "cuda"), local_group(P, "cuda")
        caches = [esp.PagedKVCache(1, L // 16 + 64, 16, Hkv, D, torch.bfloat16, "cuda")
                  for _ in range(P)]
        plan = esp.RetentionPlan.fill_first([L], {0: L // 32 + 32, 1: L // 32 + 32}, 16)

        def ours(groups, retain=None):
            return run_steps(groups, [esp.prefill.ring_prefill_steps(
                ring.qs[r], ring.ks[r], ring.vs[r], [L], groups[r],
                retain=None if retain is None else retain[r]) for r in range(P)])

        rings = {
            "no": lambda: ours(plain_groups),
            "yes": lambda: ours(retaining_groups, [(plan, c, 0) for c in caches]),
        }
        t = time_wall_interleaved(rings, warmup=2, reps=9)
        for name, s in t.items():
            print(f"ring L={L} P={P} retention {name:>3}: {s['ms']:7.2f} ms "
                  f"(p10 {s['p10']:.2f}, p90 {s['p90']:.2f})", flush=True)
        print(f"  retention overhead {1 / paired_speedup(t['yes'], t['no']) - 1:+.1%} (median "
              "of the per-round ratios)")
        copies_alone(ring, caches, retaining_groups, P)
        if P == 4:
            for name, fn in rings.items():
                timeline(fn, f"retention_{name}")


def copies_alone(ring, caches, groups, P):
    """Every rank's retention writes of one layer (P blocks each) back to back on one stream."""
    from esp_kernels.prefill.ring import _RUNNERS

    writers = [_RUNNERS[g].writer for g in groups]
    blocks = []
    for j in range(P):
        kv = torch.stack([ring.ks[j].reshape(ring.n, -1), ring.vs[j].reshape(ring.n, -1)])
        blocks.append(kv.contiguous())

    def write_all():
        for w in writers:
            for j in range(P):
                w.write(j, blocks[j], 0)

    t = time_cuda(write_all, warmup=2, reps=7)
    kept = sum(w.maps[j][0].numel() for w in writers for j in range(P))
    print(f"  the retention copies alone: {t['ms']:.3f} ms for {kept} rows of K and V "
          f"({2 * kept * blocks[0].shape[2] * 2 * 2 / t['ms'] / 1e6:.0f} GB/s read + written)")


def timeline(fn, tag):
    fn()
    torch.cuda.synchronize()
    events = gpu_trace_events(
        fn, os.path.join(os.environ.get("OUT", "/tmp"), f"ring_p4_{tag}_trace.json"))
    if not events:
        print(f"  {tag}: the trace holds no GPU events (no CUPTI?)")
        return
    t0 = min(e["ts"] for e in events)
    busy, span = busy_and_span_us(events)
    print(f"  P=4 {tag} under the profiler: span {span / 1e3:.2f} ms, GPU busy "
          f"{busy / 1e3:.2f} ms ({busy / span:.1%})")
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        by_kind[short(e)][0] += 1
        by_kind[short(e)][1] += e["dur"]
    for kind, (count, dur) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"    {kind:<40} {count:4d} x, {dur / 1e3:8.3f} ms")
    per_stream = collections.defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        per_stream[e["tid"]].append(e)
    for tid, evs in sorted(per_stream.items(), key=lambda kv: kv[1][0]["ts"]):
        line, prev_end = [], None
        for e in evs:
            gap = 0.0 if prev_end is None else (e["ts"] - prev_end) / 1e3
            line.append(f"{short(e)}@{(e['ts'] - t0) / 1e3:.2f}+{e['dur'] / 1e3:.2f}"
                        f"(gap {gap:.2f})")
            prev_end = e["ts"] + e["dur"]
        print(f"    stream {tid}: " + ", ".join(line))


def short(e):
    name = e["name"]
    for key in ("ring_step", "copy_rows", "Memcpy", "Memset", "fill"):
        if key.lower() in name.lower():
            return f"{e['cat'].replace('gpu_', '')}:{key}"
    return f"{e['cat'].replace('gpu_', '')}:{name[:30]}"


if __name__ == "__main__":
    main()
