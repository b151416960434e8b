#!/usr/bin/env bash
# The README's first command, on a fresh clone of a fresh machine: install what the package's
# commands need (scripts/install.sh), then run one of them.
#   bash scripts/run.sh demo [--device cpu|cuda] [--instances N] [--model DIR]
#   bash scripts/run.sh show-config
#   bash scripts/run.sh            (the list of commands)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m esp_kernels "$@"
