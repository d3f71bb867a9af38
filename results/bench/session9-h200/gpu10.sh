#!/usr/bin/env bash
# session 9 call 4: CUDA tests of the new defaults, decode sweep (96-register KV4), small-M linear defaults
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LOWBIT_COMMIT=${COMMIT}
export LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
mkdir -p $OUT/att $OUT/lin
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_w4a8.py tests/test_kernels_w4a16.py tests/test_kernels_paged_attention.py 2>&1 | tail -3 > $OUT/pytest.log
cat $OUT/pytest.log
timeout 130 python3 -m lowbit.bench kernels --quick --only attention --batches 64 2048 --contexts 1024 4096 --sweep --markdown --out $OUT/att > $OUT/att/table.md 2>&1
timeout 60 python3 -m lowbit.bench kernels --quick --only linear --ms 1 16 64 --markdown --out $OUT/lin > $OUT/lin/table.md 2>&1
python3 - <<'P'
import json,os
for part in ("att","lin"):
    try: d=json.load(open(os.environ["OUT"]+f"/{part}/kernels.json"))
    except Exception as e: print(part, "no json", e); continue
    for r in d.get("attention", []) + d.get("linear", []):
        meth=r["method"]
        if "KV8" in meth and "[" in meth: continue
        key=f'{r["batch"]}x{r["ctx"]}' if "batch" in r else str(r["m"])
        print(f'{key:>9} {r["us"]:8.1f} {r.get("roof_pct",0):5.1f} {meth.replace(" num_warps=4","").replace(" block_n=128","")[:90]}')
P
