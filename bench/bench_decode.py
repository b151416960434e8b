"""Decode benchmarks, same run:

1. partial decode kernel over paged KV: KV bytes read / time vs device copy bandwidth, vs torch
   SDPA CUDNN on contiguous KV of the same shape, and vs FlashInfer's paged decode (tensor-core
   and CUDA-core kernels, carried anchors) on the same shuffled pages (bf16, D 128, Hq 32 /
   Hkv 8, page 16 and 1); each page set's contenders timed round-robin, a row's ratio the
   median of the per-round ratios.
   Bar: >= 1.0x the best anchor at (B1, L128k), (B16, L16k), (B64, L4k), (B8, L1k).
2. one multi-master decode layer on 2 and 4 virtual ranks vs one instance over the same KV.
3. host overhead per decode layer without graph capture (bar <= 30 us), and graph replay.
"""

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anchors import flashinfer_decode
from harness import (Recorder, copy_bandwidth_gbs, paired_speedup, parse_out, time_cuda,
                     time_cuda_interleaved, time_wall)

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local, run_steps
from esp_kernels.decode.partial import decode_partial

Hq, Hkv, D = 32, 8, 128


def paged(B, L, page_size, gen, hkv=Hkv, shuffled=True):
    """Paged K/V of B requests of L tokens; block table [B, pages]. shuffled: pages in random
    order over the whole pool (a fragmented pool); "2MiB": in random order within each 2 MiB of
    the pool, the windows in pool order (a diagnostic: as many distinct 2 MiB translation pages
    in flight as pool order, page runs as scattered as a full shuffle below that size); False: in
    pool order (a fresh allocator)."""
    pages = (L + page_size - 1) // page_size
    num = B * pages
    k = torch.randn(num, page_size, hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    if shuffled == "2MiB":
        w = max(1, (2 << 20) // (page_size * hkv * D * 2))  # pages per 2 MiB of K (and of V)
        key = torch.arange(num, device="cuda") // w * 2 + torch.rand(num, device="cuda",
                                                                    generator=gen)
        order = torch.argsort(key)
    elif shuffled:
        order = torch.randperm(num, device="cuda", generator=gen)
    else:
        order = torch.arange(num, device="cuda")
    bt = order.to(torch.int32).view(B, pages)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return k, v, bt, lens


def sdpa_contiguous(q, B, L, gen):
    """Random contiguous K/V [B, Hkv, L, D] for the decode queries q [B, Hq, D]; returns
    run(backend=CUDNN), one SDPA call (GQA) over them with that backend."""
    qt = q.view(B, Hq, 1, D)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)

    def run(backend=SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(qt, k, v, enable_gqa=True)
    return run


def sdpa_contiguous_call(q, B, L, gen):
    """(name, fn): one SDPA call with GQA on contiguous KV, CUDNN first, the best other backend
    if it refuses; (None, None) if none runs."""
    run = sdpa_contiguous(q, B, L, gen)
    for name, be in (("SDPA CUDNN", SDPBackend.CUDNN_ATTENTION),
                     ("SDPA FLASH", SDPBackend.FLASH_ATTENTION),
                     ("SDPA EFFICIENT", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            run(be)
        except RuntimeError as exc:
            print(f"  {name} refused B={B} L={L}: {str(exc).splitlines()[0][:100]}")
            continue
        return name, lambda be=be: run(be)
    return None, None


def kernel_bench(rec, quick):
    copy = copy_bandwidth_gbs()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, 131072), (16, 16384), (64, 4096), (8, 1024)]
    if quick:
        shapes = [(1, 32768), (8, 1024)]
    for B, L in shapes:
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv_bytes = 2 * B * L * Hkv * D * 2
        aname, sdpa = sdpa_contiguous_call(q, B, L, gen)
        # Pages in random order (a fragmented pool; costs 3-9% of DRAM locality, bench/NOTES.md)
        # and in pool order (a fresh allocator), each with the default balanced schedule and
        # the bitwise-reproducible one.
        o = torch.empty(B, Hq, D, device="cuda")
        lse = torch.empty(B, Hq, device="cuda")
        for ps, shuffled, schedules in ((16, True, (False, True)), (16, False, (False,)),
                                        (16, "2MiB", (False,)), (1, True, (False, True)),
                                        (1, False, (False,)), (1, "2MiB", (False,))):
            k, v, bt, lens = paged(B, L, ps, gen, shuffled=shuffled)
            order = {True: "", False: ", pages in order", "2MiB": ", shuffled within 2 MiB"}[
                shuffled]
            case = f"B{B} L{L} page {ps}{order}"
            contenders = {}  # both schedules read the same pages
            for det in schedules:
                contenders[case + (", deterministic" if det else "")] = \
                    lambda det=det: decode_partial(q, k, v, bt, lens, max_len=L, o=o, lse=lse,
                                                   deterministic=det)
            if sdpa is not None:
                contenders[f"{aname} (contiguous KV)"] = sdpa
            # The same pages through FlashInfer's paged decode, tensor-core and CUDA-core
            # kernels (each is the faster one somewhere: B1 L128k TC, B8 L1k CUDA cores).
            for tc in ((True, False) if shuffled is True else ()):
                fi = flashinfer_decode(q, k, v, bt, L, tensor_cores=tc)
                if fi is not None:
                    contenders[f"FlashInfer decode (paged, {'TC' if tc else 'CUDA cores'})"] = fi
            # Round-robin, as the step benchmarks: each row pairs runs of the same rounds. Each
            # timed call follows an untimed one of itself (prime): at B8 L1k ours took 31.0-31.5
            # us when SDPA's cuDNN kernel and FlashInfer's tensor-core decode had both run within
            # the three calls before it, 28.4-28.9 after itself or other sequences, 29.4 after a
            # projection GEMM; the anchors' times did not move (diag_decode.py --order).
            t = time_cuda_interleaved(contenders, prime=True)
            for det in schedules:
                name = case + (", deterministic" if det else "")
                ours = t[name]
                rec.add(name, "decode_partial", kv_bytes / (ours["ms"] * 1e-3) / 1e9,
                        "device copy", copy, "GB/s", ms=ours["ms"], p10=ours["p10"],
                        p90=ours["p90"])
                for anchor in contenders:
                    if anchor.startswith("SDPA") or (anchor.startswith("FlashInfer") and
                                                     not det):
                        rec.add(name, "decode_partial", ours["ms"], anchor, t[anchor]["ms"],
                                "ms", higher_is_better=False,
                                ratio=paired_speedup(ours, t[anchor]))
            del k, v


def split_sweep(rec, gen):
    """Split counts around the cost model's choice: if 1.5-2 waves beat one wave, stragglers of
    a single wave limit the long shapes (bench/NOTES.md)."""
    from esp_kernels.decode.partial import num_splits_for

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B, L, splits in ((1, 131072, (64, 128, 192, 256)), (16, 16384, (8, 16, 24))):
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v, bt, lens = paged(B, L, 16, gen)
        o = torch.empty(B, Hq, D, device="cuda")
        lse = torch.empty(B, Hq, device="cuda")
        chosen = num_splits_for(B, Hkv, L, sms, D)
        base = time_cuda(lambda: decode_partial(q, k, v, bt, lens, num_splits=chosen, o=o,
                                                lse=lse), reps=30)
        for s in splits:
            if s == chosen:
                continue
            t = time_cuda(lambda: decode_partial(q, k, v, bt, lens, num_splits=s, o=o, lse=lse),
                          reps=30)
            rec.add(f"B{B} L{L} page 16, {s} splits", "decode_partial", t["ms"],
                    f"cost model's {chosen} splits", base["ms"], "ms", higher_is_better=False)


def build_sharded(groups, B, L, N, gen):
    """B requests of L tokens, each split into N contiguous ranges, one per instance."""
    caches = []
    for inst in range(N):
        c = esp.PagedKVCache(1, B * (L // N + 16) // 16 + 8, 16, Hkv, D, torch.bfloat16, "cuda")
        c.kv.normal_(generator=gen)
        for b in range(B):
            c.allocate(b, range(inst * L // N, (inst + 1) * L // N))
        caches.append(c)
    masters = [b % N for b in range(B)]
    plans = run_local(groups, lambda g, c: esp.DecodePlan.build(g, c, list(range(B)), masters),
                      caches)
    return caches, plans


def decode_layers(groups, caches, plans, qs, layers=1, deterministic=False, outs=None):
    """`layers` decode layers on every virtual rank, all ranks from this thread (run_steps);
    outs: per-rank output buffers reused by every layer (default: a new tensor per layer)."""
    def rank(r):
        for _ in range(layers):
            yield from esp.distributed_decode_steps(qs[r], caches[r], plans[r], groups[r],
                                                    deterministic=deterministic,
                                                    out=None if outs is None else outs[r])
    return run_steps(groups, [rank(r) for r in range(len(groups))])


def multi_master_bench(rec, quick):
    gen = torch.Generator(device="cuda").manual_seed(2)
    B, L = (4, 4096) if quick else (16, 16384)
    q_all = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    one = local_group(1, "cuda")
    caches1, plans1 = build_sharded(one, B, L, 1, gen)
    t1 = time_wall(lambda: decode_layers(one, caches1, plans1, [q_all]), warmup=2, reps=10)
    for N in (2, 4):
        groups = local_group(N, "cuda")
        caches, plans = build_sharded(groups, B, L, N, gen)
        qs = [q_all[[b for b in range(B) if b % N == r]] for r in range(N)]
        tN = time_wall(lambda: decode_layers(groups, caches, plans, qs), warmup=2, reps=10)
        rec.add(f"B{B} L{L} one layer, {N} virtual ranks", "distributed_decode", tN["ms"],
                "one instance, same KV", t1["ms"], "ms", higher_is_better=False)


def host_case(N, gen):
    """The host rows' decode layer: 8 requests of 256 tokens split over N virtual ranks (KV tiny,
    so the GPU never limits the loop); returns groups, caches, plans and each rank's q."""
    groups = local_group(N, "cuda")
    caches, plans = build_sharded(groups, 8, 256, N, gen)
    qs = [torch.randn(len(plans[0].mastered_by(r)), Hq, D, device="cuda", dtype=torch.bfloat16,
                      generator=gen) for r in range(N)]
    return groups, caches, plans, qs


def host_overhead_bench(rec):
    """Per-layer host time (host_case)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    layers = 200
    for N in (1, 2, 4):
        groups, caches, plans, qs = host_case(N, gen)
        # All ranks from one thread (run_steps): CPU time of the thread / N = host cost per rank.
        # deterministic=True: the fixed-range schedule (no tile counters).
        # The machine's host speed drifts between and within calls (one instance: 22-54 us
        # across H100 sessions, 22-37 us within one call): the best of 15 rounds.
        outs = [torch.empty_like(q) for q in qs]
        for det, out in (((False, None), (True, None), (False, outs)) if N == 1
                         else ((False, None), (False, outs))):
            decode_layers(groups, caches, plans, qs, 10, det, out)
            best = None
            for _ in range(15):
                torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.thread_time()
                decode_layers(groups, caches, plans, qs, layers, det, out)
                wall = (time.perf_counter() - t0) / layers * 1e6
                cpu = (time.thread_time() - c0) / layers / N * 1e6
                best = min(best or (cpu, wall), (cpu, wall))
            torch.cuda.synchronize()
            rec.add(f"{N} virtual ranks, run_steps (one thread), 8 requests"
                    + (", deterministic" if det else "") + (", out= reused" if out else ""),
                    "host CPU us/layer/rank", best[0], "bar", 30.0, "us",
                    higher_is_better=False, wall_us_per_layer=best[1], rounds=15)

        # One thread per rank (run_local): the same driver with blocking waits.
        def loop(g, c, p, q):
            for _ in range(10):
                esp.distributed_decode(q, c, p, g)
            torch.cuda.current_stream().synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(layers):
                esp.distributed_decode(q, c, p, g)
            wall = (time.perf_counter() - t0) / layers * 1e6
            cpu = (time.thread_time() - c0) / layers * 1e6
            torch.cuda.current_stream().synchronize()
            return wall, cpu

        per_rank = run_local(groups, loop, caches, plans, qs)
        # CPU time of one rank's thread; wall time adds the waits for the GIL the threads share.
        rec.add(f"{N} virtual ranks, run_local (a thread each), 8 requests",
                "host CPU us/layer/rank", max(c for _, c in per_rank), "bar", 30.0, "us",
                higher_is_better=False, wall_us=max(w for w, _ in per_rank))
    # CUDA graph: one instance, fixed plan.
    g = local_group(1, "cuda")[0]
    caches, plans = build_sharded([g], 16, 4096, 1, gen)
    c, p = caches[0], plans[0]
    q = torch.randn(16, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            esp.distributed_decode(q, c, p, g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            esp.distributed_decode(q, c, p, g)
    torch.cuda.current_stream().wait_stream(s)
    te = time_cuda(lambda: esp.distributed_decode(q, c, p, g), flush=False)
    tg = time_cuda(graph.replay, flush=False)
    rec.add("B16 L4k one instance, one layer", "graph replay", tg["ms"] * 1e3, "eager",
            te["ms"] * 1e3, "us", higher_is_better=False)


def main():
    args = parse_out()
    parts = set(args.only.split(",")) if args.only else {"kernel", "splits", "multi", "host"}
    rec = Recorder("decode", args.out)
    print("esp_kernels from", esp.__file__)
    if "kernel" in parts:
        kernel_bench(rec, args.quick)
    if "splits" in parts and not args.quick:
        split_sweep(rec, torch.Generator(device="cuda").manual_seed(4))
    if "multi" in parts:
        multi_master_bench(rec, args.quick)
    if "host" in parts:
        host_overhead_bench(rec)


if __name__ == "__main__":
    main()
