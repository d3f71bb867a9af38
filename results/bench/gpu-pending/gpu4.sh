#!/usr/bin/env bash
# Call 4 (run from the repository root; $1: the commit): the profile's clocks per step kind, then the W4A4 kernel
# (unmasked whole groups, swap at M <= 16) beside the other GEMMs and cuBLAS at the 8B layer. Two profiles, one log
# ($OUT/log), the GEMMs' JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1
# first: where a 16k-token mixed step's 341 ms against its traced 242 ms of kernels go (session 11): the
# GPU's clocks, power and clock-event reasons per step kind (gpu_monitor), w4a8kv4 then bf16
for r in w4a8kv4 bf16; do
  PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 150 python3 -m lowbit.bench profile --arch llama3-8b --recipe $r --input-len 1024 \
    --output-len 512 --num-prompts 2048 --time-limit-s 35 --trace-steps 1 --host-steps 2 > $OUT/prof-$r.txt 2>&1
  grep -A8 "clocks and power" $OUT/prof-$r.txt
done
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 240 python3 -m lowbit.bench kernels --quick --only linear --ms 1 16 64 4096 \
  --markdown --out $OUT/lin >> $OUT/log 2>&1
tail -25 $OUT/log
