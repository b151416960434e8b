"""One ring step: partial attention of local query stripes against one KV block, merged into the
running fp32 state. Three implementations of one contract (below):

- "gluon":  the Hopper kernel in Gluon (esp_kernels/prefill/gluon_step.py: TMA, wgmma, a loader
            warp and two consumer warpgroups), the default on CUDA tensors; a call it cannot
            take (not sm_90, float32, head dim other than 64/128, a GQA group not a power of two
            or over 64, K/V heads not contiguous, no keys, a scale <= 0, a Triton that cannot
            compile it) runs on the Triton twin
- "triton": the Triton twin (esp_kernels/prefill/triton_step.py); on the CPU it runs under the
            Triton interpreter (tests)
- "torch":  reference attention with positions + exact merge; any device, the CPU path

The compiled CUDA step kernel (backend "cuda", csrc/prefill/) was deleted: it lost to the Gluon
and Triton kernels at every measured shape (bench/NOTES.md); asking for it raises ValueError.

Contract (every backend):
- q [Tq, Hq, D] holds this rank's queries packed by request: request b's are
  q[cu_q[b]:cu_q[b+1]]; k, v [Tk, Hkv, D] (q's dtype) the KV block packed likewise by cu_k.
  cu_q and cu_k are int32 [B+1] (the same B) on q's device; a request may have no queries or no
  keys. Hq % Hkv == 0: query head h reads KV head h // (Hq / Hkv), and the kernels serve a KV
  head's whole group from one load of each K/V tile (GQA packing).
- max_q_len is the longest request of q (a host int; it sizes the grid, so it must not be less).
- o_state float32 [Tq, Hq, D] is the normalized running output, lse_state float32 [Tq, Hq] its
  natural-log LSE; (0, -inf) is the empty state (float64 on the torch path, for references).
- Mask: indices are local to a request (query a is the a-th query of its request, key b the
  b-th key). causal: key b is visible to query a iff b <= a + mask_shift; not causal: every key
  of the request. Striping with P ranks, queries on rank i, keys from rank j: mask_shift 0 if
  j <= i else -1. Another request's keys never reach a request's rows (the persistent Gluon
  kernel loads whole blocks and zeroes the rows past the request's end before using them).
- accumulate=False: the state is overwritten (first step); rows that see no key get (0, -inf).
  accumulate=True: the block's state is merged exactly into it; rows that see no key keep
  their state untouched.
- NaN propagates as README.md states: a NaN in a query row or in a key row it sees makes that
  row's o and lse NaN, a NaN running state stays NaN, and a NaN value row may reach other rows
  of its request (p = 0 times NaN), never another request's.

`ring_step` is the op (checked arguments, DLPack / __cuda_array_interface__ arrays, the op
esp_kernels::ring_step under torch.compile); the ring driver calls `run_step`, unchecked, since
it validated the whole prefill once.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .. import _core
from .._checks import (FLOAT_DTYPES, as_cu_seqlens, as_int, check_cu_seqlens, check_gqa,
                       check_same_device, check_tensor)
from ..merge import merge_two_
from ..reference import attention

# Default kernel on CUDA tensors; ESP_PREFILL_BACKEND overrides. The benchmark decides
# (bench/NOTES.md): on an H100 the persistent Gluon kernel ran all steps of a 64k ring at 595
# TFLOP/s (P=4) and 528 (P=8) against Triton's 491 and 448 in the same call, and led at 1-2k
# tokens per rank from a CUDA graph (385 / 253 vs 310 / 209); launched one by one at 1k tokens
# per rank its heavier host path loses (131-170 vs Triton's 187-203). Off Hopper it hands the
# call to the Triton twin.
DEFAULT_CUDA_BACKEND = "gluon"
_STATE_DTYPES = (torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "gluon", "torch")
# Backends that existed once, with why they went: asking for one says so instead of only "must be
# one of" (the measurements are in bench/NOTES.md, "Prefill step kernel").
_REMOVED = {
    "cuda": "the compiled CUDA ring-step kernel was removed because it lost to the Gluon and "
            "Triton kernels at every measured shape (bench/NOTES.md)",
}


def _check_name(backend, what: str) -> None:
    if isinstance(backend, str) and backend in _REMOVED:
        raise ValueError(f"{what}={backend!r} is not available: {_REMOVED[backend]}; use "
                         "'auto', 'gluon' or 'triton' (or 'torch', the reference path)")
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The step kernel a call with `backend` runs on `device`: "auto" reads ESP_PREFILL_BACKEND,
    then picks DEFAULT_CUDA_BACKEND on CUDA tensors and "torch" elsewhere. Raises ValueError for
    an unknown or removed backend ("cuda") and for "gluon" off CUDA."""
    _check_name(backend, "backend")
    if backend == "auto":
        backend = os.environ.get("ESP_PREFILL_BACKEND", "auto")
        _check_name(backend, "ESP_PREFILL_BACKEND")
    if backend == "auto":
        return DEFAULT_CUDA_BACKEND if device.type == "cuda" else "torch"
    if backend == "gluon" and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors")
    return backend


def _step_torch(q, k, v, cu_q, cu_k, o_state, lse_state, causal, mask_shift, accumulate,
                softmax_scale):
    # Positions turn the shifted mask into the reference's causal rule: key b at position
    # b - shift is visible to query a at position a iff b <= a + shift.
    cq, ck = cu_q.tolist(), cu_k.tolist()
    if len(cq) == 1:  # no requests (and so no queries): nothing to attend or write
        return
    qpos = torch.cat([torch.arange(cq[i + 1] - cq[i]) for i in range(len(cq) - 1)]).to(q.device)
    kpos = torch.cat([torch.arange(ck[i + 1] - ck[i]) - mask_shift
                      for i in range(len(ck) - 1)]).to(q.device)
    # float32 math, float64 for float64 inputs (a reference's precision)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o_blk, lse_blk = attention(q.to(cdt), k.to(cdt), v.to(cdt), cu_q, cu_k, causal=causal,
                               softmax_scale=softmax_scale, q_positions=qpos, k_positions=kpos)
    if accumulate:
        merge_two_(o_state, lse_state, o_blk, lse_blk, o_state, lse_state, "torch")
    else:
        o_state.copy_(o_blk)
        lse_state.copy_(lse_blk)


@functools.lru_cache(maxsize=None)
def _gluon():
    """The Gluon step module, imported on first use (Triton's experimental dialect); None where
    this Triton has no Gluon for Hopper (the Triton twin runs instead)."""
    try:
        from . import gluon_step
    except (ImportError, AttributeError):  # no Gluon, or one without the names it uses
        return None
    return gluon_step


def step_tiles(q_lengths, num_q_heads: int, num_kv_heads: int, device, backend: str):
    """The tile table `run_step` takes for a batch whose requests hold q_lengths query tokens
    (host ints), or None where the backend has no use for one (only the Gluon kernel walks a
    table: without it, a batch of one long and many short requests pays for the long request's
    tile count in every short one). Built on the host and copied to `device`: once per batch,
    reused by every step and layer."""
    if not takes_tiles(backend):
        return None
    return _gluon().work_tiles(q_lengths, num_q_heads, num_kv_heads, device)


def takes_tiles(backend: str) -> bool:
    """Whether steps of this (resolved) backend take a `step_tiles` table."""
    return backend == "gluon" and _gluon() is not None


def run_step(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, *, causal=True, mask_shift=0,
             accumulate=True, softmax_scale, backend="auto", tiles=None, out=None):
    """Run one step with the chosen backend (arguments validated by the caller). tiles: None or
    `step_tiles` of the requests in cu_q (resolved backend "gluon"). out: None, or a tensor of
    q's shape and dtype that receives the merged o (a ring's last step): the Gluon kernel
    writes it in place of o_state, which is then stale (H100, 64k ring on 4 virtual ranks: the
    four casts after the ring took 0.54 ms of GPU time); other paths copy o_state into it."""
    backend = resolve_backend(backend, q.device)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be q's {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if backend == "torch":
        _step_torch(q, k, v, cu_q, cu_k, o_state, lse_state, causal, mask_shift, accumulate,
                    softmax_scale)
    elif (backend == "gluon" and softmax_scale > 0 and (gluon := _gluon()) is not None
          and gluon.supports(q, k, v, o_state, lse_state)):
        direct = out is not None and out.is_contiguous() and o_state.is_contiguous()
        gluon.ring_step_gluon(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal,
                              mask_shift, accumulate, softmax_scale, tiles=tiles,
                              out=out if direct else None)
        if direct:
            return
    else:  # "triton", or "gluon" on a call the Gluon kernel does not take
        from .triton_step import ring_step_triton

        ring_step_triton(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
                         accumulate, softmax_scale)
    if out is not None:
        out.copy_(o_state)


@_core.accepts_arrays
def ring_step(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, *, causal=True, mask_shift=0,
              accumulate=True, softmax_scale=None, backend="auto"):
    """One ring step: attention of packed queries against one packed KV block, merged into (or,
    with accumulate=False, written as) the running state (the contract: the module docstring).

    Args:
        q: [Tq, Hq, D]; k, v: [Tk, Hkv, D], one float dtype (Gluon kernel: float16/bfloat16,
            D 64 or 128, a power-of-two GQA group <= 64, other calls go to Triton; Triton: also
            float32, D a power of two >= 16; torch: also float64).
        cu_q, cu_k: int32 [B+1] offsets of each request in q and in k/v, on q's device (lists
            are converted); on the CPU their contents are checked (from 0, non-decreasing, ending
            at Tq / Tk), on a GPU not (that would wait on it).
        max_q_len: the longest request of q (tokens; on the CPU checked against cu_q).
        o_state: float32 [Tq, Hq, D], lse_state: float32 [Tq, Hq], written in place (float64
            on the torch path, for references).
        mask_shift: query a (local index in its request) sees key b iff b <= a + mask_shift.
        softmax_scale: defaults to 1/sqrt(D). backend: "auto" (CUDA: Gluon; CPU: torch),
            "gluon", "triton", "torch"; "cuda" (the compiled kernel, deleted) raises ValueError.
            The kernels read q, k, v and o_state with a unit stride along D (other strides are
            free); the torch path takes any strides.

    Takes torch tensors or DLPack / __cuda_array_interface__ arrays; under torch.compile it is
    the op esp_kernels::ring_step.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [Tk, Hkv, D] with "
                         f"q's head dim {q.shape[2]}")
    check_gqa(q.shape[1], k.shape[1])
    cu_q = as_cu_seqlens(cu_q, "cu_q", q.device)
    cu_k = as_cu_seqlens(cu_k, "cu_k", q.device)
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        check_tensor(cu, name, ndim=1, dtypes=(torch.int32,))
    if cu_q.shape != cu_k.shape or cu_q.shape[0] < 1:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must both be "
                         "[B+1]")
    check_tensor(o_state, "o_state", ndim=3, dtypes=_STATE_DTYPES)
    check_tensor(lse_state, "lse_state", ndim=2, dtypes=_STATE_DTYPES)
    if o_state.shape != q.shape or lse_state.shape != q.shape[:2]:
        raise ValueError(f"o_state {tuple(o_state.shape)} and lse_state "
                         f"{tuple(lse_state.shape)} must be q's [Tq, Hq, D] and [Tq, Hq]")
    check_same_device(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, o_state=o_state, lse_state=lse_state)
    max_q_len = as_int(max_q_len, "max_q_len", minimum=0)
    # Host tensors: checking their contents costs no GPU wait (not while torch.compile traces,
    # where the contents are data-dependent values)
    if cu_q.device.type == "cpu" and not torch.compiler.is_compiling():
        offsets = check_cu_seqlens(cu_q, "cu_q", q.shape[0])
        check_cu_seqlens(cu_k, "cu_k", k.shape[0])
        longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
        if max_q_len < longest:
            raise ValueError(f"max_q_len = {max_q_len} is less than the longest request of q "
                             f"({longest} tokens, from cu_q)")
    if resolve_backend(backend, q.device) != "torch":
        for name, t in (("q", q), ("k", k), ("v", v), ("o_state", o_state)):
            if t.shape[2] > 1 and t.stride(2) != 1:
                raise ValueError(f"{name} must have a unit stride along its last (head) "
                                 f"dimension for the step kernels, got strides {t.stride()}: "
                                 f"pass {name}.contiguous(), or backend='torch'")
    mask_shift = as_int(mask_shift, "mask_shift")
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling():
        torch.ops.esp_kernels.ring_step(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state,
                                        bool(causal), mask_shift, bool(accumulate), scale,
                                        backend)
    else:
        run_step(q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal=causal,
                 mask_shift=mask_shift, accumulate=accumulate, softmax_scale=scale,
                 backend=backend)
