#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LOWBIT_COMMIT=7af7b01 LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
mkdir -p $OUT/attn $OUT/prof
timeout 200 python3 -m lowbit.bench kernels --only attention --sweep --batches 64 2048 --contexts 4096 --out $OUT/attn --markdown > $OUT/attn/table.md 2>&1
echo "attn rc $?"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_paged_attention.py tests/test_kernels_w4a8.py tests/test_engine_kernels.py > $OUT/pytest.log 2>&1
echo "tests rc $?"; tail -5 $OUT/pytest.log
timeout 200 python3 -m lowbit.bench profile --arch llama3-8b --recipe w4a8kv4 --input-len 1024 --output-len 512 --num-prompts 2048 --time-limit-s 40 --trace-steps 1 --host-steps 2 > $OUT/prof/prof.txt 2>&1
echo "prof rc $?"; tail -12 $OUT/prof/prof.txt
grep -E "^\| (KV|SDPA|bf16)" $OUT/attn/table.md | head -40
