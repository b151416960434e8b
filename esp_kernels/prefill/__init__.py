"""Striped ring-attention prefill: the step kernels (CUDA / Triton / torch) and the ring driver."""

from .ring import ring_prefill
from .step import ring_step

__all__ = ["ring_prefill", "ring_step"]
