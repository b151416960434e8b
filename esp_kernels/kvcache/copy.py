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
    if src.dtype != dst.dtype:
        raise TypeError(f"src is {src.dtype} but dst is {dst.dtype}")
    if src.shape[0] != dst.shape[0] or src.shape[2] != dst.shape[2]:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must share their "
                         "outer slices and row length ([n_outer, rows, row_len])")
    for name, idx in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if idx is not None:
            check_tensor(idx, name, ndim=1)
            if idx.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {idx.dtype}")
            if idx.device != src.device:
                raise ValueError(f"{name} is on {idx.device} but src is on {src.device}")
    n = (src_idx.shape[0] if src_idx is not None else
         dst_idx.shape[0] if dst_idx is not None else src.shape[1])
    if src_idx is not None and dst_idx is not None and dst_idx.shape[0] != n:
        raise ValueError(f"src_idx has {n} entries but dst_idx {dst_idx.shape[0]}")
    for name, t, idx in (("src", src, src_idx), ("dst", dst, dst_idx)):
        if idx is None and n > t.shape[1]:
            raise ValueError(f"{n} rows requested but {name} has {t.shape[1]}")
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


class PreparedCopyRows:
    """copy_rows with fixed indices and destination; `__call__(src)` copies from a per-call
    source. The core's descriptors are built once (~2 us each per call otherwise: a decode
    layer's host budget is 30 us); a call swaps in src's pointer and launches.

    src: a contiguous tensor of `src_shape`'s element count and the destination's dtype, on its
    device, read as [n_outer, rows, row] = src_shape (element count and dtype checked per call,
    contiguity too; the caller checks the device once).
    """

    def __init__(self, src_shape, src_idx, dst, dst_idx):
        if len(src_shape) != 3 or dst.dim() != 3:
            raise ValueError(f"src {tuple(src_shape)} and dst {tuple(dst.shape)} must be "
                             "[n_outer, rows, row_len]")
        for name, idx in (("src_idx", src_idx), ("dst_idx", dst_idx)):
            if idx is not None and (idx.dtype != torch.int32 or idx.device != dst.device):
                raise ValueError(f"{name} must be int32 on {dst.device}, got {idx.dtype} on "
                                 f"{idx.device}")
        self.src_shape, self.src_idx, self.dst, self.dst_idx = tuple(src_shape), src_idx, dst, \
            dst_idx
        self._numel = 1
        for n in src_shape:
            self._numel *= n
        self._device, self._device_index = dst.device, dst.device.index
        self._descs = None
        if dst.device.type == "cuda" and _core.has_compiled():
            d = _core.desc
            n_outer, rows, row = src_shape
            self._d_src = _core.raw_desc(0, dst.dtype, src_shape, (rows * row, row, 1))
            self._descs = (None if src_idx is None else d(src_idx), d(dst),
                           None if dst_idx is None else d(dst_idx))

    def __call__(self, src: torch.Tensor, backend: str = "auto") -> None:
        if src.numel() != self._numel or src.dtype != self.dst.dtype or not src.is_contiguous():
            raise ValueError(f"src must be a contiguous tensor of {self._numel} {self.dst.dtype} "
                             f"elements, got {tuple(src.shape)} {src.dtype}")
        self.launch(src, backend)

    def launch(self, src: torch.Tensor, backend: str = "auto") -> None:
        """`__call__` without its check of src, for a caller that checked it already (a
        decode runner checks q once per layer)."""
        if self._descs is not None and backend != "torch":
            self._d_src.ptr = src.data_ptr()
            s_idx, d_dst, d_idx = self._descs
            _core._C.copy_rows(self._d_src, s_idx, d_dst, d_idx, self._device_index,
                               _core.stream_handle(self._device))
            return
        copy_rows(src.view(self.src_shape), self.src_idx, self.dst, self.dst_idx,
                  backend=backend)


def prepare_copy_rows(src_shape, src_idx: torch.Tensor | None, dst: torch.Tensor,
                      dst_idx: torch.Tensor | None) -> PreparedCopyRows:
    """Check once and prepare copy_rows(src, src_idx, dst, dst_idx) for sources of shape
    `src_shape` given per call (see PreparedCopyRows). dst's storage must stay where it is."""
    return PreparedCopyRows(src_shape, src_idx, dst, dst_idx)
