"""Where a merging ring step's extra cost goes, in one call: copies of the Gluon kernel's module,
each with one source line changed, timed side by side (two rounds) on causal steps of 8k queries
(the diagonal, 8k keys; and 1k keys all visible: 8 blocks per tile, where the per-tile epilogue
weighs most), Hq 32 / Hkv 8, D 128, bf16.

Variants (diagnostic only: all but "base" compute wrong states):
- base: the kernel as shipped, the state written (acc=0) and merged (acc=1);
- no_smem_load: the prefetched o is not read back from shared memory;
- no_merge_math: the block's state is stored without the merge.
(Dropping the o store is no measure: the PV products become dead code.)
A candidate tried this way, late_prefetch (the state prefetch issued under the tile's first S
product), merged the same state bit for bit and was rejected: 8-block tiles 1.9 us a tile slower,
64k rings within noise (bench/results/2026-12-07_h100_shipped; its code, with a bit-for-bit check
and interleaved ring timing, is in git at 5639200).

The copies are written next to gluon_step.py as _variant_<name>.py and removed at exit.
"""

import atexit
import importlib
import os

import torch

from harness import parse_out, time_cuda
from ring_cases import OneRequestStep

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
    step_case = OneRequestStep()
    n, D, q, k_all, v_all, o, lse = (step_case.n, step_case.D, step_case.q, step_case.k,
                                     step_case.v, step_case.o, step_case.lse)
    for case, keys, shift in (("diagonal", n, 0), ("8 blocks", 1024, n)):
        k, v = k_all[:keys], v_all[:keys]
        cu_q, cu_k = cu_seqlens([n], "cuda"), cu_seqlens([keys], "cuda")
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
                          f"per tile {step_case.per_tile_us(ms):6.2f} us", flush=True)


if __name__ == "__main__":
    main()
