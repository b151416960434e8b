#!/usr/bin/env bash
# The README's test command: install what the tests need, build, run the CPU tier.
#   bash scripts/test.sh            (CPU tier; GPU tests skip with a reason without a GPU)
# torch is pinned to the CPU wheel first so that nothing later resolves a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -r requirements-test.txt
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -m esp_kernels show-config
# Exit 5 (no tests collected) is a failure like any other non-zero status.
$PY -m pytest tests -q -rfEs -p no:cacheprovider --timeout=900 "$@"
