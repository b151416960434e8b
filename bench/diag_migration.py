"""Where reactive migration's time goes on two GPUs (run under torchrun, 2 processes).

    NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/diag_migration.py

Rows (rank 0 prints): migrate_kv of 1 GiB (8 layers x 32768 tokens, bf16, Hkv 8, D 128) per
chunk size; the fixed cost of a batch (one 16-token request, then 64 of them in one plan); on a
blocking and a nonblocking communicator, sequential plain sends of the same bytes in chunk-sized
messages (the link's per-message cost, no pack) and a 4-byte exchange's round trip; host time
of the cache's allocate / remove_tokens for 32768 tokens.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import esp_kernels as esp  # noqa: E402
from multi_gpu import timed_ms  # noqa: E402

LAYERS, TOKENS = 8, 32768


def main():
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, 2,
                          rank == 0)
    world = esp.comm.init_nccl(rank, 2, store, device=dev)

    def ms(fn, reps=3):
        return timed_ms(world, dev, fn, reps)

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    cache = esp.PagedKVCache(LAYERS, TOKENS // 16 + 128, 16, 8, 128, torch.bfloat16, dev)
    nbytes = LAYERS * 2 * TOKENS * cache.row_elems * 2
    if rank == 0:
        cache.allocate("m", torch.arange(TOKENS))
        cache.allocate("tiny", torch.arange(16))
        for r in range(64):
            cache.allocate(("small", r), torch.arange(16))
    there = esp.MigrationPlan([("m", 0, TOKENS, 0, 1)])
    back = esp.MigrationPlan([("m", 0, TOKENS, 1, 0)])
    for chunk_mib in (8, 32, 64, 128):
        cb = chunk_mib << 20
        t = ms(lambda: (esp.migrate_kv(cache, there, world, chunk_bytes=cb),
                        esp.migrate_kv(cache, back, world, chunk_bytes=cb)))
        say(f"migrate_kv 1 GiB, chunk {chunk_mib:4d} MiB: {t / 2:8.2f} ms per direction, "
            f"{nbytes / (t / 2 * 1e-3) / 1e9:7.1f} GB/s")
    tiny = (esp.MigrationPlan([("tiny", 0, 16, 0, 1)]), esp.MigrationPlan([("tiny", 0, 16, 1, 0)]))
    t = ms(lambda: [esp.migrate_kv(cache, p, world) for p in tiny], reps=10)
    say(f"migrate_kv 16 tokens (fixed per-entry cost): {t / 2:8.3f} ms per direction")
    many = [esp.MigrationPlan([(("small", r), 0, 16, a, b) for r in range(64)])
            for a, b in ((0, 1), (1, 0))]
    t = ms(lambda: [esp.migrate_kv(cache, p, world) for p in many], reps=5)
    say(f"migrate_kv 64 requests x 16 tokens in one plan: {t / 2:8.3f} ms per direction")
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    nonblocking_world = esp.comm.init_nccl(rank, 2, store, device=dev, prefix="nonblocking",
                                           blocking=False)
    for name, w in (("blocking", world), ("nonblocking", nonblocking_world)):
        for chunk_mib in (1, 8, 32, 128, 1024):
            cb = chunk_mib << 20

            def sends():
                works = []
                for off in range(0, nbytes, cb):
                    part = buf[off:off + cb]
                    works.append(w.send(part, 1) if rank == 0 else w.recv(part, 0))
                works[-1].synchronize()
            t = ms(sends)
            say(f"{name} comm, plain sends in {chunk_mib:4d} MiB messages: {t:8.2f} ms, "
                f"{nbytes / (t * 1e-3) / 1e9:7.1f} GB/s, {t / (nbytes // cb) * 1e3:7.1f} us each")
        tiny_out, tiny_in = torch.zeros(1, device=dev), torch.zeros(1, device=dev)
        t = ms(lambda: (w.exchange(sends=[(tiny_out, 1 - rank)], recvs=[(tiny_in, 1 - rank)])
                        .synchronize()), reps=200)
        say(f"{name} comm, 4-byte exchange + synchronize: {t * 1e3:7.1f} us")
    host = esp.PagedKVCache(LAYERS, TOKENS // 16 + 16, 16, 8, 128, torch.bfloat16, dev)
    pos = torch.arange(TOKENS)
    t0 = time.perf_counter()
    host.allocate("h", pos)
    t1 = time.perf_counter()
    host.remove_tokens("h", pos)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    say(f"host: allocate {TOKENS} tokens {(t1 - t0) * 1e3:.2f} ms, remove_tokens "
        f"{(t2 - t1) * 1e3:.2f} ms")
    world.barrier()


if __name__ == "__main__":
    main()
