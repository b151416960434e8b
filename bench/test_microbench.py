"""Quick microbenchmarks with pytest-benchmark (`pytest bench/test_microbench.py`).

Small shapes, each timed with a device synchronize inside the measured call; the same-run anchor
is the plain device copy of the same bytes (or torch's own op), benchmarked beside it. The full
benchmarks with ratios and committed results are the bench_*.py scripts.
"""

import pytest
import torch

import esp_kernels as esp
from esp_kernels import _core
from esp_kernels.kvcache import copy_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not _core.has_compiled(),
                                reason="microbenchmarks need a GPU and the compiled core")


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module")
def states():
    o = torch.randn(2, 8192, 32, 128, device="cuda")
    lse = torch.randn(2, 8192, 32, device="cuda")
    return o, lse, torch.empty(8192, 32, 128, device="cuda", dtype=torch.bfloat16)


def test_merge_states(benchmark, states):
    o, lse, out = states
    benchmark(_sync(lambda: esp.merge_states(o[0], lse[0], o[1], lse[1], out=out)))


def test_merge_anchor_copy(benchmark, states):
    o, _, _ = states
    dst = torch.empty_like(o)
    benchmark(_sync(lambda: dst.copy_(o)))


def test_copy_rows_pack(benchmark):
    rows = torch.randn(32, 16384, 1024, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(16384, device="cuda")[:4096].to(torch.int32)
    out = torch.empty(32, 4096, 1024, device="cuda", dtype=torch.bfloat16)
    benchmark(_sync(lambda: copy_rows(rows, idx, out, None)))


def test_copy_rows_anchor_index_select(benchmark):
    rows = torch.randn(32, 16384, 1024, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(16384, device="cuda")[:4096]
    benchmark(_sync(lambda: rows.index_select(1, idx)))
