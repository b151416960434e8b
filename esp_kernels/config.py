"""Build and runtime configuration: `esp.show_config()` / `python -m esp_kernels show-config`."""

from __future__ import annotations

import os
import subprocess

import torch

from . import _core

__version__ = "0.1.0"


def _build_info() -> dict:
    try:
        from . import _build_info as info  # written by setup.py at build time
        return dict(info.BUILD_INFO)
    except ImportError:
        return {}


def _git_commit(where: str | None = None) -> str:
    """HEAD of the checkout at `where` (default: this package's), with "-modified" when tracked
    files differ from it: a tree copied onto another machine can carry a stale .git, whose HEAD
    alone would name code that did not run. Outside a checkout, the commit recorded at build."""
    info = _build_info().get("commit")
    here = where or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            diff = subprocess.run(["git", "-c", "core.fileMode=false", "diff", "--quiet", "HEAD",
                                   "--"], cwd=here, capture_output=True, timeout=10)
            return out.stdout.strip() + ("-modified" if diff.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info or "unknown"


def config() -> dict:
    """What this installation has: version, commit, compiled module, archs, devices, versions."""
    info = _build_info()
    cfg = {
        "version": __version__,
        "commit": _git_commit(),
        "compiled_module": "loaded" if _core.has_compiled() else f"absent ({_core._C_ERROR})",
        "cuda_archs": info.get("cuda_archs", "none (not built)"),
        "nvcc": info.get("nvcc", "none"),
        "nccl_header": info.get("nccl_include", "none"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
    }
    try:
        import triton
        cfg["triton"] = triton.__version__
    except ImportError:
        cfg["triton"] = "absent"
    if torch.cuda.is_available():
        cfg["devices"] = ", ".join(
            f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count()))
    else:
        cfg["devices"] = "no CUDA device"
    if _core.has_compiled():
        cfg["core_built_for"] = _core._C.built_archs()
    return cfg


def show_config() -> str:
    """Print and return the configuration table."""
    cfg = config()
    width = max(len(k) for k in cfg)
    text = "\n".join(f"{k:<{width}} : {v}" for k, v in cfg.items())
    print(text)
    return text
