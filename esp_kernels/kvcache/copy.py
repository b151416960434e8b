"""copy_rows: dst[o, dst_idx[i]] = src[o, src_idx[i]] for every outer slice o.

The one data mover behind retention writes and migration pack/unpack (csrc/kvcache/copy_rows.cu);
torch indexing on the CPU (or with backend="torch"). src [n_outer, src_rows, row],
dst [n_outer, dst_rows, row], same dtype, rows contiguous; index tensors are int32 [n] on the
tensors' device, or None for the identity; a negative index skips its row.
"""

from __future__ import annotations

import torch

from .. import _core
from .._checks import check_tensor


@_core.accepts_arrays
def copy_rows(src: torch.Tensor, src_idx: torch.Tensor | None, dst: torch.Tensor,
              dst_idx: torch.Tensor | None, backend: str = "auto") -> None:
    """Takes torch tensors or DLPack / __cuda_array_interface__ arrays; under torch.compile it
    is the op esp_kernels::copy_rows."""
    check_tensor(src, "src", ndim=3)
    check_tensor(dst, "dst", ndim=3)
    for name, idx in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if idx is not None:
            check_tensor(idx, name)
            if idx.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {idx.dtype}")
            if idx.device != src.device:
                raise ValueError(f"{name} is on {idx.device} but src is on {src.device}")
    if torch.compiler.is_compiling():
        torch.ops.esp_kernels.copy_rows(src, src_idx, dst, dst_idx, backend)
    else:
        copy_rows_(src, src_idx, dst, dst_idx, backend)


def copy_rows_(src, src_idx, dst, dst_idx, backend="auto") -> None:
    """copy_rows, unchecked: the implementation behind it and the op esp_kernels::copy_rows."""
    if src.device.type == "cuda" and backend != "torch":
        C = _core.require_compiled("copy_rows")
        d = _core.desc
        C.copy_rows(d(src), None if src_idx is None else d(src_idx), d(dst),
                    None if dst_idx is None else d(dst_idx), src.device.index,
                    _core.stream_handle(src.device))
        return
    n = (src_idx.shape[0] if src_idx is not None else
         dst_idx.shape[0] if dst_idx is not None else src.shape[1])
    s = src_idx.long() if src_idx is not None else torch.arange(n, device=src.device)
    d = dst_idx.long() if dst_idx is not None else torch.arange(n, device=src.device)
    keep = (s >= 0) & (d >= 0)
    s, d = s[keep], d[keep]
    dst[:, d] = src[:, s]
