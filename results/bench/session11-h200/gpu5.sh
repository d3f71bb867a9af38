#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
C=$1
for r in bf16:100 fp8:105; do
RESULTS=$OUT/new COMMIT=$C BUDGET_S=170 scripts/gpu-throughput llama3-8b:${r%%:*}:1024/512 --config-time-s ${r##*:} > $OUT/${r%%:*}.log 2>&1; tail -2 $OUT/${r%%:*}.log
done
