"""W8A8 GEMM (int8, fp8): reference vs float64, Triton (interpreted or CUDA) vs reference."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.w8a8 import W8A8Config, prepare_w8a8, w8a8_gemm, w8a8_gemm_triton  # noqa: E402
from lowbit.kernels.w8a8_tma import TmaConfig, tma_ok, w8a8_gemm_tma  # noqa: E402

DEV = testing.triton_device()
SHAPES = [(1, 40, 200), (3, 72, 320), (17, 48, 576)]
CONFIGS = [W8A8Config(True, 16, 64, block_k=64, split_k=2), W8A8Config(False, 32, 32, block_k=128, split_k=1),
           W8A8Config(False, 16, 64, block_k=64, split_k=3)]
# TMA needs K % 16 == 0 (16-byte rows); these K are not multiples of the tiles' block_k
TMA_SHAPES = [(1, 40, 192), (3, 72, 320), (17, 48, 576)]
TMA_CONFIGS = [TmaConfig(block_m=16, block_n=32, block_k=128), TmaConfig(block_m=32, block_n=64, block_k=64,
               persistent=True, split_store=False), TmaConfig(block_m=16, block_n=32, block_k=128,
               persistent=True, warp_specialize=True)]
FP8 = torch.float8_e4m3fn
BOUND = 5e-3  # fp32 (fp8) or exact int32 sums, fp32 scales, a bf16 output


def _case(m, n, k, dtype, g, device="cpu"):
    if dtype == torch.int8:
        x_q, wq = testing.randint(-127, 127, (m, k), g), testing.randint(-127, 127, (n, k), g)
    else:
        x_q = (testing.randn((m, k), g, torch.float32) * 100).clamp(-448, 448).to(FP8)
        wq = (testing.randn((n, k), g, torch.float32) * 100).clamp(-448, 448).to(FP8)
    x_s, w_s = testing.randscale(m, g), testing.randscale(n, g)
    want = (x_q.double() @ wq.double().t()) * x_s.double()[:, None] * w_s.double()[None, :]
    return x_q.to(device), x_s.to(device), prepare_w8a8(wq.to(device), w_s.to(device)), want


@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_float64(m, n, k, dtype):
    x_q, x_s, w, want = _case(m, n, k, dtype, testing.gen())
    assert testing.rel_err(reference.w8a8_gemm(x_q, x_s, w), want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("cfg", CONFIGS + [None], ids=lambda c: "default" if c is None else f"swap{int(c.swap)}-{c.block_m}x{c.block_n}s{c.split_k}")
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_matches_reference(m, n, k, dtype, cfg):
    if dtype == FP8 and DEV == "cpu":
        pytest.skip("Triton's interpreter has no fp8 loads")
    x_q, x_s, w, want = _case(m, n, k, dtype, testing.gen(), DEV)
    out = w8a8_gemm_triton(x_q, x_s, w, cfg)
    assert testing.rel_err(out, reference.w8a8_gemm(x_q, x_s, w)) < BOUND
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}p{int(c.persistent)}")
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,n,k", TMA_SHAPES)
def test_tma_kernel_matches_reference(m, n, k, dtype, cfg):
    x_q, x_s, w, want = _case(m, n, k, dtype, testing.gen(), DEV)
    assert tma_ok(x_q, w.qweight)
    out = w8a8_gemm_tma(x_q, x_s, w.qweight, w.scale, cfg)
    assert testing.rel_err(out, reference.w8a8_gemm(x_q, x_s, w)) < BOUND
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("n,k", [(48, 200), (44, 192)], ids=["k-unaligned", "n-unaligned"])
def test_tma_config_falls_back_where_tma_cannot_run(n, k):
    x_q, x_s, w, want = _case(5, n, k, torch.int8, testing.gen(), DEV)
    assert not tma_ok(x_q, w.qweight)
    assert testing.rel_err(w8a8_gemm_triton(x_q, x_s, w, TmaConfig(block_m=16, block_n=32, block_k=64)), want) < BOUND


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 64, 300, 700, 2048, 8192])  # every dispatch range of both dtypes
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_dispatch_cuda_model_shapes(m, dtype):
    x_q, x_s, w, want = _case(m, 1024, 4096, dtype, testing.gen(), "cuda")
    assert testing.rel_err(w8a8_gemm(x_q, x_s, w), want) < BOUND
