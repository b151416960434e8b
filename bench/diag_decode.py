"""Where the decode kernel's stream falls short of cuDNN's (EXTRA="cd bench && python3 diag_decode.py").

Times the paged decode kernel with the block table in order (pages laid out like contiguous KV)
against shuffled pages (bench_decode.py's layout), next to SDPA CUDNN on contiguous KV, for the two
shapes that miss the bar. If in-order pages close the gap, DRAM/TLB locality of the pieces is the
cause; if not, the kernel's own stream is. With --ncu, runs each case once inside
cudaProfilerStart/Stop for `ncu --profile-from-start off` (with --short: B8 L1k, ours and the
anchors; with --long: B16 L16k, the same; --page 1 for one-token pages); with --ab, compares the
balanced and deterministic split schedules in interleaved rounds; with --profile, splits
bench_decode's event time (L2 flushed before each call) into the device time of each kernel it
launches, for ours and cuDNN, so time outside the main kernel (launch gaps, the split merge,
memsets) is visible; with --short, sweeps the split count and schedule of the short shapes (B8 L1k,
where the bar is furthest) in interleaved rounds, next to SDPA CUDNN on contiguous KV; with --flush,
times bench_decode's four shapes (page 16, shuffled) against the paged anchors round-robin twice,
after an L2 flush that leaves dirty lines (bench_decode's, a 256 MB write) and after one that leaves
clean lines (a 256 MB read), and at B8 L1k three identical contenders of ours, so that an effect of
a contender's place in the rotation shows; with --warm, times the B8 L1k call after a foreign
kernel, after itself and after the same kernels on a tiny problem (other buffers, other pages): if
the last two match, what the call before leaves warm is the kernels' code, not data or translations;
with --order, times --flush's B8 L1k contenders by the contender that ran before each, in three
cyclic orders (the third with a projection GEMM, a decode layer's kernel before attention); with
--l2-policy, times our call with and without the evict-first L2 policy on its KV copies over KV
sizes of 33.6 MB-1.07 GB, after dirty and clean evictions (where the host's kv_evict_first rule
should switch on this GPU).
"""

import argparse
import collections

import itertools

import torch

from anchors import flashinfer_decode
from bench_decode import D, Hkv, Hq, paged, sdpa_contiguous
from harness import (copy_bandwidth_gbs, event_ms, flush_and_get_ahead, paired_speedup, rotated,
                     time_cuda, time_cuda_interleaved)

from esp_kernels.decode.partial import decode_partial


def cases(gen):
    for B, L in ((1, 131072), (16, 16384)):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        o = torch.empty(B, Hq, D, device="cuda")
        lse = torch.empty(B, Hq, device="cuda")
        for ps in (16, 1):
            k, v, shuffled, lens = paged(B, L, ps, gen)
            in_order = torch.arange(shuffled.numel(), device="cuda", dtype=torch.int32)
            for name, bt in (("in order", in_order.view_as(shuffled)), ("shuffled", shuffled)):
                yield (f"B{B} L{L} page {ps} {name}", 4 * B * L * Hkv * D,
                       lambda q=q, k=k, v=v, bt=bt, lens=lens, L=L, o=o, lse=lse:
                       decode_partial(q, k, v, bt, lens, max_len=L, o=o, lse=lse))
            del k, v
        yield (f"B{B} L{L} SDPA CUDNN contiguous", 4 * B * L * Hkv * D,
               sdpa_contiguous(q, B, L, gen))


def paged_anchors(q, k, v, bt, L, tensor_cores=(True, False)) -> dict:
    """FlashInfer's paged decode over the same pages, {"FlashInfer TC" / "FlashInfer CUDA cores":
    fn}, the kernels that are not carried left out."""
    out = {}
    for tc in tensor_cores:
        fi = flashinfer_decode(q, k, v, bt, L, tensor_cores=tc)
        if fi is not None:
            out[f"FlashInfer {'TC' if tc else 'CUDA cores'}"] = fi
    return out


def shuffled_case(gen, B, L, page=16):
    """q and K/V in shuffled pages of `page` tokens for B requests of L tokens, and our call over
    them into preallocated outputs: (q, k, v, block table, ours); ours(table) reads the pages
    through another block table of the same shape."""
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    o = torch.empty(B, Hq, D, device="cuda")
    lse = torch.empty(B, Hq, device="cuda")
    k, v, bt, lens = paged(B, L, page, gen)
    return q, k, v, bt, lambda table=bt: decode_partial(q, k, v, table, lens, max_len=L, o=o,
                                                         lse=lse)


def l2_policies(gen, reps=30):
    """Ours with and without the evict-first L2 policy on the KV copies (the host's rule
    kv_evict_first forced both ways), page 16 shuffled, over KV sizes of 33.6 MB-1.07 GB a call,
    after a dirty and after a clean L2 eviction: where the rule should switch on this GPU."""
    from esp_kernels.decode import partial

    rule = partial.kv_evict_first
    l2 = torch.cuda.get_device_properties(0).L2_cache_size

    def forced(ours, on):
        def call():
            partial.kv_evict_first = lambda *args: on
            try:
                return ours()
            finally:
                partial.kv_evict_first = rule
        return call

    for B, L in ((8, 1024), (16, 1024), (8, 2048), (4, 4096), (1, 16384), (32, 1024),
                 (8, 4096), (1, 32768), (64, 512), (16, 4096), (64, 1024), (1, 65536),
                 (1, 131072), (16, 16384), (64, 4096)):
        q, k, v, bt, ours = shuffled_case(gen, B, L)
        fns = {"normal": forced(ours, False), "evict-first": forced(ours, True)}
        picked = "evict-first" if rule(B, Hkv, L, D, 2, l2) else "normal"
        for clean in (False, True):
            t = time_cuda_interleaved(fns, reps=reps, clean=clean, prime=True)
            print(f"B{B} L{L} ({4 * B * L * Hkv * D / 1e6:6.1f} MB, rule: {picked:11s}) "
                  f"{'clean' if clean else 'dirty'}: normal {t['normal']['ms'] * 1e3:7.1f} us, "
                  f"evict-first {t['evict-first']['ms'] * 1e3:7.1f} us, speedup "
                  f"{paired_speedup(t['evict-first'], t['normal']):5.3f}")
        del k, v


def print_both_evictions(title, fns, reps, speedup_of=None):
    """fns timed round-robin after a dirty and after a clean L2 eviction, a line each, with
    fns[speedup_of]'s paired speedup over each when given."""
    for clean in (False, True):
        t = time_cuda_interleaved(fns, reps=reps, clean=clean)
        print(f"{title}, L2 evicted {'clean' if clean else 'dirty'}:")
        for name, r in t.items():
            speedup = (f"  ours' speedup: {paired_speedup(t[speedup_of], r):5.3f}"
                       if speedup_of else "")
            print(f"    {name:24s} {r['ms'] * 1e3:7.1f} us (p10 {r['p10'] * 1e3:6.1f}, p90 "
                  f"{r['p90'] * 1e3:6.1f}){speedup}")


def anchor_cases(gen, B, L, page=16):
    """B requests of L tokens in shuffled pages of `page` tokens: ours (also over pages in pool
    order) and the anchors (--ncu --short: B8 L1k; --ncu --long: B16 L16k; --page)."""
    q, k, v, bt, ours = shuffled_case(gen, B, L, page)
    nbytes = 4 * B * L * Hkv * D
    in_order = torch.arange(bt.numel(), device="cuda", dtype=torch.int32).view_as(bt)
    yield f"B{B} L{L} page {page} shuffled, ours", nbytes, ours
    yield f"B{B} L{L} page {page} in pool order, ours", nbytes, lambda: ours(in_order)
    for name, fi in paged_anchors(q, k, v, bt, L).items():
        yield f"B{B} L{L} page {page} shuffled, {name}", nbytes, fi
    yield f"B{B} L{L} SDPA CUDNN contiguous", nbytes, sdpa_contiguous(q, B, L, gen)


def head_layouts(gen):
    """Same KV bytes (537 MB), same CTA count (256 x 1024 tokens x 4 kv heads), different
    distance between a CTA's 1 KB pieces: Hkv = 4 reads whole token rows (pieces adjacent), Hkv
    = 8 every other KB (bench_decode's shape), Hkv = 16 one KB in four; on 16-token pages and on
    one-token pages (where each piece is a row's share of its own page: does reading a shuffled
    page in parts, by several CTAs, cost more than reading it whole?)."""
    for ps in (16, 1):
        for hq, hkv, L in ((16, 4, 262144), (32, 8, 131072), (64, 16, 65536)):
            q = torch.randn(1, hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k, v, bt, lens = paged(1, L, ps, gen, hkv=hkv)
            yield (f"B1 L{L} Hq{hq}/Hkv{hkv} page {ps} shuffled", 4 * L * hkv * D,
                   lambda q=q, k=k, v=v, bt=bt, lens=lens, L=L: decode_partial(q, k, v, bt, lens,
                                                                             max_len=L))
            del k, v


def schedules_ab(gen, rounds=8, reps=15):
    """Balanced vs deterministic schedule, interleaved in rounds so that drift of the shared
    machine (run-to-run spread of +-5-10% between benchmark phases) hits both alike."""
    copy = copy_bandwidth_gbs()
    for B, L in ((1, 131072), (16, 16384), (64, 4096)):
        for ps in (16, 1):
            q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k, v, bt, lens = paged(B, L, ps, gen)
            times = {False: [], True: []}
            for _ in range(rounds):
                for det in (False, True):
                    t = time_cuda(lambda: decode_partial(q, k, v, bt, lens, max_len=L,
                                                         deterministic=det), reps=reps)
                    times[det].append(t["ms"])
            med = {d: sorted(x)[len(x) // 2] for d, x in times.items()}
            gbs = {d: 4 * B * L * Hkv * D / (m * 1e-3) / 1e9 for d, m in med.items()}
            print(f"B{B} L{L} page {ps}: balanced {med[False] * 1e3:6.1f} us "
                  f"({gbs[False] / copy:5.3f} of copy), deterministic {med[True] * 1e3:6.1f} us "
                  f"({gbs[True] / copy:5.3f}); balanced / deterministic time "
                  f"{med[False] / med[True]:5.3f}")
            del k, v


def short_sweep(gen, rounds=5, reps=20):
    """Split count x schedule on short shapes, interleaved in rounds (median of rounds); the
    cost model's count is marked. The balanced schedule's public call includes the memset of its
    tile counters (a prepared call skips it: PreparedDecodePartial)."""
    from esp_kernels.decode.partial import num_splits_for

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B, L in ((8, 1024), (8, 2048), (32, 1024), (64, 512)):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v, bt, lens = paged(B, L, 16, gen)
        o = torch.empty(B, Hq, D, device="cuda")
        lse = torch.empty(B, Hq, device="cuda")
        chosen = num_splits_for(B, Hkv, L, sms, D)
        cudnn = sdpa_contiguous(q, B, L, gen)
        runs = {("SDPA CUDNN contiguous", None): cudnn}
        for s in sorted({1, 2, 4, 8, 12, 16, 24, 32, chosen}):
            for det in (False, True):
                if s == 1 and det:
                    continue  # one split has no schedule
                runs[(s, det)] = (lambda s=s, det=det: decode_partial(
                    q, k, v, bt, lens, num_splits=s, o=o, lse=lse, deterministic=det))
        times = {key: [] for key in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                times[key].append(time_cuda(fn, reps=reps)["ms"] * 1e3)
        med = {key: sorted(x)[len(x) // 2] for key, x in times.items()}
        ref = med[("SDPA CUDNN contiguous", None)]
        print(f"B{B} L{L} page 16: SDPA CUDNN contiguous {ref:6.1f} us; cost model: {chosen} "
              "splits")
        for (s, det), us in med.items():
            if det is None:
                continue
            sched = "static" if det else ("balanced" if s > 1 else "-")
            mark = " <- cost model" if s == chosen else ""
            print(f"    {s:3d} splits {sched:9s} {us:6.1f} us  ({ref / us:5.3f} of cuDNN){mark}")
        del k, v, cudnn


def profile_kernels(gen, reps=20):
    """Event time of one call vs the CUPTI device time of every kernel in it (same loop)."""
    from torch.profiler import ProfilerActivity, profile

    for B, L in ((1, 131072), (16, 16384), (64, 4096), (8, 1024)):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v, bt, lens = paged(B, L, 16, gen)
        cudnn = sdpa_contiguous(q, B, L, gen)
        ours = lambda: decode_partial(q, k, v, bt, lens, max_len=L)  # noqa: E731
        for name, fn in (("decode_partial page 16", ours), ("SDPA CUDNN contiguous", cudnn)):
            ev = time_cuda(fn, reps=reps)["ms"] * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    flush_and_get_ahead()
                    fn()
                torch.cuda.synchronize()
            per = collections.defaultdict(float)
            for e in prof.events():
                name = e.name.lower()
                if (e.device_type == torch.autograd.DeviceType.CUDA
                        and "fill" not in name and "spin" not in name):
                    per[e.name[:70]] += e.device_time / reps
            total = sum(per.values())
            print(f"B{B} L{L} {name}: event {ev:7.1f} us, kernels {total:7.1f} us, "
                  f"outside kernels {ev - total:6.1f} us")
            for n, us in sorted(per.items(), key=lambda x: -x[1]):
                print(f"    {us:8.1f} us  {n}")
        del k, v, cudnn


def flush_modes(gen, reps=30):
    """Ours against the paged anchors after a dirty and after a clean L2 eviction."""
    for B, L in ((1, 131072), (16, 16384), (64, 4096), (8, 1024)):
        q, k, v, bt, ours = shuffled_case(gen, B, L)
        fns = {"ours": ours}
        if B == 8:  # the same call twice more: a place in the rotation must not change its time
            fns["ours, again"] = fns["ours, third"] = ours
        fns.update(paged_anchors(q, k, v, bt, L))
        fns["SDPA CUDNN contiguous"] = sdpa_contiguous(q, B, L, gen)
        print_both_evictions(f"B{B} L{L} page 16 shuffled", fns, reps, speedup_of="ours")
        del k, v


def warm_state(gen, reps=40):
    """B8 L1k, page 16 shuffled: what a call's predecessor leaves warm. Each contender of a
    round-robin follows the one listed before it (the rotation keeps that order)."""
    B, L = 8, 1024
    q, k, v, bt, ours = shuffled_case(gen, B, L)
    pad = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # other 2 MiB translation pages
    tq = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    to = torch.empty(B, Hq, D, device="cuda")
    tlse = torch.empty(B, Hq, device="cuda")
    tk, tv, tbt, tlens = paged(B, 64, 16, gen)
    # The same kernels and grid (16 splits, fixed ranges: the default here) on 64 tokens.
    tiny = lambda: decode_partial(tq, tk, tv, tbt, tlens, num_splits=16,  # noqa: E731
                                  deterministic=True, o=to, lse=tlse)
    fns = {"ours tiny (64 tokens)": tiny, "ours after tiny": ours,
           "SDPA CUDNN contiguous": sdpa_contiguous(q, B, L, gen), "ours after SDPA": ours,
           "ours after ours": ours}
    fns.update(paged_anchors(q, k, v, bt, L, tensor_cores=(False,)))
    print_both_evictions(f"B{B} L{L} page 16 shuffled", fns, reps)
    del pad


def by_predecessor(gen, reps=40):
    """B8 L1k, page 16 shuffled: --flush's six contenders (three of them the same call of ours)
    and a projection GEMM in three cyclic orders, each time listed by the contender that ran
    before it."""
    import statistics

    B, L = 8, 1024
    q, k, v, bt, ours = shuffled_case(gen, B, L)
    fns = {"ours": ours, "ours, again": ours, "ours, third": ours}
    fns.update(paged_anchors(q, k, v, bt, L))
    fns["SDPA CUDNN contiguous"] = sdpa_contiguous(q, B, L, gen)
    # What precedes attention in a decode layer: the QKV projection (Llama-3-8B's, 8 tokens).
    x = torch.randn(B, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(4096, 6144, device="cuda", dtype=torch.bfloat16, generator=gen)
    fns["bf16 GEMM 8x4096x6144"] = lambda: x @ w
    names = list(fns)
    pick = lambda idx: [names[i] for i in idx if i < len(names)]  # noqa: E731
    for order in (pick((0, 1, 2, 3, 4, 5)), pick((5, 3, 0, 4, 1, 2)),
                  pick((6, 0, 3, 1, 5, 2, 4))):
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        seen = collections.defaultdict(list)
        prev = "start"
        for name, fn in rotated({name: fns[name] for name in order}, reps):
            flush_and_get_ahead()
            seen[(name, prev)].append(event_ms(fn) * 1e3)
            prev = name
        print("order: " + " -> ".join(order))
        for (name, before), us in sorted(seen.items()):
            print(f"    {name:24s} after {before:24s} {statistics.median(us):7.1f} us "
                  f"({len(us)} runs)")
    del k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ab", action="store_true", help="balanced vs deterministic only")
    ap.add_argument("--profile", action="store_true", help="per-kernel device time only")
    ap.add_argument("--short", action="store_true", help="split sweep of the short shapes only")
    ap.add_argument("--long", action="store_true", help="with --ncu: B16 L16k against anchors")
    ap.add_argument("--page", type=int, default=16, choices=(16, 1),
                    help="with --ncu --short / --long: tokens per page")
    ap.add_argument("--flush", action="store_true", help="dirty vs clean L2 eviction only")
    ap.add_argument("--warm", action="store_true", help="what a predecessor leaves warm only")
    ap.add_argument("--order", action="store_true", help="B8 L1k times by predecessor only")
    ap.add_argument("--l2-policy", action="store_true", help="KV L2 policies by size only")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.l2_policy:
        l2_policies(gen)
        return
    if args.order:
        by_predecessor(gen)
        return
    if args.warm:
        warm_state(gen)
        return
    if args.flush:
        flush_modes(gen)
        return
    if args.short and not args.ncu:
        short_sweep(gen)
        return
    if args.profile:
        profile_kernels(gen)
        return
    if args.ab:
        schedules_ab(gen)
        return
    if args.ncu:
        picked = (anchor_cases(gen, 8, 1024, args.page) if args.short else
                  anchor_cases(gen, 16, 16384, args.page) if args.long else cases(gen))
        for name, _, fn in picked:
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print("profiled", name)
        return
    copy = copy_bandwidth_gbs()
    print(f"device copy {copy:.0f} GB/s (read + write)")
    for name, nbytes, fn in itertools.chain(head_layouts(gen), cases(gen)):
        t = time_cuda(fn, reps=30)
        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
        print(f"{name:40s} {t['ms'] * 1e3:7.1f} us (p10 {t['p10'] * 1e3:6.1f}, p90 "
              f"{t['p90'] * 1e3:6.1f})  {gbs:6.0f} GB/s = {gbs / copy:5.3f} of copy")


if __name__ == "__main__":
    main()
