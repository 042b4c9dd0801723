#!/usr/bin/env bash
# The GPU checks of the big-model issue, in minutes on one GPU: fp16/bf16 edits with every algorithm, statistics
# with multiplier 10, a batch of 256 EMMET/MEMIT edits, then the speed benchmark on the GPU. Prints tables.
#   bash scripts/gpu_check.sh [DEVICE]      (default cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
export KE_NO_DOWNLOAD=1
python scripts/gpu_check.py --device "$DEVICE"
python scripts/benchmark.py --device "$DEVICE" --only prefix,eval,e2e --threads 4
