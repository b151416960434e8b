#!/usr/bin/env bash
# Install esp_kernels and what its commands need into the current Python, safely on a fresh machine:
#   1. torch==2.13.0 first (on the CI machine that resolves to the local CPU wheel), so that no
#      later step resolves a CUDA torch behind the user's back;
#   2. the build tools and Triton only when nvcc is there (the CUDA build needs pybind11, the NCCL
#      header wheel, cmake, ninja; Triton is the default prefill kernel on CUDA);
#   3. the package itself, editable; its compiled core is built only with nvcc (setup.py falls back
#      to the pure-Python package and says so).
# Used by scripts/run.sh (the README's first command) and scripts/test.sh. PYTHON picks the
# interpreter (default python3); MAX_JOBS the parallel compile jobs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
step() { echo "esp_kernels install: $*" >&2; }

step "torch==2.13.0 (pinned first)"
$PY -m pip install -q "torch==2.13.0"
# setuptools/wheel: the package is built without build isolation (see pyproject.toml); recent
# Python venvs ship without setuptools.
$PY -m pip install -q "setuptools>=64" wheel numpy
NVCC=""
for cand in "${CUDACXX:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" \
            /usr/local/cuda/bin/nvcc; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC=$cand; break; fi
done
if [ -n "$NVCC" ] && [ "${ESP_SKIP_CUDA:-0}" != 1 ]; then
  step "nvcc found ($NVCC): build tools and Triton, then the compiled core (minutes)"
  $PY -m pip install -q "pybind11>=2.12" nvidia-nccl-cu13 "cmake>=3.24" ninja triton
else
  step "no nvcc (or ESP_SKIP_CUDA=1): the pure-Python package (CPU paths)"
  export ESP_SKIP_CUDA=1
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation --no-deps -e .
