#!/usr/bin/env bash
# One call on the GPU machine: build, GPU test tier, compute-sanitizer, benchmarks.
#   STAGES="build test sanitize bench" (default; also: nccl_diag host_diag
#   decode_diag decode_profile decode_ncu micro multi host_ab); multi runs bench/multi_gpu.sh on
#   every visible GPU (issue 7's checks and benchmarks, one process per GPU over native NCCL);
#   host_ab runs bench/ab_host.sh (host rows, an older tree carried in build/ab_old vs this one)
#   BENCHES="merge prefill_step ring decode kv_copy comm"
#   PYTEST_K (a pytest -k expression), PYTEST_ARGS (extra arguments, split on spaces)
#   QUICK=1 (smaller benchmark sizes); ESP_COMMIT tags result rows (the copied .git can be stale)
# Writes under $OUT (default bench/results/local): log.txt, pytest_gpu.txt, sanitizer.txt,
# bench.jsonl. The machine has no network: carried wheels in .whl/ are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
STAGES=${STAGES:-build test sanitize bench}
BENCHES=${BENCHES:-merge prefill_step ring decode kv_copy comm}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
exec > >(tee -a "$OUT/log.txt") 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
NGPU=$(nvidia-smi -L | grep -c "^GPU")
if [ "$NGPU" -gt 1 ]; then nvidia-smi topo -m; fi
python3 - <<'PY'
import torch, triton, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda, "nccl(torch)", torch.cuda.nccl.version())
try:
    import nvidia.nccl; print("nvidia.nccl", nvidia.nccl.__path__)
except ImportError as e: print("no nvidia-nccl wheel:", e)
PY
nvcc --version | tail -1
for c in g++ /usr/bin/g++; do echo "$c: $($c --version | head -1) ($(command -v $c))"; done
echo "CXX=${CXX:-unset} CC=${CC:-unset} CUDAHOSTCXX=${CUDAHOSTCXX:-unset}"

if has build; then
  stamp "build"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . \
    || { echo "BUILD FAILED"; exit 1; }
  echo "build took $(( $(date +%s) - start )) s"
fi
python3 -m esp_kernels show-config

if has test; then
  # NCCL tests in their own process: a crash there must not hide the other results.
  stamp "pytest -m gpu (all but NCCL)"
  python3 -m pytest -m gpu tests -q -rfE -p no:cacheprovider --timeout=600 \
    --ignore=tests/test_comm_nccl.py ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/pytest_gpu.txt" | tail -40
  stamp "pytest -m gpu tests/test_comm_nccl.py"
  python3 -m pytest -m gpu tests/test_comm_nccl.py -q -rfE -p no:cacheprovider --timeout=300 \
    2>&1 | tee -a "$OUT/pytest_gpu.txt" | tail -20
fi

if has nccl_diag; then
  stamp "NCCL world-of-1 under cuda-gdb (native backtrace on a crash)"
  NCCL_DEBUG=INFO timeout 120 cuda-gdb -q -batch -ex run -ex bt \
    --args python3 bench/diag_nccl.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -60
fi

if has host_diag; then
  stamp "host overhead diagnostic"
  (cd bench && python3 diag_host.py 2>&1 | head -80)
fi

if has decode_diag; then
  stamp "decode diagnostic: page order, head layout, cuDNN"
  (cd bench && python3 diag_decode.py)
fi

if has decode_profile; then
  stamp "decode: event time vs per-kernel device time"
  (cd bench && python3 diag_decode.py --profile) 2>&1 | tee "$OUT/decode_profile.txt"
fi

if has decode_ncu; then
  stamp "decode under Nsight Compute"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    (cd bench && "$NCU" --clock-control none --profile-from-start off --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats python3 diag_decode.py --ncu) > "$OUT/ncu_decode.txt" 2>&1
    echo "ncu exit $?"; grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput" \
      "$OUT/ncu_decode.txt" | head -80
  else
    echo "no ncu on this machine"
  fi
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

if has micro; then
  stamp "pytest-benchmark microbenchmarks"
  python3 -m pytest bench/test_microbench.py -q -p no:cacheprovider --benchmark-columns=min,median,max \
    2>&1 | tail -15
fi

if has bench; then
  for b in $BENCHES; do
    stamp "bench $b"
    python3 bench/bench_$b.py --out "$OUT/bench.jsonl" ${QUICK:+--quick}
  done
fi
if has host_ab; then
  stamp "host overhead A/B (bench/ab_host.sh)"
  bash bench/ab_host.sh
fi
if has multi; then
  stamp "multi_gpu.sh $NGPU"
  bash bench/multi_gpu.sh "$NGPU" --out "$OUT/bench.jsonl" ${QUICK:+--quick}
  echo "multi_gpu.sh exit $?"
  stamp "multi_gpu.sh $NGPU --nonblocking"
  bash bench/multi_gpu.sh "$NGPU" --nonblocking --out "$OUT/bench.jsonl" ${QUICK:+--quick}
  echo "multi_gpu.sh --nonblocking exit $?"
  if [ "$NGPU" -ge 2 ]; then
    stamp "migration diagnostic (2 GPUs)"
    python3 -m torch.distributed.run --standalone --nproc_per_node=2 bench/diag_migration.py \
      2>&1 | grep -v "OMP_NUM_THREADS\|^\*" | tee "$OUT/diag_migration.txt"
  fi
fi
stamp "done"
