#!/usr/bin/env bash
# One-off driver (not committed): decode short-shape sweep + per-kernel profile, epilogue variants, decode kernel bench with both FlashInfer anchors.
set -u
cd "$(dirname "$0")"
export ESP_COMMIT=${ESP_COMMIT:-wip} PYTHONUNBUFFERED=1
{
echo "=== env $(date -u +%T)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .anchors/*.whl
mkdir -p /tmp/fi && tar -xzf .anchors/flashinfer-*.tar.gz -C /tmp/fi
export PYTHONPATH=$PWD:/tmp/site:/tmp/fi/flashinfer_trim
export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_DISABLE_VERSION_CHECK=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
MAX_JOBS=16 timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
cd bench
echo "=== diag_decode --short $(date -u +%T)"
timeout 120 python3 diag_decode.py --short 2>&1 | tee $OUT/diag_decode_short.txt
echo "=== diag_decode --profile $(date -u +%T)"
timeout 90 python3 diag_decode.py --profile 2>&1 | tee $OUT/diag_decode_profile.txt
echo "=== bench_decode kernel $(date -u +%T)"
timeout 150 python3 bench_decode.py --only kernel --out $OUT/bench_decode.jsonl 2>&1 | grep -v "^ *$" > $OUT/bench_decode.txt; grep -i "flashinfer\|skipped\|B8" $OUT/bench_decode.txt | head -30
echo "=== diag_epilogue $(date -u +%T)"
timeout 150 python3 diag_epilogue.py 2>&1 | tee $OUT/diag_epilogue.txt | tail -25
echo "=== done $(date -u +%T)"
} 2>&1 | tee $OUT/log.txt
