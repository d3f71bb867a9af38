#!/usr/bin/env bash
# session 9 call 3: CUDA tests of the 4-byte group words, small-M linear sweep, large-M defaults, ncu
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LOWBIT_COMMIT=${COMMIT}
export LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer
mkdir -p $OUT/lin $OUT/big $OUT/ncu
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_w4a8.py tests/test_kernels_w4a16.py tests/test_kernel_path.py tests/test_fused_projections.py 2>&1 | tail -5 > $OUT/pytest.log
cat $OUT/pytest.log
timeout 210 python3 -m lowbit.bench kernels --quick --only linear --ms 1 16 64 --sweep --markdown --out $OUT/lin > $OUT/lin/table.md 2>&1
timeout 70 python3 -m lowbit.bench kernels --quick --only linear --ms 1024 4096 --markdown --out $OUT/big > $OUT/big/table.md 2>&1
timeout 110 python3 -m lowbit.bench ncu w4a8:1 w4a8:64 w4a16:64 --out $OUT/ncu > $OUT/ncu/table.md 2>&1
python3 - <<'P'
import json,os
for part in ("lin","big"):
    try: d=json.load(open(os.environ["OUT"]+f"/{part}/kernels.json"))
    except Exception as e: print(part, "no json", e); continue
    for r in d.get("linear", []):
        meth=r["method"]
        if "[" in meth and not meth.startswith(("W4A8 g128","W4A16")): continue
        print(f'{r["m"]:5d} {r["us"]:8.1f} {r.get("roof_pct",0):5.1f} {meth.replace("W4A8 g128 [","[").replace("group_m=8 ","").replace("widen=False ","")[:120]}')
P
grep -a "|" $OUT/ncu/table.md | tail -5
