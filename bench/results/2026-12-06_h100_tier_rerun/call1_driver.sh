#!/usr/bin/env bash
# One-off driver (not committed): find the runtime-test block, then the whole GPU tier.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
{
echo "=== env $(date -u +%T)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
MAX_JOBS=16 timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
export PYTHONPATH=$PWD
echo "=== repro $(date -u +%T)"
timeout 90 python3 .diag/runtime_step.py 2>&1 | grep -v "^ *$" | tee $OUT/repro.txt
echo "=== tile-table + runtime tests $(date -u +%T)"
timeout 200 python3 -m pytest -m gpu "tests/test_ring_prefill.py::test_gluon_step_walks_the_tile_table" tests/test_runtime_gpu.py -v -s -rfE -p no:cacheprovider --timeout=90 --timeout-method=thread > $OUT/pytest_targeted.txt 2>&1
echo "exit $?"; grep -E "PASSED|FAILED|ERROR|Timeout|step [0-9]|peak" $OUT/pytest_targeted.txt | tail -40
echo "=== tier $(date -u +%T)"
timeout 240 python3 -m pytest -m gpu tests -q -rfE -p no:cacheprovider --timeout=90 --timeout-method=thread --ignore=tests/test_comm_nccl.py --ignore=tests/test_runtime_gpu.py > $OUT/pytest_gpu.txt 2>&1
echo "exit $?"; tail -15 $OUT/pytest_gpu.txt
echo "=== done $(date -u +%T)"
} 2>&1 | tee $OUT/log.txt
