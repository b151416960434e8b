"""Test tiers: the CPU tier runs everywhere (CI); tests marked `gpu` skip, with a reason, unless a
CUDA device and the compiled extension are present (run them with `pytest -m gpu`)."""

import os

import pytest
import torch

from esp_kernels import _core


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (GPU tier: run `pytest -m gpu` on a GPU machine)"
    if not _core.has_compiled():
        return f"esp_kernels._C unavailable: {_core._C_ERROR}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """Fresh random inputs per test, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


# Triton kernels run under the interpreter on machines without a GPU (docs/DESIGN.md §8); the flag
# must be set before triton decorates our kernels, i.e. before esp_kernels.prefill.triton_step
# is first imported (it is imported lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
