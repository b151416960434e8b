#!/usr/bin/env bash
# The GPU call of gluon_barriers_staged.patch (README.md beside this file), run through
# bench/gpu_check.sh's EXTRA on a tree with the patch applied:
#   STAGES="build" BENCHES="" ESP_COMMIT=<sha> \
#     EXTRA='bash bench/experiments/run_gluon_barriers.sh first' bash bench/gpu_check.sh
#   STAGES="" BENCHES="" ESP_COMMIT=<sha> \
#     EXTRA='bash bench/experiments/run_gluon_barriers.sh second' bash bench/gpu_check.sh
# first (~550 s at most): a smoke test with every switch on; if it fails or hangs, the same smoke test
# with each switch off in turn (which one breaks it); then the GPU tests the 2026-12-08 call did
# not reach plus the Gluon ones, and the variants' A/B (steps, 64k rings, one FA3 call).
# second (~400 s): compute-sanitizer (racecheck, memcheck) on small Gluon steps, the per-tile fit
# and the PC-sampling stall profile of the patched kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results folder (gpu_check.sh does)}
smoke() {  # 20 Gluon steps (written, merged, the output, the dynamic schedule) and rings on
  # virtual ranks, with short timeouts: a hang ends fast. (The first call compiles the
  # specializations: 18 such tests took 94.5 s in results/2026-12-07_h100_counter.)
  timeout 130 python3 -m pytest -m gpu ../tests/test_ring_prefill.py -q -x -p no:cacheprovider \
    --timeout=30 --timeout-method=thread -k "(gluon_last_step or dynamic_schedule_without or \
ring_prefill_virtual_ranks_gpu or takes_the_hopper or dynamic_counter) and not triton"
}
case "${1:-}" in
  first)
    smoke > "$OUT/smoke.txt" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      echo "smoke: passed with every switch on"
    elif [ $rc -eq 124 ] && ! grep -qE "FAILED|Timeout|Error" "$OUT/smoke.txt"; then
      # out of time while compiling, nothing failed: no bisect (each run compiles again)
      echo "smoke: out of time with no failure (compiles); going on"
      tail -3 "$OUT/smoke.txt"
    else
      echo "smoke: FAILED with every switch on (tail below); each switch off in turn:"
      tail -15 "$OUT/smoke.txt"
      for s in NAMED PINGPONG EXP_UNDER_PV STAGED; do
        if env "ESP_GLUON_$s=0" bash -c "$(declare -f smoke); smoke" >> "$OUT/smoke.txt" 2>&1
        then echo "  ESP_GLUON_$s=0: passes"; else echo "  ESP_GLUON_$s=0: fails"; fi
      done
      exit 1
    fi
    # test_runtime_gpu.py first: the 2026-12-08 call's limit cut it
    timeout 180 python3 -m pytest -m gpu ../tests/test_runtime_gpu.py ../tests/test_ring_prefill.py \
      ../tests/test_nan.py -q -rfE -p no:cacheprovider --timeout=120 \
      --timeout-method=thread -k "(gluon or nan or non_causal_and_long or takes_the_hopper or \
cannot_compile or poisoned or virtual_ranks_gpu or 64k_gpu or runtime_gpu) and not triton" \
      > "$OUT/pytest_gpu.txt" 2>&1
    tail -4 "$OUT/pytest_gpu.txt"
    timeout 200 python3 diag_step.py --only variants > "$OUT/variants.txt" 2>&1
    tail -30 "$OUT/variants.txt"
    ;;
  second)
    # racecheck and memcheck of Gluon steps with every switch on (written, merged with the
    # staged store, the output in q's dtype; both schedules): 152 items on at most 132 SMs, so
    # CTAs take several (buffers and barrier phases carried across items); no caching
    # allocator, so a store past a tensor lands outside any allocation
    for tool in racecheck memcheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool $tool \
        --error-exitcode 9 python3 - \
        >> "$OUT/sanitizer.txt" 2>&1 <<'PY'
import torch
from esp_kernels.prefill import gluon_step
from esp_kernels.testing import cu_seqlens
g = torch.Generator(device="cuda").manual_seed(0)
n, hq, hkv, d = 600, 32, 8, 128
q, k, v = (torch.randn(n, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
           for h in (hq, hkv, hkv))
cu = cu_seqlens([n], "cuda")
for schedule in ("snake", "dynamic"):
    for acc, out in ((False, None), (True, None), (True, torch.empty_like(q))):
        o = torch.randn(n, hq, d, device="cuda", generator=g)
        lse = torch.randn(n, hq, device="cuda", generator=g)
        gluon_step.ring_step_gluon(q, k, v, cu, cu, n, o, lse, True, 0, acc, d ** -0.5,
                                   schedule=schedule, out=out)
torch.cuda.synchronize()
print("sanitized steps done")
PY
      echo "compute-sanitizer $tool exit $?"
    done
    timeout 90 python3 diag_step.py --only fixed > "$OUT/fixed.txt" 2>&1
    tail -8 "$OUT/fixed.txt"
    timeout 120 ncu --profile-from-start off --clock-control none --section SourceCounters \
      --section WarpStateStats --section SpeedOfLight -o "$OUT/stalls" \
      python3 diag_stalls.py > "$OUT/stalls_run.txt" 2>&1
    ncu -i "$OUT/stalls.ncu-rep" --page source --print-source sass --csv > "$OUT/stalls.csv" 2>&1
    python3 diag_stalls.py --summarize "$OUT/stalls.csv" > "$OUT/stalls.txt" 2>&1
    gzip -f "$OUT/stalls.csv"
    rm -f "$OUT/stalls.ncu-rep"
    head -40 "$OUT/stalls.txt"
    ;;
  *)
    echo "usage: run_gluon_barriers.sh first|second" >&2
    exit 2
    ;;
esac
