#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
C=$1
(cd probe/old && RESULTS=$OUT/old COMMIT=4c4eccc BUDGET_S=200 scripts/gpu-throughput llama3-8b:w4a8kv4:1024/512 --config-time-s 110 > $OUT/old.log 2>&1; tail -4 $OUT/old.log)
RESULTS=$OUT/new COMMIT=$C BUDGET_S=200 scripts/gpu-throughput llama3-8b:w4a8kv4:1024/512 --config-time-s 110 > $OUT/new.log 2>&1; tail -4 $OUT/new.log
ls $OUT/old $OUT/new
