"""Where a merging ring step's extra cost goes, in one call: copies of the Gluon kernel's module,
each with one source line changed, timed side by side (two rounds) on causal steps of 8k queries
(the diagonal, 8k keys; and 1k keys all visible: 8 blocks per tile, where the per-tile epilogue
weighs most), Hq 32 / Hkv 8, D 128, bf16.

Variants:
- base: the kernel as shipped, the state written (acc=0) and merged (acc=1);
- candidates (none now): a variant listed in CORRECT has its merged state checked bit for bit
  against base's, and its 64k rings' steps (P=4 and 8, kernels back to back, as bench_ring's
  "steps alone") timed against base's, interleaved. The last one, late_prefetch (the state
  prefetch issued under the tile's first S product; git: 5639200), was rejected in
  bench/results/2026-12-07_h100_shipped: 8-block tiles 1.9 us a tile slower, the rings within
  noise;
- no_smem_load (wrong states, diagnostic only): the prefetched o is not read back from shared
  memory;
- no_merge_math (wrong states, diagnostic only): the block's state is stored without the merge.
(Dropping the o store is no measure: the PV products become dead code.)

The copies are written next to gluon_step.py as _variant_<name>.py and removed at exit.
"""

import atexit
import importlib
import os

import torch

from harness import parse_out, time_cuda
from ring_cases import StripedRing, random_qkv

from esp_kernels.prefill import triton_step
from esp_kernels.testing import cu_seqlens

HERE = os.path.dirname(os.path.abspath(triton_step.__file__))
VARIANTS = {
    "base": {},
    "no_smem_load": {"gluon_step": [("o_prev = o_stage.load(o_layout)",
                                     "o_prev = gl.zeros([M, D], gl.float32, layout=o_layout)")]},
    "no_merge_math": {"gluon_step": [(
        "o_new, lse_new = merge_state(o_prev, lse_prev, o_blk, lse_blk)",
        "o_new, lse_new = o_blk, lse_blk")]},
}

CORRECT = ("base",)  # base, then the candidates: their state must equal the shipped kernel's


def variant_module(name, edits):
    """The Gluon step module with `edits` ({module: [(old, new)]}) applied to copies of its
    source (and of triton_step's, whose helpers it calls)."""
    tag = f"_variant_{name}"
    sources = {}
    for mod in ("triton_step", "gluon_step"):
        src = open(os.path.join(HERE, f"{mod}.py")).read()
        for old, new in edits.get(mod, []):
            assert src.count(old) == 1, f"{name}: {old!r} not found once in {mod}.py"
            src = src.replace(old, new)
        sources[mod] = src
    sources["gluon_step"] = sources["gluon_step"].replace("from .triton_step import",
                                                          f"from .{tag}_triton_step import")
    for mod, src in sources.items():
        path = os.path.join(HERE, f"{tag}_{mod}.py" if mod == "triton_step" else f"{tag}.py")
        with open(path, "w") as f:
            f.write(src)
        atexit.register(os.remove, path)
    return importlib.import_module(f"esp_kernels.prefill.{tag}")


def main():
    parse_out()
    mods = {name: variant_module(name, edits) for name, edits in VARIANTS.items()}
    n, Hq, Hkv, D = 8192, 32, 8, 128
    q, k_all, v_all = random_qkv(n, Hq, Hkv, D)
    o = torch.zeros(n, Hq, D, device="cuda")
    lse = torch.zeros(n, Hq, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = n * Hq // 128
    g = torch.Generator(device="cuda").manual_seed(1)
    o0 = torch.randn(n, Hq, D, device="cuda", generator=g)
    lse0 = torch.randn(n, Hq, device="cuda", generator=g)
    for case, keys, shift in (("diagonal", n, 0), ("8 blocks", 1024, n)):
        k, v = k_all[:keys], v_all[:keys]
        cu_q, cu_k = cu_seqlens([n], "cuda"), cu_seqlens([keys], "cuda")
        ref = None
        for name in CORRECT:  # one merge from the same state, against the shipped kernel's
            o.copy_(o0)
            lse.copy_(lse0)
            mods[name].ring_step_gluon(q, k, v, cu_q, cu_k, n, o, lse, True, shift, True,
                                       D ** -0.5)
            if ref is None:
                ref = (o.clone(), lse.clone())
            else:
                err = max((o - ref[0]).abs().max().item(), (lse - ref[1]).abs().max().item())
                print(f"{case:<9} {name}: max |state - base| {err:.1e}")
                if err > 0:
                    raise RuntimeError(f"{name} merges a different state than the shipped kernel")
        for rnd in range(2):
            for name, m in mods.items():
                for acc in ((False, True) if name == "base" else (True,)):
                    def step(m=m, acc=acc):
                        m.ring_step_gluon(q, k, v, cu_q, cu_k, n, o, lse, True, shift, acc,
                                          D ** -0.5)
                    step()
                    torch.cuda.synchronize()
                    if m._compile_error:
                        raise RuntimeError(f"{name} did not compile: {m._compile_error[0]}")
                    ms = time_cuda(step)["ms"]
                    print(f"{case:<9} round {rnd} {name:<14} acc={int(acc)} {ms * 1e3:8.1f} us "
                          f"per tile {ms * 1e3 * sms / tiles:6.2f} us", flush=True)
    if len(CORRECT) > 1:
        ring_steps(mods)


def ring_steps(mods, L=65536, Hq=32, Hkv=8, D=128, rounds=2):
    """The correct variants' 64k rings, every rank's steps back to back, interleaved rounds."""
    q, k, v = random_qkv(L, Hq, Hkv, D, seed=1)
    for P in (4, 8):
        ring = StripedRing(q, k, v, P)
        times = {name: [] for name in CORRECT}
        for rnd in range(rounds):
            for name in CORRECT:
                def step(qi, kj, vj, cu, n, o, lse, shift, acc, m=mods[name]):
                    m.ring_step_gluon(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc,
                                      D ** -0.5)
                ms = time_cuda(lambda: ring.all_steps(step), warmup=1, reps=3)["ms"]
                times[name].append(ms)
                print(f"ring L={L} P={P} round {rnd} {name:<14} {ms:8.3f} ms", flush=True)
        base = min(times["base"])
        for name in CORRECT[1:]:
            print(f"ring L={L} P={P} {name}: best {min(times[name]):.3f} ms against base "
                  f"{base:.3f} ({base / min(times[name]):.3f}x)", flush=True)


if __name__ == "__main__":
    main()
