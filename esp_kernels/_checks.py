"""Argument validation shared by the public ops: every error names the argument at fault."""

from __future__ import annotations

import operator
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def resolve_device(device) -> torch.device:
    """torch.device of `device`, with a bare "cuda" pinned to the current CUDA device, so that
    objects created from it compare equal to the tensors they make (cuda:N)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def as_int(value, name: str, minimum: int | None = None) -> int:
    """`value` as a Python int: a Python int, a numpy integer or a 0-d integer tensor. Floats
    (even 2.0), bools and anything else raise a TypeError naming `name`; values below `minimum`
    a ValueError."""
    if type(value) is int:  # the common case, first: 0.05 us instead of 0.3
        out = value
    elif isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not (value.dtype.is_floating_point or value.dtype.is_complex
                                       or value.dtype == torch.bool)
        if not ok:
            raise TypeError(f"{name} must be an integer, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        out = int(value.item())
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got the bool {value}")
    else:
        try:
            out = operator.index(value)  # int and numpy integers; not float, str, None
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} "
                            f"{value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def as_lengths(seqlens, name: str = "seqlens") -> list[int]:
    """Request lengths as Python ints >= 0, from a sequence of integer-likes or a 1-D integer
    tensor (floats, bools and negatives raise, naming the entry)."""
    if isinstance(seqlens, torch.Tensor):
        if seqlens.dim() != 1 or seqlens.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints")
        seqlens = seqlens.tolist()
    # Plain non-negative ints skip as_int (its name string alone costs ~0.3 us a request, per
    # layer through ring_prefill); anything else gets its check and error.
    return [L if type(L) is int and L >= 0 else as_int(L, f"{name}[{i}]", minimum=0)
            for i, L in enumerate(seqlens)]


def as_int_tensor(values, name: str, dtype: torch.dtype = torch.int64, device=None) -> torch.Tensor:
    """A 1-D integer tensor from a tensor, numpy array or sequence of integer-likes; float or
    bool entries raise a TypeError naming `name` (nothing is truncated). Tensors keep their
    device unless `device` is given."""
    seq = None
    if not isinstance(values, torch.Tensor):
        if not (hasattr(values, "__array__") or hasattr(values, "__iter__")):
            raise TypeError(f"{name} must be a sequence of integers, got "
                            f"{type(values).__name__} {values!r}")
        seq = values if hasattr(values, "__array__") else list(values)
        try:
            values = torch.as_tensor(seq) if len(seq) else torch.empty(0, dtype=dtype)
        except (TypeError, ValueError, RuntimeError):
            values = None
    bad = values is None or (values.dtype.is_floating_point or values.dtype.is_complex
                             or values.dtype == torch.bool)
    if bad and seq is not None and not hasattr(seq, "__array__"):
        for i, x in enumerate(seq):  # name the first entry at fault
            as_int(x, f"{name}[{i}]")
    if bad:
        raise TypeError(f"{name} must hold integers, got "
                        f"{'unconvertible values' if values is None else values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
    return values.to(device=device if device is not None else values.device, dtype=dtype)


def check_tensor(t, name: str, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_same_device(**tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return None
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}: "
                             "all tensors must be on one device")
    return first.device


def as_cu_seqlens(cu, name: str, device) -> torch.Tensor:
    """cu_seqlens as given (an int32 tensor), or converted from a list / tuple / numpy array of
    integers to an int32 tensor on `device`."""
    if isinstance(cu, torch.Tensor):
        return cu
    return as_int_tensor(cu, name, torch.int32, device)


def check_cu_seqlens(cu, name: str, total: int, device: torch.device | None = None):
    """cu_seqlens: int32 [B+1], starts at 0, non-decreasing, ends at the packed tensor's length."""
    check_tensor(cu, name, ndim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have B+1 >= 1 entries")
    host = cu.tolist()
    if host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {host}")
    if host[-1] != total:
        raise ValueError(f"{name}[-1] = {host[-1]} disagrees with the packed length {total}")
    return host


def check_op_backend(backend, device: torch.device) -> None:
    """A compiled op's backend: "auto" (the CUDA kernel for CUDA tensors, else torch), "cuda"
    (CUDA tensors only) or "torch"."""
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError("backend='cuda' needs CUDA tensors")


def check_gqa(hq: int, hkv: int, q_name: str = "q", k_name: str = "k"):
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"{q_name} has {hq} heads, which is not a multiple of the {hkv} heads "
                         f"of {k_name} (GQA needs Hq % Hkv == 0)")
