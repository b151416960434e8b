#!/usr/bin/env bash
# The README's test command: install what the tests need, build, run the CPU tier.
#   bash scripts/test.sh            (CPU tier; GPU tests skip with a reason without a GPU)
# scripts/install.sh pins torch first so that nothing later resolves a CUDA torch, then the
# test requirements are added.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
$PY -m pip install -q -r requirements-test.txt
$PY -m esp_kernels show-config
# Exit 5 (no tests collected) is a failure like any other non-zero status.
$PY -m pytest tests -q -rfEs -p no:cacheprovider --timeout=900 "$@"
