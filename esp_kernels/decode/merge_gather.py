"""merge_states_gather: merge, for every output row t, the states at pool rows rows[:, t].

The decode master's merge: its own states and the ones its holders sent back lie in one pool of
state rows; `rows` [S, T] (int32) names the S states of each of its T requests (a request with
fewer holders points its spare entries at an empty state (0, -inf), which merges to nothing).
CUDA tensors go to the compiled kernel (csrc/merge/merge_states.cu), which gathers while it
merges, in one launch, up to `MAX_KERNEL_STATES` states per row; more states, CPU tensors or
backend="torch" gather the rows first and merge with `merge_states_multi`.

`prepare_merge_states_gather` fixes the pool, the row map and lse_out once (a decode runner's
buffers, the same for every layer) and builds the core's descriptors then: each call only swaps
in the output pointer and launches (descriptors cost ~2 us each to build; the per-layer host
budget of a decode layer is 30 us).
"""

from __future__ import annotations

import torch

from .. import _core
from .._checks import FLOAT_DTYPES, check_tensor
from ..merge import MAX_KERNEL_STATES, merge_states_multi


def _check(o_pool, lse_pool, rows, lse_out):
    check_tensor(o_pool, "o_pool", ndim=3, dtypes=(torch.float32,))
    check_tensor(lse_pool, "lse_pool", ndim=2, dtypes=(torch.float32,))
    check_tensor(rows, "rows", ndim=2, dtypes=(torch.int32,))
    R, H, D = o_pool.shape
    if tuple(lse_pool.shape) != (R, H):
        raise ValueError(f"lse_pool {tuple(lse_pool.shape)} must be [{R}, {H}] (o_pool's rows "
                         "and heads)")
    if o_pool.stride(-1) != 1:
        raise ValueError("o_pool must be contiguous in its last (head) dim")
    if not rows.is_contiguous() or rows.shape[0] < 1:
        raise ValueError(f"rows must be a contiguous [S >= 1, T] tensor, got "
                         f"{tuple(rows.shape)}")
    for name, t in (("lse_pool", lse_pool), ("rows", rows)):
        if t.device != o_pool.device:
            raise ValueError(f"{name} is on {t.device} but o_pool is on {o_pool.device}")
    T = rows.shape[1]
    if lse_out is not None:
        check_tensor(lse_out, "lse_out", ndim=2, dtypes=(torch.float32,))
        if tuple(lse_out.shape) != (T, H) or lse_out.device != o_pool.device:
            raise ValueError(f"lse_out must be [{T}, {H}] on {o_pool.device}, got "
                             f"{tuple(lse_out.shape)} on {lse_out.device}")
    return T, H, D


class PreparedMergeGather:
    """merge_states_gather over a fixed pool, row map and lse_out; `__call__(out)` merges into
    `out`, a contiguous [T, H, D] tensor of the prepared out_dtype on the pool's device (its
    layout is not checked per call: the caller checked it once)."""

    def __init__(self, o_pool, lse_pool, rows, lse_out, out_dtype: torch.dtype):
        T, H, D = _check(o_pool, lse_pool, rows, lse_out)
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        self.o_pool, self.lse_pool, self.rows = o_pool, lse_pool, rows
        self.lse_out = (lse_out if lse_out is not None else
                        torch.empty(T, H, dtype=torch.float32, device=o_pool.device))
        S = rows.shape[0]
        dev = o_pool.device
        self._device, self._device_index = dev, dev.index
        # Gather buffers of the torch path (and of the CUDA path past MAX_KERNEL_STATES).
        self._g_o = torch.empty(S, T, H, D, dtype=torch.float32, device=dev)
        self._g_lse = torch.empty(S, T, H, dtype=torch.float32, device=dev)
        self._flat_rows = rows.view(-1)
        self._descs = None
        if dev.type == "cuda" and _core.has_compiled() and S <= MAX_KERNEL_STATES:
            d = _core.desc
            self._descs = (d(o_pool), d(lse_pool), d(rows), d(self.lse_out))
            # Output of fixed shape: each call swaps in its pointer.
            self._d_out = _core.raw_desc(0, out_dtype, (T, H, D), (H * D, D, 1))

    def __call__(self, out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        if self._descs is not None and backend != "torch":
            o, lse, rows, lse_out = self._descs
            self._d_out.ptr = out.data_ptr()
            _core._C.merge_states_gather(o, lse, rows, self._d_out, lse_out, self._device_index,
                                         _core.stream_handle(self._device))
            return out
        torch.index_select(self.o_pool, 0, self._flat_rows, out=self._g_o.flatten(0, 1))
        torch.index_select(self.lse_pool, 0, self._flat_rows, out=self._g_lse.flatten(0, 1))
        merge_states_multi(self._g_o, self._g_lse, out=out, lse_out=self.lse_out,
                           backend="torch" if backend == "torch" else "auto")
        return out


def prepare_merge_states_gather(o_pool, lse_pool, rows, *, lse_out=None,
                                out_dtype: torch.dtype = torch.float32) -> PreparedMergeGather:
    """Check once and prepare merge_states_gather(o_pool, lse_pool, rows) into outputs of
    `out_dtype` (see PreparedMergeGather).

    o_pool [R, H, D] fp32 (rows may be strided, the head dim contiguous), lse_pool [R, H] fp32,
    rows int32 [S, T] contiguous with every value in [0, R) (an index into the pool: not checked
    on the device), lse_out optional fp32 [T, H]."""
    return PreparedMergeGather(o_pool, lse_pool, rows, lse_out, out_dtype)


def merge_states_gather(o_pool, lse_pool, rows, *, out=None, lse_out=None, backend="auto"):
    """out[t] = merge of the states o_pool[rows[s, t]], lse_pool[rows[s, t]] over s.

    Returns (out [T, H, D] (default float32), lse_out [T, H] fp32). Shapes as in
    `prepare_merge_states_gather`; rows is checked to lie in [0, R) here (host sync)."""
    T, H, D = _check(o_pool, lse_pool, rows, lse_out)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= o_pool.shape[0]):
        raise ValueError(f"rows must lie in [0, {o_pool.shape[0]}) (the pool's rows)")
    if out is None:
        out = torch.empty(T, H, D, dtype=torch.float32, device=o_pool.device)
    else:
        check_tensor(out, "out", ndim=3, dtypes=FLOAT_DTYPES)
        if tuple(out.shape) != (T, H, D) or not out.is_contiguous() or \
                out.device != o_pool.device:
            raise ValueError(f"out must be a contiguous [{T}, {H}, {D}] tensor on "
                             f"{o_pool.device}, got {tuple(out.shape)} on {out.device}")
    prepared = PreparedMergeGather(o_pool, lse_pool, rows, lse_out, out.dtype)
    prepared(out, backend)
    return out, prepared.lse_out
