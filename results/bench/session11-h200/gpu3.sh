#!/usr/bin/env bash
# session 11 call 3: CUDA tests of the sampler, bench sampling, then e2e w4a8kv4 old (4c4eccc) / new on one machine
set -uo pipefail
export PYTHONUNBUFFERED=1 LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
C=$1
(PYTHONPATH=. timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_sampling.py tests/test_sampler.py tests/test_engine.py tests/test_async_scheduling.py tests/test_engine_kernels.py > $OUT/pytest.log 2>&1; tail -3 $OUT/pytest.log)
(PYTHONPATH=. LOWBIT_COMMIT=$C timeout 60 python3 -m lowbit.bench sampling --out $OUT/sampling > $OUT/sampling.md 2>&1; tail -8 $OUT/sampling.md)
(cd probe/old && RESULTS=$OUT/old COMMIT=4c4eccc BUDGET_S=135 scripts/gpu-throughput llama3-8b:w4a8kv4:1024/512 --config-time-s 125 2>&1 | grep -a "output tok/s")
RESULTS=$OUT/new COMMIT=$C BUDGET_S=135 scripts/gpu-throughput llama3-8b:w4a8kv4:1024/512 --config-time-s 125 2>&1 | grep -a "output tok/s"
python3 - <<'P'
import json,glob,os
for f in sorted(glob.glob(os.environ["OUT"]+"/*/*.json")):
    d=json.load(open(f)); print(f.split("/")[-2], d["recipe"], round(d["output_tokens_per_second"],1), d["num_requests"], d["capped"], round(d["elapsed_time"],1), d["setup_s"])
P
