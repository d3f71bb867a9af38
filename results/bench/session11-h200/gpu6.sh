#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
(cd probe/old && RESULTS=$OUT/old COMMIT=4c4eccc BUDGET_S=170 scripts/gpu-throughput llama3-8b:bf16:1024/512 --config-time-s 100 > $OUT/old-bf16.log 2>&1; tail -2 $OUT/old-bf16.log)
