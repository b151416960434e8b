"""Build of esp_kernels: the Python package plus, when nvcc is present, the compiled core _C.

Environment:
  ESP_CUDA_ARCHS        e.g. "90a" or "80;90a" (default "90a"); TORCH_CUDA_ARCH_LIST ("9.0a 8.0+PTX")
                        is honoured when ESP_CUDA_ARCHS is unset
  MAX_JOBS              parallel compile jobs (default: all cores)
  ESP_SKIP_CUDA=1       build the pure-Python package only
The build needs no torch. nccl.h comes from the nvidia-nccl-cu13 wheel; libnccl is loaded at run
time only when a native NCCL group is created.
"""

import functools
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    cands = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if os.environ.get("CUDA_HOME"):
        cands.insert(0, os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def parse_archs():
    """-> (list of nvcc -gencode flags, label). ESP_CUDA_ARCHS wins over TORCH_CUDA_ARCH_LIST."""
    spec = os.environ.get("ESP_CUDA_ARCHS")
    entries = []
    if spec:
        entries = [(a.strip(), False) for a in re.split(r"[;, ]+", spec) if a.strip()]
    elif os.environ.get("TORCH_CUDA_ARCH_LIST"):
        for a in re.split(r"[;, ]+", os.environ["TORCH_CUDA_ARCH_LIST"]):
            if not a.strip():
                continue
            ptx = a.endswith("+PTX")
            a = a.replace("+PTX", "")
            entries.append((a.replace(".", ""), ptx))
    else:
        entries = [("90a", False)]
    flags = []
    for arch, ptx in entries:
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"bad CUDA arch {arch!r} (expected e.g. 90a, 80, or 9.0a in "
                             "TORCH_CUDA_ARCH_LIST)")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags, ";".join(a + ("+PTX" if p else "") for a, p in entries)


def nccl_include_dir():
    try:
        import nvidia.nccl  # noqa: F401  (the nvidia-nccl-cu13 wheel)
    except ImportError:
        return None
    for base in nvidia.nccl.__path__:
        inc = os.path.join(base, "include")
        if os.path.isfile(os.path.join(inc, "nccl.h")):
            return inc
    return None


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What show-config reports about this build: CUDA archs, nvcc, NCCL header, commit."""
    nvcc = find_nvcc()
    if skip_cuda(nvcc):
        return {"cuda_archs": "none", "nvcc": "none", "nccl_include": "none",
                "commit": git_commit()}
    return {"cuda_archs": parse_archs()[1], "nvcc": nvcc_version(nvcc),
            "nccl_include": nccl_include_dir() or "none", "commit": git_commit()}


def skip_cuda(nvcc) -> bool:
    return os.environ.get("ESP_SKIP_CUDA") == "1" or nvcc is None


def write_build_info(package_dir: str) -> str:
    """Write esp_kernels/_build_info.py into `package_dir`; returns its path."""
    os.makedirs(package_dir, exist_ok=True)
    path = os.path.join(package_dir, "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; not tracked.\n")
        f.write(f"BUILD_INFO = {build_info()!r}\n")
    return path


class BuildPy(build_py):
    """Copies the package, then generates _build_info.py into the build directory, so every
    wheel carries it and the source tree is left alone. An editable install imports from the
    source tree instead: there build_ext (in place) writes it."""

    def run(self):
        super().run()
        if not self.editable_mode:
            write_build_info(os.path.join(self.build_lib, "esp_kernels"))


class CMakeBuild(build_ext):
    def run(self):
        nvcc = find_nvcc()
        if skip_cuda(nvcc):
            reason = "ESP_SKIP_CUDA=1" if nvcc else "nvcc not found"
            print(f"esp_kernels: {reason}; installing the pure-Python package without _C "
                  "(GPU ops will raise a clear error; CPU paths work).")
        else:
            # setuptools builds into the build directory and, when in place (editable installs,
            # `setup.py build_ext --inplace`), copies _C next to the sources.
            super().run()
        if self.inplace:
            write_build_info(os.path.join(ROOT, "esp_kernels"))

    def build_extension(self, ext):
        nvcc = find_nvcc()
        gencode, label = parse_archs()
        nccl_inc = nccl_include_dir()
        if nccl_inc is None:
            raise RuntimeError("nccl.h not found: pip install nvidia-nccl-cu13 (header at build "
                               "time; the library is loaded only when a NCCL group is created)")
        import pybind11

        outdir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        args = [
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DESP_GENCODE={';'.join(gencode)}",
            f"-DESP_ARCHS_LABEL={label}",
            f"-DESP_NCCL_INCLUDE_DIR={nccl_inc}",
            f"-DESP_OUTPUT_DIR={outdir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        print(f"esp_kernels build: archs {label}, nvcc {nvcc_version(nvcc)} ({nvcc}), "
              f"NCCL header {nccl_inc}, {jobs} jobs")
        subprocess.run(["cmake", ROOT] + args, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    name="esp_kernels",
    version="0.1.0",
    description="Kernels and communication for elastic sequence parallelism (LoongServe-style "
                "striped ring prefill, proactive KV migration, multi-master decode)",
    packages=find_packages(include=["esp_kernels", "esp_kernels.*"]),
    package_data={"esp_kernels.scheduler": ["profiles/*.json"]},
    python_requires=">=3.10",
    ext_modules=[Extension("esp_kernels._C", sources=[])],
    cmdclass={"build_py": BuildPy, "build_ext": CMakeBuild},
    entry_points={"console_scripts": ["esp-kernels=esp_kernels.__main__:main"]},
    zip_safe=False,
)
