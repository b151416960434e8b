#!/usr/bin/env bash
# One call on the GPU machine: build, GPU test tier, compute-sanitizer, benchmarks with anchors.
#   STAGES="build test sanitize bench"   (default: all four, in this order; "" for none)
#   BENCHES="merge prefill_step ring decode kv_copy comm"   (bench/bench_<name>.py)
#   QUICK=1            smaller benchmark sizes
#   PYTEST_K / PYTEST_ARGS   a pytest -k expression (both runs; NCCL's may then select none) /
#                      extra pytest arguments (split on spaces)
#   EXTRA="cmd; cmd"   shell commands run after the stages, same environment (e.g.
#                      EXTRA="python3 bench/diag_host.py --calls; bash bench/multi_gpu.sh 2")
#   BASELINE_DIR=path  an older checkout (e.g. `git worktree add /tmp/old <commit>`, carried or
#                      made in the same call): built in place, and its own bench scripts run
#                      alternately with this tree's, so both sets of rows come from one call
#                      (the host's speed drifts ~1.3x between calls); a table compares them
#   ESP_COMMIT / BASELINE_COMMIT   tags for the rows (a copied tree's .git can be stale: without
#                      a tag, or with one equal to that stale HEAD, rows read <HEAD>-modified)
# Anchors: a carried `.anchors/` (FlashInfer trimmed tarball, tvm-ffi and cuDNN frontend wheels)
# is installed into /tmp/fi and /tmp/site; without it each benchmark prints one line saying the
# anchor is skipped. Wheels carried in `.whl/` (e.g. nvidia-cutlass) are installed first.
# Writes under $OUT (default bench/results/local): log.txt, pytest_gpu.txt, sanitizer.txt,
# bench.jsonl (and bench_baseline.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-bench/results/local}
STAGES=${STAGES-build test sanitize bench}
BENCHES=${BENCHES-merge prefill_step ring decode kv_copy comm}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
exec > >(tee -a "$OUT/log.txt") 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp "environment"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
if ls .anchors/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .anchors/*.whl
fi
if ls .anchors/flashinfer-*.tar.gz >/dev/null 2>&1; then
  mkdir -p /tmp/fi && tar -xzf .anchors/flashinfer-*.tar.gz -C /tmp/fi
  export PYTHONPATH=/tmp/fi/flashinfer_trim:${PYTHONPATH:-}
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_DISABLE_VERSION_CHECK=1
else
  echo "no .anchors/flashinfer-*.tar.gz: the FlashInfer anchors will be skipped"
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda, "nccl(torch)", torch.cuda.nccl.version())
for name in ("flashinfer", "cudnn"):
    try:
        m = __import__(name); print(name, getattr(m, "__version__", "?"))
    except Exception as e: print(name, "absent:", type(e).__name__, e)
PY
nvcc --version | tail -1

build_in_place() {  # the baseline: in its own folder, without touching the editable install
  local start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$OUT/build_baseline.log" 2>&1 \
    || { echo "BASELINE BUILD FAILED"; tail -30 "$OUT/build_baseline.log"; return 1; }
  echo "baseline built in $(( $(date +%s) - start )) s"
}

if has build; then
  stamp "build"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . \
    || { echo "BUILD FAILED"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
  if [ -n "${BASELINE_DIR:-}" ]; then
    (cd "$BASELINE_DIR" && build_in_place) || exit 1
  fi
fi
export PYTHONPATH=$ROOT:$PYTHONPATH
python3 -m esp_kernels show-config

if has test; then
  # NCCL tests in their own process: a crash there must not hide the other results.
  # --timeout-method=thread: a kernel that never finishes blocks the main thread in C, where
  # the default signal method cannot interrupt it (three runs were cut by the call's limit with
  # no trace); the thread method dumps every thread's stack and ends the run. 180 s per test
  # stays under a call's limit (the slowest GPU test took 17.6 s on an H100).
  stamp "pytest -m gpu (all but NCCL)"
  python3 -m pytest -m gpu tests -q -rfE -p no:cacheprovider --timeout=180 \
    --timeout-method=thread \
    --ignore=tests/test_comm_nccl.py \
    ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -40
  stamp "pytest -m gpu tests/test_comm_nccl.py"
  python3 -m pytest -m gpu tests/test_comm_nccl.py -q -rfE -p no:cacheprovider --timeout=300 \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
    | tee -a "$OUT/pytest_gpu.txt" | tail -20
fi

if has sanitize; then
  stamp "compute-sanitizer"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_cases.py \
      > "$OUT/sanitizer_$tool.txt" 2>&1
    echo "compute-sanitizer $tool exit $?"; tail -5 "$OUT/sanitizer_$tool.txt"
  done
  cat "$OUT"/sanitizer_*.txt > "$OUT/sanitizer.txt" && rm -f "$OUT"/sanitizer_*.txt
fi

if has bench; then
  BASE_TAG=${BASELINE_COMMIT:-$(git -C "${BASELINE_DIR:-.}" rev-parse --short HEAD 2>/dev/null \
    || echo baseline)}
  for b in $BENCHES; do
    stamp "bench $b"
    python3 bench/bench_$b.py --out "$OUT/bench.jsonl" ${QUICK:+--quick}
    if [ -n "${BASELINE_DIR:-}" ]; then
      stamp "bench $b, baseline $BASE_TAG ($BASELINE_DIR)"
      if [ -f "$BASELINE_DIR/bench/bench_$b.py" ]; then
        (cd "$BASELINE_DIR" && PYTHONPATH=$BASELINE_DIR:${PYTHONPATH#$ROOT:} ESP_COMMIT=$BASE_TAG \
          python3 bench/bench_$b.py --out "$OUT/bench_baseline.jsonl" ${QUICK:+--quick})
      else
        echo "the baseline has no bench/bench_$b.py"
      fi
    fi
  done
  if [ -n "${BASELINE_DIR:-}" ]; then
    stamp "baseline ($BASE_TAG) vs this tree"
    python3 bench/harness.py compare "$OUT/bench_baseline.jsonl" "$OUT/bench.jsonl"
  fi
fi

if [ -n "${EXTRA:-}" ]; then
  stamp "EXTRA: $EXTRA"
  bash -c "$EXTRA"
  echo "EXTRA exit $?"
fi
stamp "done"
