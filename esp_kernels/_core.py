"""Access to the compiled core (`esp_kernels._C`) and the adapters torch tensors go through.

The core takes raw device pointers, shapes, strides (in elements), a device index and a
cudaStream_t handle; this module builds those from torch tensors (or anything torch can view
zero-copy through DLPack / ``__cuda_array_interface__``, e.g. CuPy arrays).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch

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


_PLAIN = (torch.Tensor, int, float, str, bool, type(None))


def is_foreign_array(x) -> bool:
    """Whether x is an array of another library that torch can view without a copy."""
    return not isinstance(x, _PLAIN) and (hasattr(x, "__dlpack__")
                                          or hasattr(x, "__cuda_array_interface__"))


def as_tensor(x, name: str) -> torch.Tensor:
    """View `x` as a torch tensor without copying (torch, DLPack or CUDA array interface)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        # DLPack's stream handshake: torch's current stream waits for the producer's work.
        return torch.from_dlpack(x)
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x)  # on the array's own device, zero-copy
    raise TypeError(f"{name} must be a torch tensor or expose DLPack/__cuda_array_interface__, "
                    f"got {type(x).__name__}")


def _exporter(x):
    """The function that turns a torch tensor into an array of x's kind, zero-copy."""
    ns = x.__array_namespace__() if hasattr(x, "__array_namespace__") else None
    top = sys.modules.get(type(x).__module__.partition(".")[0])
    for mod in (ns, top):
        if mod is None:
            continue
        if hasattr(x, "__dlpack__") and hasattr(mod, "from_dlpack"):
            return mod.from_dlpack  # the consumer's stream waits for torch's (DLPack handshake)
        if hasattr(mod, "asarray"):            # e.g. cupy.asarray reads __cuda_array_interface__
            return mod.asarray
        if hasattr(getattr(mod, "cuda", None), "as_cuda_array"):  # numba device arrays
            return mod.cuda.as_cuda_array
    raise TypeError(f"cannot hand a result back as {type(x).__name__}: its library offers no "
                    "from_dlpack / asarray")


def accepts_arrays(op):
    """Let `op` take DLPack / __cuda_array_interface__ arrays (CuPy, NumPy, ...) wherever it takes
    tensors. They are viewed as torch tensors without a copy; tensor results come back as the
    caller's kind: the caller's own array where the op returns an argument it wrote in place,
    else a zero-copy array made with the library of the first such argument. The op runs on
    torch's current stream: arrays come in and results go out through DLPack's stream
    handshake; arrays written in place are ordered with the caller's later work by that stream
    (make it the caller's, e.g. torch.cuda.ExternalStream, when the caller uses its own).
    Torch-only calls pay one isinstance per argument (0.5 us for five on the build machine)."""
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if not (any(map(is_foreign_array, args)) or any(map(is_foreign_array, kwargs.values()))):
            return op(*args, **kwargs)
        mine, first = {}, []

        def view(x, name):
            if not is_foreign_array(x):
                return x
            t = as_tensor(x, name)
            mine[id(t)] = (t, x)
            first.append(x)
            return t

        names = list(inspect.signature(op).parameters)
        args = [view(a, names[i] if i < len(names) else f"argument {i}")
                for i, a in enumerate(args)]
        kwargs = {k: view(v, k) for k, v in kwargs.items()}

        def back(r):
            if isinstance(r, torch.Tensor):
                hit = mine.get(id(r))
                return hit[1] if hit is not None and hit[0] is r else _exporter(first[0])(r)
            if isinstance(r, tuple):
                return tuple(back(x) for x in r)
            return r

        return back(op(*args, **kwargs))
    return wrapper


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
