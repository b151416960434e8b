"""Exact merge of partial attention states (o, lse).

Two states (o1, lse1), (o2, lse2) of disjoint key sets merge to
    lse = log(exp(lse1) + exp(lse2)),  o = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse).
The empty set is (0, -inf); it is skipped rather than multiplied by zero, so the result never
picks up NaN or garbage from an empty operand, and all-empty rows give (0, -inf). A NaN lse, or
NaN in a non-empty state's o, gives a NaN row (NaN is never taken for the empty state).

Shapes: o [T, H, D] (float32 running states, or float16/bfloat16), lse [T, H] float32.
CUDA tensors go to the compiled kernel; CPU tensors (or ``backend="torch"``) take the torch path.
"""

from __future__ import annotations

import math

import torch

from . import _core
from ._checks import FLOAT_DTYPES, check_op_backend, check_same_device, check_tensor


# float64 states are for references on the torch path; the CUDA kernel takes the other three.
_STATE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_state(o, lse, o_name, lse_name, ndim=3):
    check_tensor(o, o_name, ndim=ndim, dtypes=_STATE_DTYPES)
    check_tensor(lse, lse_name, ndim=ndim - 1, dtypes=(torch.float32, torch.float64))
    if tuple(lse.shape) != tuple(o.shape[:-1]):
        raise ValueError(f"{lse_name} {tuple(lse.shape)} must be {o_name}'s shape without its "
                         f"last dim {tuple(o.shape[:-1])}")
    if o.stride(-1) != 1:
        raise ValueError(f"{o_name} must be contiguous in its last (head) dim")


def _merge_torch(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, lse_out):
    """o [S, T, H, D], lse [S, T, H] -> writes out [T, H, D] and lse_out [T, H].

    Same rules as the CUDA kernel: empty states (lse -inf) are selected away, never multiplied;
    a NaN lse (amax propagates it) or NaN in a non-empty state's o makes the row NaN."""
    m = lse.amax(dim=0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe)                        # exp(-inf) = 0 for empty states
    total = w.sum(dim=0)
    empty = total == 0                                 # False for NaN: such rows stay NaN
    total_safe = torch.where(empty, 1, total)
    merged_lse = torch.where(empty, torch.full_like(m, -math.inf), m_safe + torch.log(total_safe))
    weights = w / total_safe
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    terms = torch.where((lse != -math.inf)[..., None], o.to(acc) * weights[..., None].to(acc),
                        torch.zeros((), dtype=acc, device=o.device))
    out.copy_(terms.sum(dim=0))
    if lse_out is not None:
        lse_out.copy_(merged_lse)


# The kernel keeps per-state weights in registers; more states are merged in rounds.
MAX_KERNEL_STATES = 64


def _run(o, lse, out, lse_out, backend: str):
    """Merge states o [S, T, H, D], lse [S, T, H] into out / lse_out. o and lse may also be
    _Pair values: two states the kernel reads at base + s * stride_s (see _pair_view)."""
    check_op_backend(backend, out.device)
    if out.device.type == "cuda" and backend != "torch":
        C = _core.require_compiled("merge_states")
        if not isinstance(o, _Pair) and o.shape[0] > MAX_KERNEL_STATES:
            n = MAX_KERNEL_STATES
            head_o = torch.empty(o.shape[1:], dtype=torch.float32, device=o.device)
            head_lse = torch.empty(lse.shape[1:], dtype=torch.float32, device=o.device)
            _run(o[:n], lse[:n], head_o, head_lse, backend)
            rest_o = torch.empty_like(head_o)
            rest_lse = torch.empty_like(head_lse)
            _run(o[n:], lse[n:], rest_o, rest_lse, backend)
            o = torch.stack([head_o, rest_o])
            lse = torch.stack([head_lse, rest_lse])
        C.merge_states(_states_desc(o), _states_desc(lse), _core.desc(out),
                       None if lse_out is None else _core.desc(lse_out),
                       out.device.index, _core.stream_handle(out.device))
    else:
        if isinstance(o, _Pair):
            o, lse = torch.stack(o.tensors), torch.stack(lse.tensors)
        _merge_torch(o, lse, out, lse_out)


class _Pair:
    """Two same-layout tensors seen as one [2, ...] operand, `stride_s` elements apart."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, stride_s: int):
        self.tensors, self.stride_s = (a, b), stride_s


def _states_desc(x):
    if isinstance(x, _Pair):
        a = x.tensors[0]
        return _core.raw_desc(a.data_ptr(), a.dtype, [2, *a.shape], [x.stride_s, *a.stride()])
    return _core.desc(x)


def _pair_view(o_a, lse_a, o_b, lse_b):
    """Two states as one S=2 operand of the kernel without copying when their layouts match.

    The kernel reads state s at base + s * stride_s; for two separate tensors with identical
    layouts that stride is the distance between their data pointers, which torch cannot express
    as a view (storage bounds), so the pair goes to the core as a raw descriptor. Otherwise the
    states are stacked (one copy).
    """
    if (o_a.device.type == "cuda" and o_a.dtype == o_b.dtype and lse_a.dtype == lse_b.dtype
            and o_a.stride() == o_b.stride() and lse_a.stride() == lse_b.stride()):
        do, dl = o_b.data_ptr() - o_a.data_ptr(), lse_b.data_ptr() - lse_a.data_ptr()
        eo, el = o_a.element_size(), lse_a.element_size()
        if do % eo == 0 and dl % el == 0:
            return (_Pair(o_a, o_b, do // eo), _Pair(lse_a, lse_b, dl // el))
    return torch.stack([o_a, o_b.to(o_a.dtype)]), torch.stack([lse_a, lse_b])


def merge_two_(o_a, lse_a, o_b, lse_b, out, lse_out, backend):
    """The two-state merge into out / lse_out, unchecked: the implementation behind
    merge_states and the registered op esp_kernels::merge_states_out."""
    o, lse = _pair_view(o_a, lse_a, o_b, lse_b)
    _run(o, lse, out, lse_out, backend)


@_core.accepts_arrays
def merge_states(o_a, lse_a, o_b, lse_b, out=None, lse_out=None, backend="auto"):
    """Merge two states; returns (o, lse) with o in o_a's dtype (or into `out`/`lse_out`).

    Takes torch tensors or DLPack / __cuda_array_interface__ arrays (results come back as the
    caller's kind); under torch.compile it is the op esp_kernels::merge_states_out (or
    esp_kernels::merge_states_ when writing into state a)."""
    _check_state(o_a, lse_a, "o_a", "lse_a")
    _check_state(o_b, lse_b, "o_b", "lse_b")
    if o_a.shape != o_b.shape:
        raise ValueError(f"o_a {tuple(o_a.shape)} and o_b {tuple(o_b.shape)} differ in shape")
    check_same_device(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b, out=out, lse_out=lse_out)
    if out is None:
        out = torch.empty_like(o_a)
    else:
        check_tensor(out, "out", ndim=3, dtypes=_STATE_DTYPES)
        if out.shape != o_a.shape:
            raise ValueError(f"out {tuple(out.shape)} must have o_a's shape {tuple(o_a.shape)}")
    if lse_out is None:
        lse_out = torch.empty_like(lse_a)
    else:
        _check_state(out, lse_out, "out", "lse_out")
    if torch.compiler.is_compiling():
        if out is o_a and lse_out is lse_a:
            torch.ops.esp_kernels.merge_states_(o_a, lse_a, o_b, lse_b, backend)
        else:
            torch.ops.esp_kernels.merge_states_out(o_a, lse_a, o_b, lse_b, out, lse_out, backend)
    else:
        merge_two_(o_a, lse_a, o_b, lse_b, out, lse_out, backend)
    return out, lse_out


@_core.accepts_arrays
def merge_states_(o_a, lse_a, o_b, lse_b, backend="auto"):
    """In-place merge of state b into the running state a (o_a, lse_a); returns them."""
    return merge_states(o_a, lse_a, o_b, lse_b, out=o_a, lse_out=lse_a, backend=backend)


@_core.accepts_arrays
def merge_states_multi(o, lse, out=None, lse_out=None, out_dtype=None, backend="auto"):
    """Merge S states at once: o [S, T, H, D] (or a sequence of [T, H, D]), lse [S, T, H].

    Returns (o [T, H, D] in `out_dtype` (default o's dtype), lse [T, H] float32). Under
    torch.compile it is the op esp_kernels::merge_states_multi_out.
    """
    if isinstance(o, (list, tuple)):
        o = torch.stack(list(o))
    if isinstance(lse, (list, tuple)):
        lse = torch.stack(list(lse))
    _check_state(o, lse, "o", "lse", ndim=4)
    if o.shape[0] < 1:
        raise ValueError("merge_states_multi needs at least one state")
    if out is None:
        if out_dtype is not None and out_dtype not in _STATE_DTYPES:
            raise TypeError(f"out_dtype must be one of {_STATE_DTYPES}, got {out_dtype}")
        out = torch.empty(o.shape[1:], dtype=out_dtype or o.dtype, device=o.device)
    else:
        check_tensor(out, "out", ndim=3, dtypes=_STATE_DTYPES)
        if tuple(out.shape) != tuple(o.shape[1:]):
            raise ValueError(f"out {tuple(out.shape)} must be {tuple(o.shape[1:])}")
    if lse_out is None:
        lse_out = torch.empty(lse.shape[1:], dtype=torch.float32, device=o.device)
    else:
        _check_state(out, lse_out, "out", "lse_out")
    check_same_device(o=o, lse=lse, out=out, lse_out=lse_out)
    if torch.compiler.is_compiling():
        torch.ops.esp_kernels.merge_states_multi_out(o, lse, out, lse_out, backend)
    else:
        _run(o, lse, out, lse_out, backend)
    return out, lse_out
