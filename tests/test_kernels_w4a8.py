"""W4A8 GEMM: reference vs float64, Triton (interpreted on the CPU, or on CUDA) vs reference."""
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.w4a8 import W4A8Config, default_config, prepare_w4a8, w4a8_gemm_triton  # noqa: E402
from lowbit.quant.formats import pack_int4  # noqa: E402

DEV = testing.triton_device()
SHAPES = [(1, 40, 576), (3, 72, 320), (17, 48, 576)]
CONFIGS = [W4A8Config(swap=True, scale_acc=True, block_m=16, block_n=64, split_k=2),
           W4A8Config(swap=True, scale_acc=False, block_m=16, block_n=64, split_k=3),
           W4A8Config(swap=False, scale_acc=False, block_m=32, block_n=32, split_k=1),
           W4A8Config(swap=False, scale_acc=True, block_m=16, block_n=64, split_k=2),
           W4A8Config(widen=True),
           W4A8Config(swap=True, scale_acc=True, block_m=16, block_n=32, split_k=2, tma=True),
           W4A8Config(swap=False, scale_acc=False, block_m=16, block_n=32, split_k=1, tma=True)]
BOUND = 5e-3  # exact int32 sums, one fp32 epilogue, a bf16 output


def _case(m, n, k, grouped, g, device="cpu"):
    """Canonical tensors, the prepared weight and the float64 answer computed from the former."""
    x_q = testing.randint(-127, 127, (m, k), g)
    x_s = testing.randscale(m, g)
    if grouped:
        q4, s1, s2, z2 = testing.progressive_weight(n, k, g)
        per_elem = lambda t: t.double().repeat_interleave(128, dim=1)[:, :k]  # noqa: E731
        q8 = (q4.double() - per_elem(z2)) * per_elem(s2)
        w = prepare_w4a8(pack_int4(q4), k, s1, s2, z2)
    else:
        q4 = testing.randint(-8, 7, (n, k), g)
        s1 = testing.randscale(n, g)
        q8 = q4.double()
        w = prepare_w4a8(pack_int4(q4), k, s1)
    want = (x_q.double() @ q8.t()) * x_s.double()[:, None] * s1.double()[None, :]
    if device != "cpu":
        w = type(w)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in vars(w).values()))
    return x_q.to(device), x_s.to(device), w, want


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_float64(m, n, k, grouped):
    x_q, x_s, w, want = _case(m, n, k, grouped, testing.gen())
    out = reference.w4a8_gemm(x_q, x_s, w)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("cfg", CONFIGS + [None], ids=lambda c: "default" if c is None else
                         "widen" if c.widen else f"swap{int(c.swap)}acc{int(c.scale_acc)}-{c.block_m}x{c.block_n}s{c.split_k}"
                         + ("-tma" if c.tma else ""))
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_matches_reference(m, n, k, grouped, cfg):
    x_q, x_s, w, want = _case(m, n, k, grouped, testing.gen(), DEV)
    ref = reference.w4a8_gemm(x_q, x_s, w)
    for _ in range(2):  # the second call reuses the split-K counters the first one left at zero
        out = w4a8_gemm_triton(x_q, x_s, w, cfg)
        assert testing.rel_err(out, ref) < BOUND
    assert testing.rel_err(out, want) < BOUND


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
# the defaults, and at M <= 64 (above it the weight is widened) their tiles loaded through descriptors,
# the other place for the group scale (on the weights, or on the partial sums)
@pytest.mark.parametrize("m,change", [(m, "") for m in (1, 16, 64, 300, 2048)]
                         + [(m, c) for m in (1, 16, 64) for c in ("tma", "scale_acc")])
@pytest.mark.parametrize("grouped", [True, False])
def test_triton_cuda_model_shapes(m, change, grouped):
    cfg = default_config(m)
    if change:
        cfg = dataclasses.replace(cfg, **{change: not getattr(cfg, change)})
    x_q, x_s, w, want = _case(m, 1024, 4096, grouped, testing.gen(), "cuda")
    out = w4a8_gemm_triton(x_q, x_s, w, cfg)
    assert testing.rel_err(out, want) < BOUND
