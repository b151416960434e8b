"""One-off: the runtime test's ring step (q [2048,32,64] bf16, one request, causal, acc=False), with and without the tile table."""
import faulthandler, sys, time, torch
from esp_kernels.prefill import gluon_step
faulthandler.dump_traceback_later(60, exit=True)
dev = torch.device("cuda")
for T, hq, hkv, d in [(2048, 32, 8, 64), (2048, 32, 8, 128), (512, 32, 8, 64)]:
    q = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
    for tiles in (None, gluon_step.work_tiles([T], hq, hkv, dev)):
        o = torch.zeros(T, hq, d, device=dev); lse = torch.full((T, hq), -float("inf"), device=dev)
        t0 = time.perf_counter()
        gluon_step.ring_step_gluon(q, k, v, cu, cu, T, o, lse, True, 0, False, d ** -0.5, tiles=tiles)
        print(f"T{T} hq{hq} hkv{hkv} d{d} tiles={tiles is not None}: launched", flush=True)
        torch.cuda.synchronize()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.repeat_interleave(hq // hkv, 1).transpose(0, 1).float(),
            v.repeat_interleave(hq // hkv, 1).transpose(0, 1).float(), is_causal=True).transpose(0, 1)
        print(f"   done {time.perf_counter() - t0:.2f} s, max err {(o - ref).abs().max().item():.3e}", flush=True)
