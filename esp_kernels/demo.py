"""`python -m esp_kernels demo`: the ESP lifecycle on virtual instances of one device.

1. reference attention and the state merge (timed);
2. striped ring prefill over P virtual instances, with proactive retention onto fewer decode
   instances (verified against the reference; the bytes a post-prefill migration would have
   moved are reported);
3. several multi-master decode steps with scale-up (new tokens on masters or wherever there is
   room), verified against the reference over the union of the shards;
and a timing table. On a CPU it runs small sizes through the torch paths.
"""

from __future__ import annotations

import math
import time

import torch

from . import comm
from ._checks import resolve_device
from .config import config
from .decode import DecodePlan, distributed_decode
from .kvcache import PagedKVCache, RetentionPlan
from .merge import merge_states
from .prefill import ring_prefill
from .reference import attention
from .testing import TOLERANCES, cu_seqlens, random_varlen_batch, rel_err, stripe, unstripe


def _timer(device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, (time.perf_counter() - t0) * 1e3
    return run


def run_demo(device=None, quick=False) -> int:
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    cfg = config()
    print(f"esp_kernels {cfg['version']} ({cfg['commit']}) on {device} "
          f"[{cfg['devices']}], compiled core: {cfg['compiled_module']}")
    dtype = torch.bfloat16 if gpu else torch.float32
    tol = TOLERANCES[dtype]
    small = quick or not gpu
    P, decode_instances = 4, [0, 2]
    Hq, Hkv, D = (32, 8, 128) if not small else (8, 2, 64)
    seqlens = [16384, 3000, 5] if not small else [300, 41, 5]
    layers, steps, page = 2, 3, 16
    timed = _timer(device)
    table = []
    gen = torch.Generator().manual_seed(0)
    ok = True

    # 1. reference and merge
    b = random_varlen_batch(seqlens, Hq, Hkv, D, dtype=dtype, device=device, generator=gen)
    (ref_o, ref_l), t = timed(lambda: attention(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens))
    table.append(("reference attention (torch, blocked)", t, "ground truth"))
    # A state merged with itself: same output, lse + log 2.
    (mo, ml), t = timed(lambda: merge_states(ref_o.float(), ref_l, ref_o.float(), ref_l))
    err = max(rel_err(ml - math.log(2), ref_l), rel_err(mo, ref_o.float()))
    ok &= err <= TOLERANCES[torch.float32]
    table.append(("merge_states (a state with itself)", t, f"rel err {err:.1e}"))

    # 2. ring prefill with retention onto the decode instances, every layer
    groups = comm.local_group(P, device)
    caches = [PagedKVCache(layers, sum(seqlens) // page + 64, page, Hkv, D, dtype, device)
              for _ in range(P)]
    free = {i: caches[i].free_pages for i in decode_instances}
    plan = RetentionPlan.fill_first(seqlens, free, page)
    batches = [random_varlen_batch(seqlens, Hq, Hkv, D, dtype=dtype, device=device,
                                   generator=gen) for _ in range(layers)]

    def prefill(g, cache):
        outs = []
        for layer in range(layers):
            bl = batches[layer]
            q, k, v = (stripe(x, seqlens, P)[g.rank] for x in (bl.q, bl.k, bl.v))
            outs.append(ring_prefill(q, k, v, seqlens, g, retain=(plan, cache, layer)))
        return outs

    comm.run_local(groups, prefill, caches)  # warm-up (kernels compile, plan reserves slots)
    res, t = timed(lambda: comm.run_local(groups, prefill, caches))
    errs = []
    for layer in range(layers):
        bl = batches[layer]
        out = unstripe([r[layer][0] for r in res], seqlens)
        ref, _ = attention(bl.q, bl.k, bl.v, bl.cu_seqlens, bl.cu_seqlens)
        errs.append(rel_err(out.float(), ref.float()))
    ok &= max(errs) <= tol
    tokens = sum(seqlens)
    table.append((f"ring prefill, {P} virtual instances, {layers} layers, {tokens} tokens", t,
                  f"max rel err {max(errs):.1e} (tol {tol:.0e})"))
    stored_ok = True
    for inst in decode_instances:
        for bi, L in enumerate(seqlens):
            rid = plan.request_ids[bi]
            pos = caches[inst].positions(rid)
            if pos.numel():
                k, _ = caches[inst].gather(rid, 1)
                start = int(batches[1].cu_seqlens[bi])
                stored_ok &= bool(torch.equal(k, batches[1].k[start + pos.to(device)]))
    ok &= stored_ok
    kv_bytes = tokens * layers * 2 * Hkv * D * torch.empty(0, dtype=dtype).element_size()
    moved = kv_bytes * (P - len(decode_instances)) / P
    table.append((f"retention onto instances {decode_instances} during the ring", 0.0,
                  f"K/V stored exactly: {stored_ok}; post-prefill migration avoided: "
                  f"{moved / 2**20:.1f} MiB"))

    # 3. multi-master decode with scale-up on the decode instances
    dgroups = [groups[i].subgroup(decode_instances) for i in decode_instances]
    dcaches = [caches[i] for i in decode_instances]
    requests = list(plan.request_ids)  # the ids the retention stored the requests under
    masters = [decode_instances[i % len(decode_instances)] for i in range(len(requests))]
    qs = torch.randn(steps, layers, len(requests), Hq, D, generator=gen).to(device, dtype)
    kn = torch.randn(steps, layers, len(requests), Hkv, D, generator=gen).to(device, dtype)
    vn = torch.randn(steps, layers, len(requests), Hkv, D, generator=gen).to(device, dtype)

    def decode(g, cache):
        me = g.world_ranks[g.rank]
        dplan = DecodePlan.build(g, cache, requests, masters)
        outs, t_steps = [], []
        for s in range(steps):
            dplan = dplan.scale_up(g, cache)
            mine = dplan.mastered_by(me)
            t0 = time.perf_counter()
            for layer in range(layers):
                outs.append((s, layer, mine, distributed_decode(
                    qs[s, layer, mine], cache, dplan, g, layer=layer,
                    k_new=kn[s, layer, mine], v_new=vn[s, layer, mine])))
            if gpu:
                torch.cuda.current_stream().synchronize()
            t_steps.append((time.perf_counter() - t0) * 1e3)
        return outs, t_steps

    res, t = timed(lambda: comm.run_local(dgroups, decode, dcaches))
    derrs = []
    for outs, _ in res:
        for s, layer, mine, out in outs:
            bl = batches[layer]
            for row, i in enumerate(mine):
                st = int(bl.cu_seqlens[i])
                k = torch.cat([bl.k[st:st + seqlens[i]], kn[:s + 1, layer, i]])
                v = torch.cat([bl.v[st:st + seqlens[i]], vn[:s + 1, layer, i]])
                ref, _ = attention(qs[s, layer, i:i + 1], k, v, cu_seqlens([1], device),
                                   cu_seqlens([k.shape[0]], device), causal=False)
                derrs.append(rel_err(out[row:row + 1].float(), ref.float()))
    ok &= max(derrs) <= tol
    step_ms = max(max(ts) for _, ts in res)
    table.append((f"{steps} decode steps x {layers} layers, masters {decode_instances}, "
                  "scale-up", t, f"max rel err {max(derrs):.1e}; slowest step {step_ms:.2f} ms"))

    width = max(len(r[0]) for r in table)
    print(f"\n{'stage':<{width}}  {'ms':>9}  result")
    for name, ms, note in table:
        print(f"{name:<{width}}  {ms:>9.2f}  {note}")
    print(f"\n{'PASS' if ok else 'FAIL'}: every output verified against esp.reference.attention")
    return 0 if ok else 1
