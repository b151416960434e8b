#!/usr/bin/env bash
# One-off driver (not committed): build, then the GPU tests of this session's changes (runtime vs transformers, decode short-split schedule, decode graphs), cut at ~150 s.
set -u
cd "$(dirname "$0")"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
{
echo "=== env $(date -u +%T)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
MAX_JOBS=16 timeout 120 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
export PYTHONPATH=$PWD
LEFT=$(( 150 - ($(date +%s) - T0) ))
echo "=== tests $(date -u +%T), ${LEFT} s left"
timeout $LEFT python3 -m pytest -m gpu tests/test_decode.py tests/test_runtime_gpu.py -k "short_splits or teacher_forced or graph_replay or prepared_decode_partial_gpu or balanced_long" -v -rfE -p no:cacheprovider --timeout=100 --timeout-method=thread > $OUT/pytest_gpu.txt 2>&1
echo "pytest exit $?"; grep -E "PASSED|FAILED|ERROR|Timeout" $OUT/pytest_gpu.txt | head -40; tail -2 $OUT/pytest_gpu.txt
echo "=== done $(date -u +%T)"
} 2>&1 | tee $OUT/log.txt
