#!/usr/bin/env bash
# Session 12, call 3 (run from the repository root; $1: the commit): the tree before token-packed V (probe/old,
# a `git archive` of c335dc3) beside this one on the same machine, decode attention at the target's shapes;
# then Nsight Compute counters of the new KV4 decode kernel.
set -uo pipefail
export PYTHONUNBUFFERED=1
(cd probe/old && PYTHONPATH=. LOWBIT_COMMIT=c335dc3 timeout 150 python3 -m lowbit.bench kernels --quick --only attention \
  --batches 64 2048 --contexts 1024 4096 --markdown --out $OUT/old > $OUT/old.md 2>&1; tail -9 $OUT/old.md)
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 150 python3 -m lowbit.bench kernels --quick --only attention \
  --batches 64 2048 --contexts 1024 4096 --markdown --out $OUT/new > $OUT/new.md 2>&1; tail -12 $OUT/new.md
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 200 python3 -m lowbit.bench ncu decode-kv4:64:4096 decode-kv4:2048:1024 --out $OUT/ncu \
  > $OUT/ncu.md 2>&1; tail -6 $OUT/ncu.md
# session 11's untimed RowConfigs of the fused activation quantizers, to choose silu_mul_quant's default
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 150 python3 -m lowbit.bench actquant --sweep --out $OUT/actquant > $OUT/actquant.md 2>&1
tail -20 $OUT/actquant.md
