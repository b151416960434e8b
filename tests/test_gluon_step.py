"""The Gluon ring step (esp_kernels/prefill/gluon_step.py) has no interpreter, and Gluon's API
moves between Triton releases: on the CPU its source is compiled for sm_90a with the installed
Triton (no GPU needed) and the schedule the kernel depends on is checked in the PTX. Its results
are tested on the GPU tier (tests/test_ring_prefill.py, tests/test_nan.py, backend "gluon").

The compile runs in a child process (this file as a script): the CPU tier imports Triton in
interpreter mode, which cannot compile."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper",
                    reason="this Triton has no Gluon for Hopper (the Triton twin runs instead)")


def compile_sm90a(causal, accumulate, has_tiles, dynamic, out="fp32", head_dim=128, group=4,
                  dtype="bf16"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from esp_kernels.prefill import gluon_step

    fn = gluon_step._ring_step_gluon_kernel
    prefetch = accumulate and gluon_step.PREFETCH_STATE
    sig = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", O="*fp32", OUT=f"*{out}", LSE="*fp32",
               CU_Q="*i32", CU_K="*i32", TILES="*i32", COUNTER="*i32", Tq="i32", Tk="i32",
               n_q_heads="i32", n_kv_heads="i32",
               stride_qt="i32", stride_qh="i32", stride_kt="i32", stride_vt="i32",
               stride_ot="i32", stride_oh="i32", stride_lt="i32", stride_lh="i32",
               qk_scale="fp32", shift="i32", n_tiles="i32", n_req="i32", n_items="i32")
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BN=gluon_step.BLOCK_N,
                  NUM_STAGES=gluon_step.STAGES, CAUSAL=causal, ACCUMULATE=accumulate,
                  PREFETCH=prefetch, Q_BUFS=1 if prefetch else 2, HAS_TILES=has_tiles,
                  DYNAMIC=dynamic)
    names = fn.arg_names
    assert set(names) == set(sig) | set(consts), "the kernel's arguments changed: update here"
    src = GluonASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                         constexprs=consts, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=168))


# (causal, accumulate, tile table, dynamic schedule, merged o written as): a ring's last step
# writes the output in q's dtype
CASES = [(True, True, True, True, "fp32"), (True, True, True, False, "fp32"),
         (False, False, False, True, "fp32"), (False, False, False, False, "fp32"),
         (True, True, True, True, "bf16"), (True, False, False, True, "bf16")]


def test_gluon_step_compiles_for_sm90a_with_its_schedule():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (causal, accumulate, tiles, dynamic, out), (ptx, shared) in zip(CASES,
                                                                        json.loads(done.stdout)):
        case = f"causal={causal} accumulate={accumulate} tiles={tiles} dynamic={dynamic} {out}"
        assert "wgmma.mma_async" in ptx, case                # tensor cores through wgmma
        assert "cp.async.bulk.tensor" in ptx, case           # K/V through TMA
        assert "setmaxnreg" in ptx, case                     # warp-specialized register split
        # The softmax of block j runs while PV of block j-1 is in flight: a wait that leaves
        # one wgmma group outstanding (Triton's own `tl` kernels only ever wait for 0).
        assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx), case
        assert shared <= 232448, case                        # H100: 227 KB per block
        # Q tiles through TMA too, as [tokens, group heads, D] boxes
        assert "cp.async.bulk.tensor.3d" in ptx, case
        if accumulate:  # the previous state copied in during the main loop
            assert "cp.async.commit_group" in ptx and "cp.async.wait_group" in ptx, case
        # the dynamic schedule's counter: one atomic add per item, the static one none
        assert ("atom.global" in ptx) == dynamic, case
        # the merged o stored as the fp32 state, or as the bf16 output (2-byte elements; the
        # compile here does not specialize strides on divisibility, so stores stay scalar)
        assert ("st.global.b16" in ptx) == (out == "bf16"), case


@pytest.mark.parametrize("tokens_per_rank,dynamic", [(1024, False), (2048, False), (4096, True),
                                                     (8192, True), (16384, True)])
def test_gluon_step_takes_items_dynamically_from_four_rounds(tokens_per_rank, dynamic):
    """The ring step of Hq 32 / Hkv 8 (32 tokens a tile, 8 items a tile) on a 132-SM GPU: the
    snake at 1k and 2k tokens per rank (1.9 and 3.9 items per CTA), the counter from 4k on; an
    explicit schedule overrides."""
    from esp_kernels.prefill.gluon_step import takes_items_dynamically

    n_items = tokens_per_rank // 32 * 8
    assert takes_items_dynamically(n_items, 132) == dynamic
    assert takes_items_dynamically(n_items, 132, "dynamic")
    assert not takes_items_dynamically(n_items, 132, "snake")


def test_gluon_step_refuses_an_unknown_schedule():
    from esp_kernels.prefill.gluon_step import ring_step_gluon

    q = torch.zeros(4, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="schedule must be"):
        ring_step_gluon(q, q[:, :1], q[:, :1], torch.tensor([0, 4]), torch.tensor([0, 4]), 4,
                        None, None, True, 0, False, 0.125, schedule="round robin")


@pytest.mark.parametrize("lengths,hq,hkv", [([5, 0, 37, 3, 700, 130], 32, 8),
                                            ([8192] + [64] * 63, 32, 8),
                                            ([1, 128, 129, 0, 0], 8, 8), ([0, 0], 4, 1),
                                            ([], 4, 1)])
def test_work_tiles_lists_every_tile_once_heavy_first(lengths, hq, hkv):
    from esp_kernels.prefill.gluon_step import BLOCK_M, work_tiles

    table = work_tiles(lengths, hq, hkv, "cpu")
    assert table.dtype == torch.int32 and table.shape == (table.shape[0], 2)
    tok_m = BLOCK_M // (hq // hkv)
    pairs = [tuple(p) for p in table.tolist()]
    want = {(t, b) for b, n in enumerate(lengths) for t in range(-(-n // tok_m))}
    assert len(pairs) == len(set(pairs)) and set(pairs) == want
    assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))  # heavy first, then by request


if __name__ == "__main__":
    kernels = [compile_sm90a(*case) for case in CASES]
    print(json.dumps([(k.asm["ptx"], k.metadata.shared) for k in kernels]))
