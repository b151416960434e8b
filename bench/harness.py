"""Benchmark harness: event timing, same-run anchors, result rows, plots.

Every benchmark row carries our number, the anchor's number measured in the same run, and their
ratio; rows are appended as JSON lines tagged with device, commit and date. Timing: CUDA events
around the measured call, warm-up first, L2 flushed before every repetition (a 256 MB write), the
median and the 10th/90th percentiles reported. With the flush, the GPU also spins ~0.3 ms before
the start event, so the host has queued the measured call before the GPU reaches it: the events
then time the device work (kernels and the gaps between them), not the host's launch overhead,
which bench_decode measures on its own. Without this, an op whose Python launch path outlasts
the flush (SDPA's context manager, ~0.1 ms) had up to 100 us of host time in its "kernel" time
(H100: cuDNN decode 438 us by events vs 357 us of kernels in the same loop).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's esp_kernels (gpu_check.sh's BASELINE_DIR runs another)

from esp_kernels.config import _git_commit  # noqa: E402

_FLUSH = None


_HOST_AHEAD_CYCLES = 500_000  # ~0.3 ms at H100 clocks


def _flush_buffer() -> torch.Tensor:
    """256 MB on the GPU, five times L2, made once."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    return _FLUSH


def flush_l2():
    """Evict L2 (256 MB write)."""
    _flush_buffer().fill_(1)


def evict_l2_clean():
    """Evict L2 by reading 256 MB (a reduction to one byte): the lines left behind are clean, so
    the measured call's reads need not write any back, as after a layer's weight-bound GEMM.
    flush_l2 leaves L2 full of dirty lines (its 256 MB write): a call that then reads ~33 MB of
    KV first writes back up to L2's ~50 MB."""
    _flush_buffer().amax()


def flush_and_get_ahead(clean: bool = False):
    """Evict L2 (flush_l2, or with clean=True evict_l2_clean), then keep the GPU busy so the
    host gets ahead of it."""
    (evict_l2_clean if clean else flush_l2)()
    torch.cuda._sleep(_HOST_AHEAD_CYCLES)


def time_cuda(fn, warmup: int = 3, reps: int = 10, flush: bool = True) -> dict:
    """Median / p10 / p90 milliseconds of fn() measured with CUDA events."""
    return time_cuda_interleaved({"fn": fn}, warmup, reps, flush)["fn"]


def time_cuda_interleaved(fns: dict, warmup: int = 3, reps: int = 10,
                          flush: bool = True, clean: bool = False, prime: bool = False) -> dict:
    """time_cuda of every fn in `fns` ({name: fn}), taken round-robin like
    time_wall_interleaved (the order rotated each round), so that a kernel and its anchor share
    the GPU's clock and power state; clean: L2 evicted by reads (evict_l2_clean). prime: each
    timed call follows an untimed call of the same fn (before the flush), as in a loop of that
    kernel, so no contender pays for GPU state another one left (H100, B8 L1k decode: our call
    took 31.0-31.5 us when SDPA's cuDNN kernel and FlashInfer's tensor-core decode had both run
    within the three calls before it, 28.4-28.9 after itself or other sequences; the anchors the
    same after anything; bench/diag_decode.py --order). Returns {name: summary}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for name, fn in rotated(fns, reps):
        if prime:
            fn()
        if flush:
            flush_and_get_ahead(clean)
        times[name].append(event_ms(fn))
    return {name: _summary(t) for name, t in times.items()}


def rotated(fns: dict, reps: int):
    """(name, fn) of every fn in `fns`, `reps` rounds, the order rotated by one each round so
    that no contender always runs first."""
    order = list(fns.items())
    for rep in range(reps):
        yield from order[rep % len(order):] + order[:rep % len(order)]


def event_ms(fn) -> float:
    """Milliseconds between CUDA events recorded around fn() (waits for the second)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_wall(fn, warmup: int = 2, reps: int = 5) -> dict:
    """Host wall time of fn() including a final device synchronize (multi-stream work)."""
    return time_wall_interleaved({"fn": fn}, warmup, reps)["fn"]


def time_wall_interleaved(fns: dict, warmup: int = 2, reps: int = 7) -> dict:
    """time_wall of every fn in `fns` ({name: fn}), taken round-robin (one run of each per
    round) so that they share the GPU's clock and power state: on an H100 at its power cap the
    same 64k ring's step kernels ran 3.3 ms each early in a call and 3.8 ms later in it, more
    than the differences these comparisons look for. Wall time from the call to a device
    synchronize: a single kernel's row includes its launch (~10-60 us of host). Returns
    {name: summary}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {name: [] for name in fns}
    for name, fn in rotated(fns, reps):
        if torch.cuda.is_available():
            flush_l2()  # the sync below already puts the host ahead
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summary(t) for name, t in times.items()}


def host_us(fn, calls: int, warmup: int = 20) -> tuple[float, float]:
    """Host microseconds per call of fn launched back to back, and per call until the GPU has
    finished them (host-only time far under the second: the GPU is the limit; equal: the
    host)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls * 1e6


def cprofile_top(fn, calls: int, lines: int) -> str:
    """cProfile of `calls` calls of fn (the GPU drained after): the `lines` functions with the
    most time of their own."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(lines)
    return buf.getvalue()


def gpu_trace_events(fn, path: str) -> list[dict]:
    """One call of fn under torch.profiler (the GPU drained inside), its chrome trace saved to
    `path`; returns the trace's GPU events (kernels, copies, memsets) with a duration, empty
    without CUPTI."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        return [e for e in json.load(f)["traceEvents"]
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]


def busy_and_span_us(events: list[dict]) -> tuple[float, float]:
    """Microseconds some GPU work of `events` ran (the union of their intervals over all
    streams), and from the first one's start to the last one's end."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy, end = busy + b - a, b
        elif b > end:
            busy, end = busy + b - end, b
    return busy, end - spans[0][0]


def cuda_api_calls(fn, per: int) -> dict:
    """{CUDA API name: calls per unit} while fn() runs under torch.profiler (CUPTI), fn doing
    `per` units of work: the stable measure of a host path when the host's speed drifts."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    counts = collections.Counter(e.name for e in prof.events()
                                 if e.name.startswith("cu") and not e.name.startswith("cuda::"))
    return {k: round(v / per, 2) for k, v in sorted(counts.items())}


def _summary(times):
    s = sorted(times)
    q = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"ms": statistics.median(s), "p10": q(0.1), "p90": q(0.9), "n": len(s),
            "rounds": list(times)}


def paired_speedup(ours: dict, anchor: dict) -> float:
    """Median over the rounds of anchor ms / ours ms, for two summaries of one interleaved
    timing (each round's pair ran within one round-robin pass): the ratio a row reports. The GPU's
    clocks drift more between rounds than within one (H100 at its power cap: one FA3 call 52.2 to
    56.7 ms across calls), so the ratio of the medians mixes rounds; the per-round ratio does
    not."""
    return statistics.median(a / o for o, a in zip(ours["rounds"], anchor["rounds"]))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read + written (the memory ceiling)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), warmup=3, reps=10, flush=False)
    return 2 * nbytes / (t["ms"] * 1e-3) / 1e9


def run_info() -> dict:
    # ESP_COMMIT first, else this checkout's commit. A copied working tree (the GPU machine's) can
    # carry a stale .git; _git_commit marks that "-modified", and a tag equal to that stale HEAD
    # (a $(git rev-parse) evaluated there) gets the same mark.
    checkout = _git_commit()
    tag = os.environ.get("ESP_COMMIT", "")
    commit = checkout if not tag or checkout == tag + "-modified" else tag
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


class Recorder:
    """Collects rows of one benchmark family, prints them as they come, appends JSON lines."""

    def __init__(self, family: str, out: str | None):
        self.family, self.out = family, out
        self.info = run_info()
        self.rows = []
        print(f"\n== {family} on {self.info['device']} (commit {self.info['commit']}) ==",
              flush=True)

    def add(self, case: str, ours: str, ours_val: float, anchor: str, anchor_val: float,
            unit: str, higher_is_better: bool = True, ratio: float | None = None, **extra):
        """ratio: ours over the anchor, better > 1 (by default from the two values; interleaved
        timings pass `paired_speedup`)."""
        if ratio is None:
            ratio = (ours_val / anchor_val if higher_is_better else anchor_val / ours_val) \
                if anchor_val and ours_val else float("nan")
        row = {"family": self.family, "case": case, "ours": ours, "ours_value": ours_val,
               "anchor": anchor, "anchor_value": anchor_val, "unit": unit, "ratio": ratio,
               "higher_is_better": higher_is_better, **extra, **self.info}
        self.rows.append(row)
        print(f"  {case:<44} {ours:<22} {ours_val:>10.3f} {unit:<8} | {anchor:<26} "
              f"{anchor_val:>10.3f} | ratio {ratio:6.3f}", flush=True)
        if self.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def parse_out(argv=None):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench.jsonl"))
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--only", default=None,
                   help="comma-separated parts to run (names per benchmark; default all)")
    return p.parse_args(argv)


def graph_replay(fn):
    """fn captured once into a CUDA graph (after one eager call); returns the graph's replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_graph(fn):
    """time_cuda of fn captured once into a CUDA graph (device time without host launches)."""
    return time_cuda(graph_replay(fn), warmup=2, reps=10)


def compare(before_path: str, after_path: str) -> None:
    """Print the rows two result files share (same family, case, op and anchor): our value
    before and after and the change (positive: better), e.g. a baseline tree vs this one."""
    def load(path):
        rows = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    rows[(r["family"], r["case"], r["ours"], r["anchor"])] = r
        return rows
    before, after = load(before_path), load(after_path)
    shared = [k for k in after if k in before]
    print(f"{len(shared)} rows in both ({before_path}: {len(before)}, {after_path}: "
          f"{len(after)})")
    for key in shared:
        b, a = before[key], after[key]
        better = a["ours_value"] / b["ours_value"] if a["higher_is_better"] else \
            b["ours_value"] / a["ours_value"]
        print(f"  {key[0]:<14} {key[1]:<48} {key[2]:<22} {b['ours_value']:>10.3f} -> "
              f"{a['ours_value']:>10.3f} {a['unit']:<8} {100 * (better - 1):+6.1f}%  "
              f"(anchor {key[3]})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python bench/harness.py compare BEFORE.jsonl AFTER.jsonl")
