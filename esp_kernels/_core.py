"""Access to the compiled core (`esp_kernels._C`) and the adapters torch tensors go through.

The core takes raw device pointers, shapes, strides (in elements), a device index and a
cudaStream_t handle; this module builds those from torch tensors (or anything torch can view
zero-copy through DLPack / ``__cuda_array_interface__``, e.g. CuPy arrays).
"""

from __future__ import annotations

import torch

import importlib

try:  # the package must import without the compiled module (CPU-only installs, CI without nvcc)
    _C = importlib.import_module(f"{__package__}._C")
    _C_ERROR: str | None = None
except ModuleNotFoundError:
    _C = None
    _C_ERROR = "not built: no nvcc at install time, or ESP_SKIP_CUDA=1"
except ImportError as exc:  # built but cannot load (e.g. built for another Python)
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

# Codes shared with csrc/common/esp_common.h (enum class DType). Keep the two in sync.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
}


def has_compiled() -> bool:
    return _C is not None


def require_compiled(op: str):
    """Return the compiled module or raise a RuntimeError that says what is missing."""
    if _C is None:
        raise RuntimeError(
            f"esp_kernels.{op} on a CUDA tensor needs the compiled extension esp_kernels._C, "
            f"which did not load ({_C_ERROR}). Build it with nvcc available: "
            "`pip install --no-build-isolation -e .` (see README)."
        )
    return _C


def as_tensor(x, name: str) -> torch.Tensor:
    """View `x` as a torch tensor without copying (torch, DLPack or CUDA array interface)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x, device="cuda")
    raise TypeError(f"{name} must be a torch tensor or expose DLPack/__cuda_array_interface__, "
                    f"got {type(x).__name__}")


def raw_desc(ptr: int, dtype: torch.dtype, shape, strides):
    """TensorDesc of the core for memory torch cannot express as one tensor view."""
    try:
        code = DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the compiled core") from None
    return _C.TensorDesc(ptr, code, list(shape), list(strides))


def desc(t: torch.Tensor):
    """TensorDesc of the core for tensor `t` (pointer, dtype code, shape, strides)."""
    return raw_desc(t.data_ptr(), t.dtype, t.shape, t.stride())


# torch's C accessor skips the Stream object torch.cuda.current_stream builds (measured at ~20 us
# per call with virtual-rank threads contending for the GIL); fall back where it is missing.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """Raw cudaStream_t of torch's current stream on `device`."""
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else
                           torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream
