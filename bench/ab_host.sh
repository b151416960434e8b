#!/usr/bin/env bash
# Host overhead per decode layer, A/B in one call: bench_decode.py's host rows alternating an
# older tree (carried in build/ab_old, e.g. `git archive <commit> | tar -x -C build/ab_old`,
# built here for this machine's Python) with this checkout, old/new/old/new. The GPU machine's
# host speed drifts ~1.3x between calls (bench/NOTES.md), so only rows of one call compare.
#   ESP_AB_COMMIT (the old tree's commit) and ESP_COMMIT (this one) tag the rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
OLD=build/ab_old
[ -f "$OLD/setup.py" ] || { echo "no $OLD/setup.py: carry an older tree there"; exit 1; }
start=$(date +%s)
(cd "$OLD" && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > build_ab.log 2>&1) \
  || { echo "A/B build failed"; tail -20 "$OLD/build_ab.log"; exit 1; }
echo "old tree built in $(( $(date +%s) - start )) s"
for round in 1 2; do
  echo "--- round $round: old (${ESP_AB_COMMIT:?})"
  ESP_KERNELS_ROOT=$PWD/$OLD ESP_COMMIT=$ESP_AB_COMMIT \
    python3 bench/bench_decode.py --only host --out "$OUT/ab_host.jsonl"
  echo "--- round $round: new (${ESP_COMMIT:?})"
  python3 bench/bench_decode.py --only host --out "$OUT/ab_host.jsonl"
done
