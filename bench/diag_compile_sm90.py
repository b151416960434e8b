"""Compile the Triton ring-step kernels for sm_90a without a GPU (issue 21): every variant of
esp_kernels/prefill/triton_step_tma.py (and the default kernel) at the bench shape (bf16, D128,
G=4) and a non-power-of-two group, through triton.compile with a GPUTarget. Prints, per kernel,
registers/spills/shared memory, whether wgmma, TMA and warp specialization were emitted, and the
wgmma waits of the off-band loop; --dump DIR writes the ttgir/ptx.

Run against the GPU machine's Triton (3.6): pip install --no-deps --target /tmp/t36 triton==3.6.0
then PYTHONPATH=.:/tmp/t36 python bench/diag_compile_sm90.py [--dump DIR]
"""

import argparse
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root
sys.path.insert(0, ROOT)

from esp_kernels.prefill import triton_step, triton_step_tma  # noqa: E402

_SIG = dict(Q="*bf16", K="*bf16", V="*bf16", O="*fp32", LSE="*fp32", CU_Q="*i32", CU_K="*i32",
            stride_qt="i32", stride_qh="i32", stride_kt="i32", stride_kh="i32", stride_vt="i32",
            stride_vh="i32", stride_ot="i32", stride_oh="i32", stride_lt="i32", stride_lh="i32",
            qk_scale="fp32", shift="i32", n_tiles="i32")
# What the launcher's specialization would mark 16-divisible at the bench shape (pointers,
# strides that are multiples of 16); stride_lh == 1 is specialized to a constant at runtime.
_DIV16 = ("Q", "K", "V", "O", "LSE", "CU_Q", "CU_K", "stride_qt", "stride_qh", "stride_kt",
          "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh", "stride_lt")


_SMEM_MAX = 232448  # H100: 227 KB of shared memory per block


def compile_one(fn, consts, num_warps, num_stages, dtype="bf16"):
    names = fn.arg_names
    sig = {n: (_SIG[n].replace("bf16", dtype) if n in _SIG else "constexpr") for n in names}
    sig["stride_lh"] = "constexpr"
    consts = dict(consts, stride_lh=1)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resource_usage(cubin):
    """(registers, spill stores) from cuobjdump --dump-resource-usage (no driver needed)."""
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, timeout=60).stdout
        except OSError:
            return None, None
    reg = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STORE:(\d+)", out)  # local stores (spills)
    return (int(reg.group(1)) if reg else None), (int(spill.group(1)) if spill else None)


def summarize(name, k, dump=None):
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    md = k.metadata
    regs, spills = resource_usage(k.asm["cubin"])
    info = dict(regs=regs, local_st=spills,
                smem=md.shared, warps=md.num_warps,
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                cp_async=len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
                ws="ttg.warp_specialize" in ttgir,
                waits=re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    print(f"  {name:<34} " + " ".join(f"{k_}={v}" for k_, v in info.items()), flush=True)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(k.asm[ext])
    return info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dump", default=None)
    p.add_argument("--only", default=None, help="comma-separated variants")
    args = p.parse_args()
    print("triton", triton.__version__)
    base = dict(HEAD_DIM=128, CAUSAL=True, ACCUMULATE=True)
    failures = []
    cases = []
    for group in (4, 3):
        gpad = 1 << (group - 1).bit_length()
        for bm, bn, w, s in ((128, 64, 8, 3), (128, 128, 8, 2)):
            cases.append((f"default G{group} M{bm}N{bn}w{w}s{s}", triton_step._ring_step_kernel,
                          dict(base, GROUP=group, GROUP_PAD=gpad, BLOCK_M=bm, BLOCK_N=bn), w, s))
        for var, flags in triton_step_tma.VARIANTS.items():
            if args.only and var not in args.only.split(","):
                continue
            if flags["WS"] and group != gpad:
                flags = dict(flags, WS=False)  # what the launcher runs for such a group
            for bm, bn, w, s in triton_step_tma.SWEEP_CONFIGS[var]:
                for acc in (True, False):
                    consts = dict(base, ACCUMULATE=acc, GROUP=group, GROUP_PAD=gpad,
                                  BLOCK_M=bm, BLOCK_N=bn,
                                  LAZY_TH=triton_step_tma._LAZY_THRESHOLD, **flags)
                    cases.append((f"{var} G{group} M{bm}N{bn}w{w}s{s} acc{int(acc)}",
                                  triton_step_tma._ring_step_kernel_v2, consts, w, s))
    for name, fn, consts, w, s in cases:
        try:
            k = compile_one(fn, consts, w, s)
            info = summarize(name.replace(" ", "_"), k, args.dump)
            if info["smem"] > _SMEM_MAX:
                failures.append(name)
                print(f"  {name}: shared memory {info['smem']} > {_SMEM_MAX}", flush=True)
            if "tma_ws" in name and "G4" in name and not info["ws"]:
                failures.append(name)
                print(f"  {name}: not warp-specialized", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failure, go on
            failures.append(name)
            print(f"  {name:<34} FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    print("failures:", failures or "none")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
