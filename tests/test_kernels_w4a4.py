"""W4A4 + int8 outliers (Atom): reference vs float64, Triton (interpreted or CUDA) vs reference."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.common import TileConfig  # noqa: E402
from lowbit.kernels.w4a4 import prepare_w4a4, w4a4_gemm_triton  # noqa: E402
from lowbit.quant.formats import pack_int4  # noqa: E402

DEV = testing.triton_device()
# m, n, k4, k_out: a last group shorter than 128 (masked along K), or whole groups (EVEN_K: unmasked), with
# outliers or without (QuaRot's layout)
SHAPES = [(1, 40, 576, 128), (3, 72, 320, 64), (17, 48, 576, 128), (5, 40, 512, 0), (16, 64, 384, 32)]
CONFIGS = [TileConfig(block_m=16, block_n=64, split_k=2), TileConfig(block_m=32, block_n=32, split_k=1),
           TileConfig(swap=True, block_m=16, block_n=64, split_k=2), TileConfig(swap=True, block_m=16, block_n=32, split_k=1)]
BOUND = 5e-3  # exact int32 sums, fp32 rescaling, a bf16 output


def _case(m, n, k4, k_out, g, device="cpu"):
    ng = -(-k4 // 128)
    x4, w4 = testing.randint(-8, 7, (m, k4), g), testing.randint(-8, 7, (n, k4), g)
    xs4, ws4 = testing.randscale((m, ng), g), testing.randscale((n, ng), g)
    x8, w8 = testing.randint(-127, 127, (m, k_out), g), testing.randint(-127, 127, (n, k_out), g)
    xs8, ws8 = testing.randscale(m, g, 1e-3), testing.randscale(n, g, 1e-3)
    per_elem = lambda t: t.double().repeat_interleave(128, dim=1)[:, :k4]  # noqa: E731
    want = ((x4.double() * per_elem(xs4)) @ (w4.double() * per_elem(ws4)).t()
            + (x8.double() * xs8.double()[:, None]) @ (w8.double() * ws8.double()[:, None]).t())
    w = prepare_w4a4(pack_int4(w4).to(device), k4, ws4.to(device), w8.to(device), ws8.to(device))
    acts = [t.to(device) for t in (pack_int4(x4), xs4, x8, xs8)]
    return acts, w, want


@pytest.mark.parametrize("m,n,k4,k_out", SHAPES)
def test_reference_matches_float64(m, n, k4, k_out):
    acts, w, want = _case(m, n, k4, k_out, testing.gen())
    assert testing.rel_err(reference.w4a4_gemm(*acts, w), want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("cfg", CONFIGS + [None],
                         ids=lambda c: "default" if c is None else f"{'swap' * c.swap}{c.block_m}x{c.block_n}s{c.split_k}")
@pytest.mark.parametrize("m,n,k4,k_out", SHAPES)
def test_triton_matches_reference(m, n, k4, k_out, cfg):
    acts, w, want = _case(m, n, k4, k_out, testing.gen(), DEV)
    out = w4a4_gemm_triton(*acts, w, config=cfg)
    assert testing.rel_err(out, reference.w4a4_gemm(*acts, w)) < BOUND
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 64, 300])
def test_triton_cuda_model_shapes(m):
    acts, w, want = _case(m, 1024, 4096 - 128, 128, testing.gen(), "cuda")
    assert testing.rel_err(w4a4_gemm_triton(*acts, w), want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
def test_a_fused_weights_rows_read_their_strided_scales():
    """`W4A4Weight.rows`: a part of a fused weight (q/k/v) whose group scales are a column slice of the
    fused ones (strided rows), read by the kernel as the part itself."""
    g = testing.gen()
    acts, w_a, _ = _case(3, 48, 512, 64, g, DEV)
    _, w_b, _ = _case(3, 40, 512, 64, g, DEV)
    fused = type(w_a).cat([w_a, w_b])
    part = fused.rows(48, 88, w_b)
    assert not part.ws4.is_contiguous()
    out = w4a4_gemm_triton(*acts, part)
    assert torch.equal(out.cpu(), w4a4_gemm_triton(*acts, w_b).cpu())
