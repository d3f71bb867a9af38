#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
RESULTS=$OUT/new COMMIT=ba02a30 BUDGET_S=160 scripts/gpu-throughput llama3-8b:bf16:1024/512 --config-time-s 100 > $OUT/new-bf16.log 2>&1; tail -2 $OUT/new-bf16.log
