#!/usr/bin/env bash
# Call 3 (run from the repository root; $1: the commit): the tree before token-packed V (probe/old,
# a `git archive` of c335dc3) beside this one on the same machine, decode attention at the target's shapes;
# prefill attention (the paged kernel against the gathered rows + varlen flash path of chunks); Nsight
# Compute counters of the new KV4 decode kernel; session 11's untimed actquant sweep. One log ($OUT/log) and
# each part's JSON: 8 files back of the 8 a call may return.
set -uo pipefail
export PYTHONUNBUFFERED=1
(cd probe/old && PYTHONPATH=. LOWBIT_COMMIT=c335dc3 timeout 120 python3 -m lowbit.bench kernels --quick --only attention \
  --batches 64 2048 --contexts 1024 4096 --markdown --out $OUT/old >> $OUT/log 2>&1; tail -9 $OUT/log)
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 120 python3 -m lowbit.bench kernels --quick --only attention \
  --batches 64 2048 --contexts 1024 4096 --markdown --out $OUT/new >> $OUT/log 2>&1; tail -12 $OUT/log
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 100 python3 -m lowbit.bench kernels --quick --only prefill --markdown \
  --out $OUT/prefill >> $OUT/log 2>&1; tail -8 $OUT/log
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 150 python3 -m lowbit.bench ncu decode-kv4:64:4096 decode-kv4:2048:1024 --out $OUT/ncu \
  >> $OUT/log 2>&1; tail -6 $OUT/log
# the fused activation quantizers before (probe/old: a division per element) and after (b2f46fc: a multiply),
# then session 11's untimed RowConfigs of silu_mul_quant, to choose its default
(cd probe/old && PYTHONPATH=. LOWBIT_COMMIT=c335dc3 timeout 60 python3 -m lowbit.bench actquant --out $OUT/actquant-old \
  >> $OUT/log 2>&1; tail -12 $OUT/log)
PYTHONPATH=. LOWBIT_COMMIT=$1 timeout 90 python3 -m lowbit.bench actquant --sweep --out $OUT/actquant >> $OUT/log 2>&1
tail -20 $OUT/log
