"""One ring step: partial attention of local query stripes against one KV block, merged into the
running fp32 state. Three implementations of one contract (csrc/prefill/ring_step.h):

- "cuda":   the compiled kernel (esp_kernels._C.ring_step)
- "triton": the Triton twin (esp_kernels/prefill/triton_step.py)
- "torch":  reference attention with positions + exact merge; any device, the CPU path

Mask: query at local index a (in its request) sees key at local index b iff b <= a + mask_shift.
"""

from __future__ import annotations

import os

import torch

from .. import _core
from ..merge import merge_states_
from ..reference import attention

# Default kernel on CUDA tensors; ESP_PREFILL_BACKEND overrides. The benchmark decides:
# bench/results/ holds the step-kernel comparison the choice rests on (see bench/NOTES.md).
DEFAULT_CUDA_BACKEND = "triton"
BACKENDS = ("auto", "cuda", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("ESP_PREFILL_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"ESP_PREFILL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return DEFAULT_CUDA_BACKEND if device.type == "cuda" else "torch"
    if backend == "cuda" and device.type != "cuda":
        raise ValueError("backend='cuda' needs CUDA tensors")
    return backend


def _step_torch(q, k, v, cu_q, cu_k, o_state, lse_state, causal, mask_shift, accumulate,
                softmax_scale):
    # Positions turn the shifted mask into the reference's causal rule: key b at position
    # b - shift is visible to query a at position a iff b <= a + shift.
    cq, ck = cu_q.tolist(), cu_k.tolist()
    qpos = torch.cat([torch.arange(cq[i + 1] - cq[i]) for i in range(len(cq) - 1)]).to(q.device)
    kpos = torch.cat([torch.arange(ck[i + 1] - ck[i]) - mask_shift
                      for i in range(len(ck) - 1)]).to(q.device)
    o_blk, lse_blk = attention(q.float(), k.float(), v.float(), cu_q, cu_k, causal=causal,
                               softmax_scale=softmax_scale, q_positions=qpos, k_positions=kpos)
    if accumulate:
        merge_states_(o_state, lse_state, o_blk, lse_blk, backend="torch")
    else:
        o_state.copy_(o_blk)
        lse_state.copy_(lse_blk)


def ring_step(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, *, causal=True, mask_shift=0,
              accumulate=True, softmax_scale, backend="auto"):
    """Run one step with the chosen backend (arguments validated by the caller)."""
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        _step_torch(q, k, v, cu_q, cu_k, o_state, lse_state, causal, mask_shift, accumulate,
                    softmax_scale)
    elif backend == "triton":
        from .triton_step import ring_step_triton

        ring_step_triton(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
                         accumulate, softmax_scale)
    else:
        C = _core.require_compiled("ring_prefill")
        d = _core.desc
        C.ring_step(d(q), d(k), d(v), d(cu_q), d(cu_k), int(max_q_len), d(o_state),
                    d(lse_state), bool(causal), int(mask_shift), bool(accumulate),
                    float(softmax_scale), q.device.index, _core.stream_handle(q.device))
