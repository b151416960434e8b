"""Profile the samples that esp_kernels.scheduler.CostModel is fitted from (GPU machine).

    python3 bench/profile_cost_model.py --out $OUT/cost_samples.json [--quick]
    python -m esp_kernels.scheduler.fit cost_samples.json -o profile.json   # fit + held-out report

One GPU, bf16, a Llama-3-8B-shaped layer (hidden 4096, 32 q / 8 kv heads, head dim 128,
intermediate 14336, vocab 128256) with random weights. Every sample is one layer unless its kind
says otherwise (the format is in esp_kernels/scheduler's docs):
  dense, lm_head          the runtime's dense work of the layer (esp_kernels.runtime.LlamaAdapter:
                          norms, projections, RoPE, MLP) / its final norm and head, n tokens
  ring_attn               esp.ring_prefill over P virtual ranks of this GPU (wall time of all ranks:
                          they share the GPU, so one real instance of a P-GPU group takes ~time/P)
  decode_attn             esp.distributed_decode of a batch on one instance (paged, page 16)
  prefill_layer           a whole layer on P virtual ranks: every rank's dense work + the ring
  decode_layer            a whole decode layer on one instance: dense work + decode attention
  copy                    device-to-device copy of n bytes (migration pack/unpack)
  link                    NOT measured here: one GPU has no link. Taken from the 2xH200 results
                          (bench/results, 2026-11-24): one NCCL send of 1 GiB ran at 304-325 GB/s,
                          a small blocking exchange cost ~43 us. Marked "modelled".
The held-out kinds (prefill_layer, decode_layer) let the fit report its error on whole layers
that it was not fitted on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_info, time_cuda, time_wall  # noqa: E402

import esp_kernels as esp  # noqa: E402
from esp_kernels.comm import local_group, run_local  # noqa: E402

MODEL = {"num_layers": 32, "hidden": 4096, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128,
         "intermediate": 14336, "vocab": 128256, "dtype": "bfloat16"}
H, HQ, HKV, D, FF, V = (MODEL[k] for k in ("hidden", "num_q_heads", "num_kv_heads", "head_dim",
                                           "intermediate", "vocab"))
DT = torch.bfloat16
DEV = "cuda"


class Layer:
    """One decoder layer with random weights, run by the runtime's own code (a one-layer
    LlamaAdapter: HF-style norms, RoPE, fused residual GEMMs), so the model predicts what the
    runtime executes; an earlier plain-torch layer without RoPE and with bf16 norms was ~6% under
    the runtime's 32k-token prefill."""

    def __init__(self, gen):
        from esp_kernels.runtime import LlamaAdapter
        cfg = dict(model_type="llama", num_hidden_layers=1, hidden_size=H, num_attention_heads=HQ,
                   num_key_value_heads=HKV, head_dim=D, intermediate_size=FF, vocab_size=V,
                   max_position_embeddings=1 << 20, rms_norm_eps=1e-5, rope_theta=500000.0,
                   initializer_range=H ** -0.5, eos_token_id=None)
        self.adapter = LlamaAdapter.random(cfg, DT, DEV, seed=int(gen.initial_seed()))
        self._pos = {}

    def pos(self, n):
        """RoPE tables of n tokens (the runtime makes them once per batch, not per layer)."""
        if n not in self._pos:
            p = torch.arange(n, device=DEV)
            self._pos[n] = self.adapter.positions(p, torch.full_like(p, n))
        return self._pos[n]

    def head(self, x):
        return self.adapter.logits(x)

    def pre(self, x):
        return self.adapter.attention_in(0, x, self.pos(x.shape[0]))

    def post(self, x, attn):
        return self.adapter.attention_out(0, x, attn)

    def dense(self, x):
        q, k, v = self.pre(x)
        return self.post(x, q)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a few samples of each kind")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, fp32, a tiny model: checks the script itself, numbers meaningless")
    args = p.parse_args()
    global DEV, DT, H, HQ, HKV, D, FF, V
    if args.smoke:
        DEV, DT, args.quick = "cpu", torch.float32, True
        H, HQ, HKV, D, FF, V = 64, 4, 2, 16, 128, 256
    elif not torch.cuda.is_available():
        sys.exit("profile_cost_model.py needs a CUDA GPU (or --smoke)")
    timed = time_cuda if DEV == "cuda" else (lambda fn, reps: time_wall(fn, reps=reps))
    gen = torch.Generator(device=DEV).manual_seed(0)
    layer = Layer(gen)
    samples = []
    t_start = time.time()
    model = MODEL if not args.smoke else {**MODEL, "hidden": H, "num_q_heads": HQ,
                                          "num_kv_heads": HKV, "head_dim": D, "intermediate": FF,
                                          "vocab": V, "dtype": "float32"}
    info = run_info()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        # After every sample (a few ms): a run cut short keeps what it measured.
        with open(args.out + ".tmp", "w") as f:
            json.dump({**info, "model": model, "samples": samples}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    def add(kind, time_s, **fields):
        samples.append({"kind": kind, **fields, "time_s": time_s})
        save()
        desc = " ".join(f"{k}={v if not isinstance(v, list) or len(v) < 6 else f'{len(v)}x'}"
                        for k, v in fields.items())
        print(f"[{time.time() - t_start:6.1f}s] {kind:<14} {desc:<48} {time_s * 1e3:10.3f} ms",
              flush=True)

    def x_of(n):
        return torch.randn(n, H, device=DEV, generator=gen).to(DT)

    # Dense layer and head: the runtime's code for this model config.
    for n in ([1, 64, 1024, 8192] if args.quick else
              [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]):
        x = x_of(n)
        add("dense", timed(lambda: layer.dense(x), reps=7)["ms"] * 1e-3, tokens=n)
    for n in ([1, 256] if args.quick else [1, 8, 32, 128, 256, 512]):
        x = x_of(n)
        add("lm_head", timed(lambda: layer.head(x), reps=7)["ms"] * 1e-3, tokens=n)

    # Striped ring attention on P virtual ranks (its whole wall time, all ranks), several layers
    # per run_local call as the runtime runs a prefill: one call per layer charged each layer the
    # threads' start and the final synchronization (~0.6 ms: a 4k prefill layer sampled at 3.9 ms
    # where the runtime's 4k prefill took 3.2 ms a layer).
    LAYERS_PER_CALL = 4
    batches = ([[64], [256], [32] * 4] if args.smoke else [[4096], [16384], [2048] * 4] if args.quick else
               [[1024], [4096], [16384], [65536], [2048] * 8, [8192] * 4, [16384, 4096, 1024, 512],
                [32768, 32768], [512] * 16, [131072]])
    groups_by_p = {}
    for P in (1, 2, 4, 8):
        groups = groups_by_p[P] = local_group(P, DEV)
        for seqlens in batches:
            T = sum(seqlens)
            if T >= 131072 and P < 4:
                continue  # 4 samples of the longest shape are enough (0.3 s a call)
            q, k, v = (torch.randn(T, h, D, device=DEV, generator=gen).to(DT)
                       for h in (HQ, HKV, HKV))
            parts = [esp.striping.stripe(t, seqlens, P) for t in (q, k, v)]

            def ring():
                run_local(groups, lambda g: [esp.ring_prefill(
                    parts[0][g.rank], parts[1][g.rank], parts[2][g.rank], seqlens, g)
                    for _ in range(LAYERS_PER_CALL)])
            add("ring_attn", time_wall(ring, warmup=1, reps=3)["ms"] * 1e-3 / LAYERS_PER_CALL,
                group_size=P, seqlens=seqlens)
            if args.quick or seqlens in ([4096], [16384], [65536], [2048] * 8,
                                         [16384, 4096, 1024, 512]):
                xs = esp.striping.stripe(x_of(T), seqlens, P)

                def whole_layer():
                    def rank(g):
                        h = xs[g.rank]
                        for _ in range(LAYERS_PER_CALL):
                            qr, kr, vr = layer.pre(h)
                            o, _ = esp.ring_prefill(qr, kr, vr, seqlens, g)
                            h = layer.post(h, o)
                        return h
                    run_local(groups, rank)
                add("prefill_layer", time_wall(whole_layer, warmup=1, reps=3)["ms"] * 1e-3
                    / LAYERS_PER_CALL, group_size=P, seqlens=seqlens)
            del q, k, v, parts

    # Decode on one instance: paged KV (page 16), a batch of B requests of L tokens each.
    g1 = groups_by_p[1][0]
    shapes = ([(1, 64), (4, 32)] if args.smoke else [(1, 4096), (32, 4096)] if args.quick else
              [(1, 1024), (1, 16384), (1, 131072), (8, 1024), (8, 16384), (32, 4096),
               (32, 16384), (64, 4096), (128, 1024), (128, 4096), (256, 512), (256, 2048)])
    for B, L in shapes:
        pages = B * math.ceil(L / 16) + 8
        cache = esp.PagedKVCache(1, pages, 16, HKV, D, DT, DEV)
        for r in range(B):
            cache.allocate(r, range(L))
        kc, vc = cache.layer(0)
        kc.normal_(generator=gen)
        vc.normal_(generator=gen)
        plan = esp.DecodePlan.build(g1, cache, list(range(B)), [0] * B)
        q = torch.randn(B, HQ, D, device=DEV, generator=gen).to(DT)
        t = time_wall(lambda: esp.distributed_decode(q, cache, plan, g1, layer=0), reps=10)
        add("decode_attn", t["ms"] * 1e-3, kv_lens=[L] * B)
        x = x_of(B)

        def decode_layer():
            qd, _, _ = layer.pre(x)
            o = esp.distributed_decode(qd.contiguous(), cache, plan, g1, layer=0)
            return layer.post(x, o)
        add("decode_layer", time_wall(decode_layer, reps=10)["ms"] * 1e-3, kv_lens=[L] * B)
        del cache

    # Device copy (migration pack/unpack moves every byte twice: pack, then unpack).
    for nbytes in ([1 << 16, 1 << 20] if args.smoke else [1 << 20, 1 << 28] if args.quick else
                   [1 << 16, 1 << 20, 1 << 24, 1 << 28, 1 << 30]):
        a = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
        b = torch.empty_like(a)
        add("copy", timed(lambda: b.copy_(a), reps=7)["ms"] * 1e-3, bytes=nbytes)
        del a, b
    for nbytes, t in ((4, 43e-6), (1 << 30, (1 << 30) / 310e9)):
        add("link", t, bytes=nbytes, source="modelled: 2xH200 NCCL, bench/results 2026-11-24 "
            "(43 us per small blocking exchange, 304-325 GB/s for one 1 GiB send)")

    print(f"{len(samples)} samples -> {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    with torch.no_grad():
        main()
