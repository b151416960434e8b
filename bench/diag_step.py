"""Where a ring step's time goes, against FA3 on the same shape (one request, 8k queries, Hq 32 /
Hkv 8, D 128, bf16):

- "1 block": 128 keys, not causal: every tile runs one K/V block, so the time is the per-tile
  fixed cost (Q load, descriptors, barriers, epilogue); per-tile us = time x SMs / tiles;
- "full": 8k keys, not causal: the main loop's rate;
- "diagonal": 8k keys, causal (a ring's first step).

Each with the state written (accumulate off) and merged (on). FA3 has no state: its rows are
the floor of what a step without the merge costs.

"fixed": the per-tile fixed cost a and the per-block rate b of ours and FA3, fitted over tiles
of 1 to 64 blocks (not causal), and the share a takes at a ring's 8k / 16k tokens per rank.

Then two cases where the kernel's fixed costs, not its main loop, decide:
- "skewed": one 8k request packed with 63 requests of 64 tokens (a prefill batch ESP's scheduler
  forms) against the 8k request alone: without a tile table the persistent kernel enumerates
  tiles of the longest request x requests x KV heads, so the extra time is what its empty work
  items cost; with the table (`step_tiles`, what the ring driver passes) there are none;
- "host": host microseconds per launched step (1k queries), Gluon and Triton, and a cProfile of
  each path; the Gluon path's layers, and its CUDA API calls per step. At 1k tokens per rank the
  launched Gluon steps ran at 96.7 TFLOP/s against 278 from a CUDA graph (H100, 7a4385d; ~89 us
  a step for ~31 us of GPU work) while the Triton twin's launches kept up with its GPU time.

    python bench/diag_step.py [--only kernels,fixed,skewed,host]
"""

import inspect

import torch

from anchors import fa3_prefill
from harness import (cprofile_top, cuda_api_calls, host_us, parse_out, time_cuda,
                     time_cuda_interleaved)
from ring_cases import OneRequestStep, random_qkv

from esp_kernels.prefill import gluon_step
from esp_kernels.prefill.step import ring_step, run_step, step_tiles
from esp_kernels.testing import cu_seqlens


def main():
    args = parse_out()
    parts = (set(args.only.split(",")) if args.only
             else {"kernels", "fixed", "skewed", "host"})
    if "kernels" in parts:
        kernels()
    if "fixed" in parts:
        fixed_cost()
    if "skewed" in parts:
        n, Hq, Hkv, D = 8192, 32, 8, 128
        skewed(*random_qkv(n, Hq, Hkv, D))
    if "host" in parts:
        host()


def kernels():
    """The 1-block, full and diagonal steps of 8k queries against FA3 on the same shape."""
    case = OneRequestStep()
    n, Hq, D, q, k_all, v_all, o, lse = (case.n, case.Hq, case.D, case.q, case.k, case.v,
                                         case.o, case.lse)
    for name, keys, causal in (("1 block", 128, False), ("full", n, False),
                               ("diagonal", n, True)):
        k, v = k_all[:keys], v_all[:keys]
        pairs = n * keys - (n * (n - 1) // 2 if causal else 0)
        flops = 4 * D * Hq * pairs
        cu_q, cu_k = cu_seqlens([n], "cuda"), cu_seqlens([keys], "cuda")
        fa3 = fa3_prefill(q, k, v, causal=causal)
        rows = []
        if fa3 is not None:
            rows.append(("FA3", time_cuda(fa3)["ms"]))
        for backend in ("gluon", "gluon no-prefetch", "triton"):
            for acc in (False, True):
                def step(backend=backend, acc=acc):
                    if backend == "triton":
                        ring_step(q, k, v, cu_q, cu_k, n, o, lse, causal=causal,
                                  accumulate=acc, backend=backend)
                    else:
                        gluon_step.ring_step_gluon(q, k, v, cu_q, cu_k, n, o, lse, causal, 0,
                                                   acc, D ** -0.5,
                                                   prefetch_state=backend == "gluon")
                rows.append((f"{backend} acc={int(acc)}", time_cuda(step)["ms"]))
        for label, ms in rows:
            print(f"{name:<9} {label:<24} {ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s "
                  f"per tile {case.per_tile_us(ms):6.2f} us", flush=True)


def fixed_cost(rounds=5):
    """What a tile costs besides its K/V blocks inside a persistent launch: 8k queries against
    128 * n keys, not causal (every tile runs n blocks), n = 1 .. 64; per-tile time (time x SMs /
    tiles) fitted as a + b * n by least squares, for ours (state written / merged) and FA3. a is
    what every tile pays once (its first S product and softmax before the pipeline fills, its
    last PV product, the epilogue, the Q load when it is not hidden), b a block's rate. At 8k
    tokens per rank a ring's step averages ~32.5 blocks a tile and at 16k ~64.5, so a / (a +
    32.5 b) is the share of a P=8 ring's steps that per-tile costs take. Contenders of one n
    are timed round-robin (`time_cuda_interleaved`)."""
    case = OneRequestStep()
    n, D, q, k_all, v_all, o, lse = case.n, case.D, case.q, case.k, case.v, case.o, case.lse
    cu_q = cu_seqlens([n], "cuda")
    per_tile = {}
    for blocks in (1, 2, 4, 8, 16, 32, 64):
        keys = 128 * blocks
        k, v = k_all[:keys], v_all[:keys]
        cu_k = cu_seqlens([keys], "cuda")
        fns = {}
        fa3 = fa3_prefill(q, k, v, causal=False)
        if fa3 is not None:
            fns["FA3"] = fa3
        for acc in (False, True):
            fns[f"gluon acc={int(acc)}"] = (
                lambda acc=acc, k=k, v=v, cu_k=cu_k: gluon_step.ring_step_gluon(
                    q, k, v, cu_q, cu_k, n, o, lse, False, 0, acc, D ** -0.5))
        t = time_cuda_interleaved(fns, reps=rounds * 2)
        for name, r in t.items():
            us = case.per_tile_us(r["ms"])
            per_tile.setdefault(name, []).append((blocks, us))
            print(f"fixed    {blocks:3d} blocks a tile  {name:<12} {r['ms'] * 1e3:8.1f} us  "
                  f"per tile {us:7.2f} us", flush=True)
    for name, pts in per_tile.items():
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = (sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs))
        a = my - b * mx
        print(f"fixed    fit {name:<12} a = {a:5.2f} us a tile, b = {b:5.3f} us a block; "
              f"a share at 32.5 / 64.5 blocks: {a / (a + 32.5 * b):5.3f} / "
              f"{a / (a + 64.5 * b):5.3f}", flush=True)


def skewed(q, k_all, v_all):
    """One 8k request plus 63 of 64 tokens (causal, self-attention) against the 8k one alone."""
    D = q.shape[2]
    n_max = 8192 + 64 * 63
    o = torch.zeros(n_max, *q.shape[1:], device="cuda")
    lse = torch.zeros(n_max, q.shape[1], device="cuda")
    for lengths in ([8192], [8192] + [64] * 63):
        n = sum(lengths)
        qs, k, v = _grow(q, n), _grow(k_all, n), _grow(v_all, n)
        cu = cu_seqlens(lengths, "cuda")
        table = step_tiles(lengths, q.shape[1], k.shape[1], "cuda", "gluon")
        for label, backend, tiles in (("gluon", "gluon", None),
                                      ("gluon, tile table", "gluon", table),
                                      ("triton", "triton", None)):
            for acc in (False, True):
                def step(backend=backend, tiles=tiles, acc=acc):
                    run_step(qs, k, v, cu, cu, max(lengths), o[:n], lse[:n], causal=True,
                             accumulate=acc, softmax_scale=D ** -0.5, backend=backend,
                             tiles=tiles)
                ms = time_cuda(step)["ms"]
                print(f"skewed   {len(lengths):>3} requests ({n} tokens) {label:<17} "
                      f"acc={int(acc)} {ms * 1e3:9.1f} us", flush=True)


def _grow(t, n):
    """The first n rows of t, repeated past its end (as many rows as a batch needs)."""
    reps = -(-n // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()


def host():
    """Host time per step launched back to back (1k queries of one request, P=8 of 8k): the
    public ring_step of each backend, with its device time and a cProfile; then the Gluon path's
    layers (ring_step_gluon, its launch alone: direct, and through Triton's launcher), each also
    with the GPU drained (host-only time far under it: the GPU is the limit; equal: the host),
    and the CUDA API calls of one
    public Gluon step (a synchronizing call would serialize host and GPU)."""
    n, Hq, Hkv, D = 1024, 32, 8, 128
    q, k, v = random_qkv(n, Hq, Hkv, D, seed=1)
    o = torch.zeros(n, Hq, D, device="cuda")
    lse = torch.zeros(n, Hq, device="cuda")
    cu = cu_seqlens([n], "cuda")
    scale = D ** -0.5

    def public(backend):
        return lambda: ring_step(q, k, v, cu, cu, n, o, lse, causal=True, mask_shift=-1,
                                 accumulate=True, softmax_scale=scale, backend=backend)
    for backend in ("gluon", "triton"):
        step = public(backend)
        step_us, _ = host_us(step, calls=2000)
        dev_us = time_cuda(step, flush=False)["ms"] * 1e3
        print(f"host     {backend:<7} {step_us:6.1f} us per launched step (device {dev_us:.1f} "
              "us)", flush=True)
        print(cprofile_top(step, 500, 14))  # where each path's host time goes

    def gluon():
        gluon_step.ring_step_gluon(q, k, v, cu, cu, n, o, lse, True, -1, True, scale)
    launch_args = _launch_args(gluon)
    dynamic = list(inspect.signature(gluon_step._launch).parameters).index("dynamic")
    assert not launch_args[dynamic], "the launcher row would reuse one counter: snake only"
    def through_tritons_launcher():  # the direct launch off (as with a launch hook set)
        options = gluon_step._direct_launch_options
        gluon_step._direct_launch_options = lambda: None
        try:
            gluon_step._launch(*launch_args)
        finally:
            gluon_step._direct_launch_options = options
    layers = {"ring_step_gluon": gluon,
              "its launch alone (direct)": lambda: gluon_step._launch(*launch_args),
              "Triton's launcher alone": through_tritons_launcher}
    for name, fn in layers.items():
        # 500 calls: under the ~1024 launches CUDA queues, so a host faster than the GPU is
        # not held back to the GPU's pace before the drain
        layer_us, drained_us = host_us(fn, calls=500)
        print(f"host     gluon, {name:<26} {layer_us:6.1f} us per launch, {drained_us:6.1f} with "
              "the GPU drained", flush=True)

    step = public("gluon")

    def fifty_steps():
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print("host     CUDA API calls per public gluon step:", cuda_api_calls(fifty_steps, per=50))


def _launch_args(step):
    """The arguments ring_step_gluon passes to its launcher in one call of step (compiled
    first), so the launcher can be timed alone on exactly what the step launches."""
    step()
    seen = []
    launch = gluon_step._launch
    gluon_step._launch = lambda *args, **kw: seen.append(args) or launch(*args, **kw)
    try:
        step()
    finally:
        gluon_step._launch = launch
    return seen[-1]


if __name__ == "__main__":
    main()
