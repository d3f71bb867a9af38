#!/usr/bin/env bash
# session 9 call 2: CUDA attention tests of the new defaults, then e2e fp8 old/new, w4a8kv4, bf16 on one machine
set -uo pipefail
export PYTHONUNBUFFERED=1 LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
C=$1
(PYTHONPATH=. timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_paged_attention.py 2>&1 | tail -3)
(cd probe/old4 && RESULTS=$OUT/old COMMIT=4dd41a4 BUDGET_S=115 scripts/gpu-throughput llama3-8b:fp8:1024/512 --config-time-s 105 2>&1 | grep -a "output tok/s")
RESULTS=$OUT/new COMMIT=$C BUDGET_S=115 scripts/gpu-throughput llama3-8b:fp8:1024/512 --config-time-s 105 2>&1 | grep -a "output tok/s"
RESULTS=$OUT/new COMMIT=$C BUDGET_S=160 scripts/gpu-throughput llama3-8b:w4a8kv4:1024/512 --config-time-s 150 2>&1 | grep -a "output tok/s"
RESULTS=$OUT/new COMMIT=$C BUDGET_S=110 scripts/gpu-throughput llama3-8b:bf16:1024/512 --config-time-s 100 2>&1 | grep -a "output tok/s"
python3 - <<'P'
import json,glob,os
for f in sorted(glob.glob(os.environ["OUT"]+"/*/*.json")):
    d=json.load(open(f)); print(f.split("/")[-2], d["recipe"], round(d["output_tokens_per_second"],1), d["num_requests"], d["capped"], round(d["elapsed_time"],1), d["setup_s"])
P
