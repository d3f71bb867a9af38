"""W4A16 GEMM: reference vs float64, Triton (interpreted or CUDA) vs reference."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.common import TileConfig  # noqa: E402
from lowbit.kernels.w4a16 import DEQUANT_MIN_M, prepare_w4a16, w4a16_dequantize, w4a16_gemm, w4a16_gemm_triton  # noqa: E402
from lowbit.quant.formats import pack_int4  # noqa: E402

DEV = testing.triton_device()
SHAPES = [(1, 40, 576), (3, 72, 320), (17, 48, 576)]
FORMATS = ["sym128", "asym64", "sym-channel"]
CONFIGS = [TileConfig(swap=True, block_m=16, block_n=64, split_k=2), TileConfig(block_m=32, block_n=32, split_k=1)]
BOUND = 1e-2  # bf16 operands


def _case(m, n, k, fmt, g, device="cpu"):
    group = {"sym128": 128, "asym64": 64, "sym-channel": None}[fmt]
    ng = 1 if group is None else -(-k // group)
    scales = testing.randscale((n, ng), g)
    if fmt == "asym64":
        codes, zeros = testing.randint(0, 15, (n, k), g, torch.uint8), testing.randint(0, 15, (n, ng), g, torch.uint8)
    else:
        codes, zeros = testing.randint(-8, 7, (n, k), g), None
    per_elem = lambda t: t.double().repeat_interleave(group or k, dim=1)[:, :k]  # noqa: E731
    w64 = (codes.double() - (0 if zeros is None else per_elem(zeros))) * per_elem(scales)
    x = testing.randn((m, k), g)
    want = x.double() @ w64.t()
    w = prepare_w4a16(pack_int4(codes), k, scales, zeros, group)
    w = type(w)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in vars(w).values()))
    return x.to(device), w, want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_float64(m, n, k, fmt):
    x, w, want = _case(m, n, k, fmt, testing.gen())
    assert testing.rel_err(reference.w4a16_gemm(x, w), want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("cfg", CONFIGS + [None], ids=lambda c: "default" if c is None else f"swap{int(c.swap)}-{c.block_m}x{c.block_n}s{c.split_k}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_matches_reference(m, n, k, fmt, cfg):
    x, w, want = _case(m, n, k, fmt, testing.gen(), DEV)
    out = w4a16_gemm_triton(x, w, cfg)
    assert testing.rel_err(out, reference.w4a16_gemm(x, w)) < BOUND
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_triton_cuda_model_shapes(m):
    x, w, want = _case(m, 1024, 4096, "sym128", testing.gen(), "cuda")
    assert testing.rel_err(w4a16_gemm_triton(x, w), want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(40, 576), (72, 320)])
def test_dequantize_is_the_weight_exactly(n, k, fmt):
    """The large-M path's bf16 copy of the weight: (q - z) * s of every element, rounded once."""
    _, w, _ = _case(1, n, k, fmt, testing.gen(), DEV)
    got = w4a16_dequantize(w)
    assert got.dtype == torch.bfloat16 and got.shape[1] >= k
    cpu = type(w)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in vars(w).values()))
    assert torch.equal(got[:, :k].cpu(), reference.w4a16_weight(cpu).to(torch.bfloat16))


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_large_m_goes_through_the_dequantized_weight():
    x, w, want = _case(DEQUANT_MIN_M + 3, 256, 576, "asym64", testing.gen(), "cuda")
    assert testing.rel_err(w4a16_gemm(x, w), want) < BOUND
