"""Striped ring-attention prefill: the step kernels (CUDA / Triton / torch) and the ring driver."""

from .ring import RingPrefillRunner, ring_prefill, ring_prefill_steps
from .step import ring_step

__all__ = ["RingPrefillRunner", "ring_prefill", "ring_prefill_steps", "ring_step"]
