#!/usr/bin/env bash
# One-off driver (not committed): build; A/B of the Gluon step's schedule (0 snake, 1 snake+partial, 2 dynamic).
set -u
cd "$(dirname "$0")"
T0=$(date +%s)
left() { echo $(( 575 - ($(date +%s) - T0) )); }
export ESP_COMMIT=$1
STAGES="build" OUT=$OUT bash bench/gpu_check.sh > $OUT/build_log.txt 2>&1
tail -5 $OUT/build_log.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.diag:/tmp/site:/tmp/fi/flashinfer_trim FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_DISABLE_VERSION_CHECK=1
PT="python3 -m pytest -m gpu -q -rfE -p no:cacheprovider --timeout=120 --timeout-method=thread -p sched_plugin"
{
nvidia-smi --query-gpu=name --format=csv,noheader
echo "=== sweep 8k $(date -u +%T)"
timeout $(left) python3 bench/sweep_gluon_step.py --only 8k --out $OUT/sweep.jsonl
echo "=== tests sched 2 $(date -u +%T), $(left) s left"
ESP_SCHED=2 timeout $(left) $PT tests/test_ring_prefill.py -k "tile_table or (step_kernel_gpu and gluon and bfloat16) or (virtual_ranks and gluon)" > $OUT/pytest_s2.txt 2>&1
echo "pytest exit $?"; tail -3 $OUT/pytest_s2.txt
echo "=== ring sched 2 $(date -u +%T), $(left) s left"
timeout $(left) python3 .diag/with_sched.py 2 bench/bench_ring.py --out $OUT/ring_s2.jsonl
echo "=== ring sched 0 $(date -u +%T), $(left) s left"
timeout $(left) python3 .diag/with_sched.py 0 bench/bench_ring.py --out $OUT/ring_s0.jsonl
echo "=== sweep full $(date -u +%T), $(left) s left"
timeout $(left) python3 bench/sweep_gluon_step.py --out $OUT/sweep.jsonl
for s in 2 0; do
echo "=== prefill_step sched $s $(date -u +%T), $(left) s left"
timeout $(left) python3 .diag/with_sched.py $s bench/bench_prefill_step.py --out $OUT/step_s$s.jsonl
done
echo "=== tests sched 1 $(date -u +%T), $(left) s left"
ESP_SCHED=1 timeout $(left) $PT tests/test_ring_prefill.py -k "tile_table" > $OUT/pytest_s1.txt 2>&1
echo "pytest exit $?"; tail -3 $OUT/pytest_s1.txt
echo "=== done $(date -u +%T)"
} 2>&1 | tee $OUT/log.txt
