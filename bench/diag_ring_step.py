"""Diagnose the 64k ring-prefill failure of the CUDA step (GPU). Two parts:

1. The step kernel alone, backend "cuda" vs "torch" (the reference): one request of n tokens
   (n = 1k, 4k, 16k; 16k is the per-rank size of the failing 64k / P=4 test), Hq 32, Hkv 8,
   D 128, bf16, shift 0 / -1, accumulate off / on. Prints the relative error and the first bad
   query tile (128 packed rows = 32 tokens) and token.
2. The failing test's ring (64k tokens, 4 virtual ranks), its sampled rows checked twice: read
   right after run_local as the test does, and after torch.cuda.synchronize(). run_local returns
   with the ranks' work still queued on their own non-blocking streams; if only the first read
   fails, the kernel is fine and the test/harness lacks a stream join.

Usage: python bench/diag_ring_step.py [step] [ring] [triton]   (step + ring with cuda by default;
"triton" runs the ring part with the Triton step instead)
"""

import math
import sys

import torch

import esp_kernels as esp
from esp_kernels.comm import local_group, run_local
from esp_kernels.prefill.step import ring_step
from esp_kernels.testing import cu_seqlens, random_varlen_batch, rel_err, stripe, unstripe

HQ, HKV, D, DT, TOL = 32, 8, 128, torch.bfloat16, 2e-2


def step_part():
    g = torch.Generator().manual_seed(0)
    for n in (1024, 4096, 16384):
        q, k, v = (torch.randn(n, h, D, generator=g).to("cuda", DT) for h in (HQ, HKV, HKV))
        cu = cu_seqlens([n], "cuda")
        o0 = torch.randn(n, HQ, D, generator=g).to("cuda")
        l0 = (torch.randn(n, HQ, generator=g) * 2).to("cuda")
        for shift in (0, -1):
            for acc in (False, True):
                out = {}
                for be in ("cuda", "torch"):
                    o, l = o0.clone(), l0.clone()
                    ring_step(q, k, v, cu, cu, n, o, l, mask_shift=shift, accumulate=acc,
                              softmax_scale=1 / math.sqrt(D), backend=be)
                    torch.cuda.synchronize()
                    out[be] = (o, l)
                (oc, lc), (ot, lt) = out["cuda"], out["torch"]
                tok_err = ((oc - ot).norm(dim=(1, 2)) / ot.norm(dim=(1, 2)).clamp_min(1e-30))
                bad = (~(tok_err <= TOL) | ~torch.isclose(lc, lt, atol=1e-3, rtol=1e-3).all(1))
                bad = bad.nonzero().flatten()
                first = (f"first bad token {bad[0].item()} (query tile {bad[0].item() * 4 // 128}"
                         f", err {tok_err[bad[0]].item():.3g}), {bad.numel()} bad tokens"
                         if bad.numel() else "no bad token")
                print(f"step n={n:6d} shift={shift:2d} acc={int(acc)}: rel err o "
                      f"{rel_err(oc, ot):.3e}, lse {rel_err(lc, lt):.3e}; {first}", flush=True)


def ring_part(backend="cuda"):
    P, L = 4, 65536
    g = torch.Generator().manual_seed(11)
    b = random_varlen_batch([L], HQ, HKV, D, dtype=DT, device="cuda", generator=g)
    rows = torch.tensor([0, 1, 5, 4097, 30000, 65534, 65535], device="cuda")
    ref, _ = esp.reference.attention(b.q[rows].float(), b.k.float(), b.v.float(),
                                     cu_seqlens([rows.numel()], "cuda"), cu_seqlens([L], "cuda"),
                                     q_positions=rows, k_positions=torch.arange(L, device="cuda"))

    def body(ring):
        q, k, v = (stripe(t, [L], P)[ring.rank] for t in (b.q, b.k, b.v))
        return esp.ring_prefill(q, k, v, [L], ring, backend=backend)

    for sync in (False, True):
        torch.cuda.synchronize()
        res = run_local(local_group(P, "cuda"), body)
        if sync:
            torch.cuda.synchronize()
        o = unstripe([r[0] for r in res], [L])[rows].float()  # as the test: no join unless sync
        per_row = [f"{rel_err(o[i], ref[i]):.2g}" for i in range(rows.numel())]
        print(f"ring 64k {backend} sync={int(sync)}: rel err {rel_err(o, ref):.3e}, per row "
              f"{dict(zip(rows.tolist(), per_row))}", flush=True)
        torch.cuda.synchronize()


if __name__ == "__main__":
    what = sys.argv[1:] or ["step", "ring"]
    if "step" in what:
        step_part()
    if "ring" in what or what == ["triton"]:
        ring_part("triton" if "triton" in what else "cuda")
