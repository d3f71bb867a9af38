#!/usr/bin/env bash
# Call 2 (run from the repository root; $1: the commit): end-to-end throughput, Llama-3-8B shapes,
# 1024 in / 512 out, w4a8kv4 (KV4 decode on the transposed kernel) then bf16 on the same machine.
set -uo pipefail
export PYTHONUNBUFFERED=1
for r in w4a8kv4:110 bf16:100; do
  RESULTS=$OUT/e2e COMMIT=$1 BUDGET_S=230 scripts/gpu-throughput llama3-8b:${r%%:*}:1024/512 --config-time-s ${r##*:} \
    > $OUT/${r%%:*}.log 2>&1
  tail -3 $OUT/${r%%:*}.log
done
python3 -m lowbit.bench e2e --from-json $OUT/e2e 2>/dev/null | tail -8
