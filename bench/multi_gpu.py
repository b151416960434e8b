"""Real multi-process run of every mechanism: one process per GPU (or per CPU rank with gloo).

    bench/multi_gpu.sh 8                 # 8 GPUs, native NCCL (torchrun under the hood)
    bench/multi_gpu.sh 1                 # world of 1 on one GPU
    bench/multi_gpu.sh 3 --device cpu    # gloo processes on the CPU (small sizes)

Checks (every rank, against esp.reference.attention / the full K/V), then benchmarks:
1. ring prefill on ESP groups of P = 2, 4, 8 ranks (those that fit the world), ordered unlike the
   world, with proactive retention onto the first half of the group;
2. reactive migration of a request between ranks;
3. multi-master decode with scale-up across all ranks;
4. benchmark (GPU): ring-prefill efficiency = one-GPU time / (GPUs x ring time) for 8k tokens
   per GPU (bf16, D128, Hq32/Hkv8) and the communication hidden fraction, appended to --out as
   a JSON line (bench/harness.Recorder).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import esp_kernels as esp  # noqa: E402
from harness import Recorder  # noqa: E402
from esp_kernels.prefill.step import ring_step  # noqa: E402
from esp_kernels.testing import (TOLERANCES, cu_seqlens, random_varlen_batch, rel_err,  # noqa: E402
                                 stripe)


def log(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def world_group(args):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cpu":
        dist.init_process_group("gloo")
        return esp.comm.from_torch(), torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, world,
                          rank == 0)
    return esp.comm.init_nccl(rank, world, store, device=torch.device("cuda", local)), \
        torch.device("cuda", local)


def check_prefill(world, dev, dtype, quick):
    rank = world.rank
    seqlens = [1, 7, 300, 33] if quick else [1, 7, 3000, 517, 8192]
    results = []
    for P in (2, 4, 8):
        if P > world.size:
            continue
        order = [(3 * i + 1) % world.size for i in range(world.size)][:P]
        if len(set(order)) < P:
            order = list(range(world.size))[::-1][:P]
        layers = 2
        batches = [random_varlen_batch(seqlens, 32, 8, 128, dtype=dtype, device=dev,
                                       generator=torch.Generator().manual_seed(10 * P + l))
                   for l in range(layers)]
        cache = esp.PagedKVCache(layers, sum(seqlens) // 16 + 64, 16, 8, 128, dtype, dev)
        keepers = order[: max(1, P // 2)]
        plan = esp.RetentionPlan.fill_first(seqlens, {i: cache.free_pages for i in keepers}, 16)
        ok = True
        if rank in order:
            ring = world.subgroup(order)
            for layer, b in enumerate(batches):
                q, k, v = (stripe(t, seqlens, P)[ring.rank] for t in (b.q, b.k, b.v))
                out, _ = esp.ring_prefill(q, k, v, seqlens, ring, retain=(plan, cache, layer))
                ref, _ = esp.reference.attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens)
                err = rel_err(out.float(), stripe(ref, seqlens, P)[ring.rank].float())
                ok &= err <= TOLERANCES[dtype]
            for bi in range(len(seqlens)):
                pos = cache.positions(bi)
                if pos.numel():
                    kk, vv = cache.gather(bi, 1)
                    start = int(batches[1].cu_seqlens[bi])
                    ok &= bool(torch.equal(kk, batches[1].k[start + pos.to(dev)]))
        world.barrier()
        results.append((f"ring prefill P={P} + retention", ok))
    return results


def check_migration_and_decode(world, dev, dtype, quick):
    rank, n = world.rank, world.size
    L = 200 if quick else 4000
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 2, L, 8 * 128, generator=gen).to(dev, dtype)  # [layer, K/V, token, row]
    cache = esp.PagedKVCache(2, 2 * L // 16 + 64, 16, 8, 128, dtype, dev)
    mine = list(range(rank, L, n))
    slots = cache.allocate("r", mine).to(dev)
    for layer in range(2):
        cache.slot_rows(layer)[:, slots] = full[layer][:, mine]
    if n > 1:
        esp.migrate_kv(cache, esp.MigrationPlan([("r", 0, L // 2, 0, n - 1)]), world)
    pos = cache.positions("r")
    ok = bool(torch.equal(cache.gather("r", 1)[0].reshape(pos.numel(), -1), full[1, 0][pos]))
    plan = esp.DecodePlan.build(world, cache, ["r"], [n - 1])
    plan = plan.scale_up(world, cache)
    qg = torch.Generator().manual_seed(6)
    q = torch.randn(1, 32, 128, generator=qg).to(dev, dtype)
    kn = torch.randn(1, 8, 128, generator=qg).to(dev, dtype)
    vn = torch.randn(1, 8, 128, generator=qg).to(dev, dtype)
    mine_rows = plan.mastered_by(rank)
    out = esp.distributed_decode(q[:len(mine_rows)], cache, plan, world, layer=1,
                                 k_new=kn[:len(mine_rows)], v_new=vn[:len(mine_rows)])
    if mine_rows:
        k = torch.cat([full[1, 0].view(L, 8, 128), kn])
        v = torch.cat([full[1, 1].view(L, 8, 128), vn])
        ref, _ = esp.reference.attention(q, k, v, cu_seqlens([1], dev), cu_seqlens([L + 1], dev),
                                         causal=False)
        ok &= rel_err(out.float(), ref.float()) <= TOLERANCES[dtype]
    world.barrier()
    return [("migration + multi-master decode with scale-up", ok)]


def bench(world, dev, out_path):
    rank, n = world.rank, world.size
    Hq, Hkv, D, per_gpu = 32, 8, 128, 8192
    L = per_gpu * n
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(L, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(L, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    qs, ks, vs = (stripe(t, [L], n)[rank] for t in (q, k, v))

    def timed(fn, reps=3):
        fn()
        world.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        world.barrier()
        return (time.perf_counter() - t0) / reps * 1e3

    ring_ms = timed(lambda: esp.ring_prefill(qs, ks, vs, [L], world))
    cu = cu_seqlens([L], dev)
    o = torch.empty(L, Hq, D, device=dev)
    lse = torch.empty(L, Hq, device=dev)
    one_ms = timed(lambda: ring_step(q, k, v, cu, cu, L, o, lse, accumulate=False,
                                     softmax_scale=D ** -0.5))
    cun = cu_seqlens([per_gpu], dev)
    on = torch.empty(per_gpu, Hq, D, device=dev)
    ln = torch.empty(per_gpu, Hq, device=dev)

    def steps_only():
        for s in range(n):
            ring_step(qs, ks, vs, cun, cun, per_gpu, on, ln, mask_shift=0 if s == 0 else -1,
                      accumulate=s > 0, softmax_scale=D ** -0.5)
    comp_ms = timed(steps_only)
    if rank == 0:
        rec = Recorder("multi_gpu", out_path)
        rec.info["device"] = f"{n}x {torch.cuda.get_device_name()}"
        rec.add(f"ring prefill {n} GPUs x {per_gpu} tokens", "efficiency", one_ms / (n * ring_ms),
                "ring-flash-attention striped (8xH800)", 0.74, "fraction", ring_ms=ring_ms,
                one_gpu_ms=one_ms, compute_ms=comp_ms, comm_hidden=min(1.0, comp_ms / ring_ms))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--out", default="bench/results/multi_gpu.jsonl")
    args = p.parse_args()
    world, dev = world_group(args)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    quick = args.quick or dev.type == "cpu"
    results = check_prefill(world, dev, dtype, quick) + \
        check_migration_and_decode(world, dev, dtype, quick)
    flags = world.all_gather_ints([int(ok) for _, ok in results])
    for i, (name, _) in enumerate(results):
        log(world.rank, f"{'PASS' if all(f[i] for f in flags) else 'FAIL'}: {name} "
                        f"(world of {world.size}, {dev.type})")
    failed = any(not all(f[i] for f in flags) for i in range(len(results)))
    if dev.type == "cuda" and not args.no_bench:
        bench(world, dev, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
