#!/usr/bin/env bash
# session 9 call 1: CUDA tests of changed kernels, decode sweep, W4A8 small-M sweep
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LOWBIT_COMMIT=${COMMIT}
export LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
mkdir -p $OUT/att $OUT/lin
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_paged_attention.py tests/test_kernels_paged_prefill.py tests/test_kernel_path.py 2>&1 | tail -6 > $OUT/pytest.log
cat $OUT/pytest.log
timeout 240 python3 -m lowbit.bench kernels --quick --only attention --batches 64 2048 --contexts 1024 4096 --sweep --markdown --out $OUT/att > $OUT/att/table.md 2>&1
timeout 190 python3 -m lowbit.bench kernels --quick --only linear --ms 1 16 64 --sweep --markdown --out $OUT/lin > $OUT/lin/table.md 2>&1
python3 - <<'P'
import json,os
for part in ("att","lin"):
    try: rows=json.load(open(os.environ["OUT"]+f"/{part}/kernels.json"))
    except Exception as e: print(part, "no json", e); continue
    for k,v in (rows.items() if isinstance(rows,dict) else [("rows",rows)]):
        if not isinstance(v,list): continue
        for r in v:
            if isinstance(r,dict) and "method" in r and "us" in r:
                print(f'{k[:4]} {r.get("batch",r.get("m","")):>5} {r.get("ctx",r.get("shape","")):>6} {r["us"]:9.1f} {r.get("roof_pct",0):5.1f} {r["method"]}')
P
tail -3 $OUT/att/table.md $OUT/lin/table.md
