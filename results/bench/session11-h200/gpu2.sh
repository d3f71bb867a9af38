#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LOWBIT_COMMIT=4c4eccc
mkdir -p $OUT/prof $OUT/ncu
timeout 100 python3 -m lowbit.bench ncu decode-kv4:64:4096 decode-kv8:64:4096 --out $OUT/ncu > $OUT/ncu/ncu.txt 2>&1
echo "ncu rc $?"; tail -5 $OUT/ncu/ncu.txt
for r in w4a8kv4 bf16; do
timeout 210 python3 -m lowbit.bench profile --arch llama3-8b --recipe $r --input-len 1024 --output-len 512 --num-prompts 2048 --time-limit-s 35 --trace-steps 1 --host-steps 2 > $OUT/prof/prof-$r.txt 2>&1
echo "prof $r rc $?"; grep -A6 "mean ms per step" $OUT/prof/prof-$r.txt
done
