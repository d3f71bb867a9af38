#!/usr/bin/env bash
# Session 12, call 4 (run from the repository root; $1: the commit): the W4A4 kernel (unmasked whole groups, swap at
# M <= 16) beside the other GEMMs and cuBLAS at the 8B layer, then the Atom recipe end to end on it (random weights:
# QuaRot's layout, no outlier channels). One log ($OUT/log), the GEMMs' JSON, the e2e rows.
set -uo pipefail
export PYTHONUNBUFFERED=1
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 240 python3 -m lowbit.bench kernels --quick --only linear --ms 1 16 64 4096 \
  --markdown --out $OUT/lin >> $OUT/log 2>&1
tail -25 $OUT/log
RESULTS=$OUT/e2e COMMIT=$1 BUDGET_S=300 scripts/gpu-throughput llama3-8b:w4a4kv4:1024/512 --config-time-s 150 >> $OUT/log 2>&1
tail -6 $OUT/log
