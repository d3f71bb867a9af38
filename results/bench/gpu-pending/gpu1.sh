#!/usr/bin/env bash
# Call 1 (run from the repository root; $1: the commit): CUDA tests of the KV-cache paths, then
# decode attention with the tile sweep (KV4's transposed kernel over a token-packed V).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. LOWBIT_TEST_TOKENIZER=$PWD/.gg/tokenizer LOWBIT_COMMIT=$1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_paged_attention.py tests/test_kernels_paged_prefill.py tests/test_kernels_kv_gather.py \
  tests/test_engine_kernels.py tests/test_kv_quant.py tests/test_engine.py tests/test_prefix_cache.py tests/test_kernels_w4a4.py \
  tests/test_kernel_path.py tests/test_kernels_actquant.py tests/test_kernels_elementwise.py tests/test_fused_projections.py tests/test_gpu_monitor.py > $OUT/pytest.log 2>&1
tail -5 $OUT/pytest.log
timeout 330 python3 -m lowbit.bench kernels --quick --only attention --sweep --batches 64 2048 --contexts 1024 4096 \
  --markdown --out $OUT/attn > $OUT/attn.md 2>&1
tail -45 $OUT/attn.md
