#!/usr/bin/env bash
# One command for the multi-GPU run (issue 7): one process per GPU via torch.distributed.run.
#   bench/multi_gpu.sh N [--device cpu] [--quick] [--no-bench] [--out FILE]
# NVLink multicast stays off (shared machines: see the device tool's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: bench/multi_gpu.sh NUM_PROCESSES [options]}
shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$N" bench/multi_gpu.py "$@"
