#!/usr/bin/env bash
# One-off driver (not committed): build, snake-order sweep, prefill/ring/decode benches, targeted gluon tests.
set -u
cd "$(dirname "$0")"
T0=$(date +%s)
left() { echo $(( 550 - ($(date +%s) - T0) )); }
export ESP_COMMIT=$1
STAGES="build" OUT=$OUT bash bench/gpu_check.sh > $OUT/build_log.txt 2>&1
tail -5 $OUT/build_log.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:/tmp/fi/flashinfer_trim FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_DISABLE_VERSION_CHECK=1
{
echo "=== sweep $(date -u +%T)"
timeout $(left) python3 bench/sweep_gluon_step.py --out $OUT/sweep.jsonl
for b in prefill_step ring decode; do
  echo "=== bench $b $(date -u +%T), $(left) s left"
  timeout $(left) python3 bench/bench_$b.py --out $OUT/bench.jsonl
done
echo "=== tests $(date -u +%T), $(left) s left"
timeout $(left) python3 -m pytest -m gpu tests/test_ring_prefill.py -k "gluon or step_kernel" -q -rfE -p no:cacheprovider --timeout=120 --timeout-method=thread > $OUT/pytest_gpu.txt 2>&1
echo "pytest exit $?"; tail -3 $OUT/pytest_gpu.txt
echo "=== done $(date -u +%T)"
} 2>&1 | tee $OUT/log.txt
