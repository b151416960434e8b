#!/usr/bin/env bash
# The README's first command, on a fresh clone of a fresh machine: install what the package's
# commands need (scripts/install.sh), then run one of them.
#   bash scripts/run.sh demo [--device cpu|cuda] [--instances N] [--model DIR]
#   bash scripts/run.sh show-config
#   bash scripts/run.sh            (the list of commands)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
case "${1:-}" in
  # The demo checks every output against transformers and draws a PNG timeline.
  demo) $PY -m pip install -q transformers safetensors matplotlib ;;
  simulate) $PY -m pip install -q matplotlib ;;   # its PNGs
esac
exec $PY -m esp_kernels "$@"
