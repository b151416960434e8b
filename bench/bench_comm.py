"""Latency and bandwidth of one ring step (send to next, receive from previous) per backend on
one GPU, 16 KB and 64 MB messages, with device copy bandwidth beside (issue 3).

- virtual ranks (2 on one GPU): the step is a device-to-device copy per rank plus event waits;
- native NCCL, world of 1: send-to-self inside one group call;
- torch.distributed NCCL cannot send to itself, so it needs two GPUs (not measured here).
Times are host wall time per step with the device synchronized at the end of 50 steps.
"""

import time

import torch
import torch.distributed as dist

from harness import Recorder, copy_bandwidth_gbs, parse_out

from esp_kernels.comm import init_nccl, local_group, run_local

STEPS = 50


def step_ms(group, peer, nbytes, sync):
    """Milliseconds per exchange of `nbytes` with `peer` (5 warm-up steps, then STEPS)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(5):
        group.exchange(sends=[(x, peer)], recvs=[(y, peer)]).wait()
    sync()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        group.exchange(sends=[(x, peer)], recvs=[(y, peer)]).wait()
    sync()
    return (time.perf_counter() - t0) / STEPS * 1e3


def local_step_ms(nbytes):
    # Each virtual rank synchronizes the stream it runs on (current in its thread).
    return max(run_local(local_group(2, "cuda"), lambda g: step_ms(
        g, 1 - g.rank, nbytes, lambda: torch.cuda.current_stream().synchronize())))


def nccl_step_ms(group, nbytes):
    return step_ms(group, 0, nbytes, torch.cuda.synchronize)


def main():
    args = parse_out()
    rec = Recorder("comm_ring_step", args.out)
    copy = copy_bandwidth_gbs()
    worlds = {}
    for blocking in (False, True):
        try:
            worlds[blocking] = init_nccl(0, 1, dist.HashStore(), device=torch.device("cuda", 0),
                                         prefix=f"bench{int(blocking)}", blocking=blocking)
        except Exception as exc:
            print(f"  native NCCL (blocking={blocking}) unavailable: {exc}")
    for nbytes, label in ((16 << 10, "16 KB"), (64 << 20, "64 MB")):
        backends = [("virtual ranks", local_step_ms)]
        for blocking, w in worlds.items():
            kind = "blocking" if blocking else "nonblocking"
            backends.append((f"native NCCL self, {kind} comm",
                             lambda b, w=w: nccl_step_ms(w, b)))
        for name, fn in backends:
            ms = fn(nbytes)
            # bytes read + written per rank and step, comparable with the copy ceiling
            gbs = 2 * nbytes / (ms * 1e-3) / 1e9
            rec.add(f"{label} ring step, {name}", "GB/s (read+write)", gbs, "device copy", copy,
                    "GB/s", latency_us=ms * 1e3)
    for w in worlds.values():
        w.close()


if __name__ == "__main__":
    main()
