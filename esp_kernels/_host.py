"""Host-side helpers of the per-step paths: Python ints to tensors, uploads that do not drain the
stream, and device properties read once per device."""

from __future__ import annotations

import array
import functools

import torch


def int_tensor(values: list, dtype=torch.int64) -> torch.Tensor:
    """A CPU tensor of a list of Python ints, through an array buffer: torch.tensor(list) takes
    ~50 ns an element, this ~5 (a decode step of 128 requests at 1k tokens uploads ~9k ints)."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64).to(dtype)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (CPU) on `device`, queued on the current stream. A copy from pageable memory waits for
    the stream to drain first (CUDA stages it synchronously), so a small upload per step would
    stall the host behind the GPU's queued work — on virtual instances, behind every other
    instance's layer; from pinned memory it is an ordinary stream-ordered copy (torch's pinned
    pool keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def cuda_properties(device):
    """torch.cuda.get_device_properties of `device` (a torch.device or an index; no index: the
    current device), queried once per device: the decode op reads the SM count and L2 size on
    every call that leaves its split count unset."""
    index = device if isinstance(device, int) else device.index
    return _properties(torch.cuda.current_device() if index is None else index)
