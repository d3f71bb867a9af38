#!/usr/bin/env bash
# Call 5 (run from the repository root; $1: the commit): the Atom recipe end to end on the W4A4 kernel (random
# weights: QuaRot's layout, no outlier channels), Llama-3-8B shapes, 1024 in / 512 out. One log, the e2e rows.
set -uo pipefail
export PYTHONUNBUFFERED=1
RESULTS=$OUT/e2e COMMIT=$1 BUDGET_S=300 scripts/gpu-throughput llama3-8b:w4a4kv4:1024/512 --config-time-s 150 >> $OUT/log 2>&1
tail -6 $OUT/log
