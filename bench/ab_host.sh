#!/usr/bin/env bash
# Host overhead per decode layer, A/B in one call: bench_decode.py's host rows, alternating
# other trees carried as build/ab_*/ (e.g. `git archive <commit> | tar -x -C build/ab_old`, each
# with an AB_TAG file naming it; built here for this machine's Python) with this checkout,
# AB_ROUNDS times (default 2); AB_PARTS: bench_decode.py --only parts (default host). The GPU
# machine's host speed drifts ~1.3x between calls and ~1.7x within one (bench/NOTES.md), so only
# rows of one call compare, and the CUDA API calls per layer (diag_host.py --calls) come first.
# ESP_COMMIT tags this checkout's rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
trees=()
for d in build/ab_*/; do
  d=${d%/}
  [ -f "$d/setup.py" ] || continue
  start=$(date +%s)
  (cd "$d" && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > build_ab.log 2>&1) \
    || { echo "A/B build of $d failed"; tail -20 "$d/build_ab.log"; exit 1; }
  echo "$d ($(cat "$d/AB_TAG" 2>/dev/null || echo "$d")) built in $(( $(date +%s) - start )) s"
  trees+=("$d")
done
[ ${#trees[@]} -gt 0 ] || { echo "no build/ab_*/setup.py: carry an older tree there"; exit 1; }
for d in "${trees[@]}"; do  # driver calls per layer: exact, unlike the drifting host times
  (cd bench && ESP_KERNELS_ROOT=$PWD/../$d python3 diag_host.py --calls 2>&1 | grep -v Warning)
done
(cd bench && python3 diag_host.py --calls 2>&1 | grep -v Warning)
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for d in "${trees[@]}"; do
    tag=$(cat "$d/AB_TAG" 2>/dev/null || echo "$d")
    echo "--- round $round: $tag"
    ESP_KERNELS_ROOT=$PWD/$d ESP_COMMIT=$tag \
      python3 bench/bench_decode.py --only ${AB_PARTS:-host} --out "$OUT/ab_host.jsonl"
  done
  echo "--- round $round: this checkout (${ESP_COMMIT:?})"
  python3 bench/bench_decode.py --only ${AB_PARTS:-host} --out "$OUT/ab_host.jsonl"
done
