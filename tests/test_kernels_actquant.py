"""Fused activation quantization: reference vs float64, Triton (interpreted or CUDA) vs reference."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import actquant, reference, testing  # noqa: E402

DEV = testing.triton_device()
FP8 = torch.float8_e4m3fn
ROWS = [1, 3, 17]
H = 576
QBOUND = {torch.int8: 2e-2, FP8: 6e-2}  # quantization error of y, relative
SILU_QBOUND = {torch.int8: 4e-2, FP8: 6e-2}  # SiLU(gate) * up is heavy-tailed: larger absmax / rms


def _dequant(q, scale):
    return q.double() * scale.double()[:, None]


def _norm64(x, weight, eps, residual=None):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _inputs(t, g, device="cpu"):
    x, res = testing.randn((t, H), g), testing.randn((t, H), g)
    weight = (1 + 0.1 * testing.randn(H, g, torch.float32)).to(torch.bfloat16)
    perm = torch.randperm(H, generator=g).to(torch.int32)
    return [v.to(device) for v in (x, res, weight, perm)]


def _same_codes(q, q_ref, scale, scale_ref, dtype):
    """Same codes up to a rounding tie broken differently (+-1, rare) and the same scales."""
    assert torch.allclose(scale.cpu(), scale_ref.cpu(), rtol=1e-5, atol=0)
    if dtype == FP8:
        assert testing.rel_err(_dequant(q, scale), _dequant(q_ref, scale_ref)) < 1e-2
        return
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("variant", ["plain", "residual", "perm", "residual+perm"])
@pytest.mark.parametrize("t", ROWS)
def test_rmsnorm_quant(t, variant, dtype):
    g = testing.gen()
    x, res, weight, perm = _inputs(t, g)
    res = res if "residual" in variant else None
    perm = perm if "perm" in variant else None
    out = reference.rmsnorm_quant(x, weight, 1e-6, res, perm, dtype)
    y = _norm64(x, weight, 1e-6, res)
    if perm is not None:
        y = y[:, perm.long()]
    assert testing.rel_err(_dequant(*out[:2]), y) < QBOUND[dtype]
    if res is not None:
        assert torch.equal(out[2], (x.float() + res.float()).to(x.dtype))
    if DEV is None or (dtype == FP8 and DEV == "cpu"):
        return  # the interpreter has no fp8 stores
    args = [v.to(DEV) if v is not None else None for v in (x, weight, res, perm)]
    got = actquant.rmsnorm_quant_triton(args[0], args[1], 1e-6, args[2], args[3], dtype)
    _same_codes(got[0], out[0], got[1], out[1], dtype)
    if res is not None:
        assert torch.equal(got[2].cpu(), out[2])


@pytest.mark.parametrize("config", [None, actquant.RowConfig(chunk=128), actquant.RowConfig(chunk=256, num_warps=2)],
                         ids=["one_pass", "chunks128", "chunks256"])
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("t", ROWS)
def test_silu_mul_quant(t, dtype, config):
    """One pass over the row, or two over chunks (576 = 4.5 x 128: a ragged last chunk)."""
    g = testing.gen()
    x = testing.randn((t, 2 * H), g)
    q, scale = reference.silu_mul_quant(x, dtype)
    gate, up = x.double().chunk(2, dim=-1)
    assert testing.rel_err(_dequant(q, scale), torch.nn.functional.silu(gate) * up) < SILU_QBOUND[dtype]
    if DEV is None or (dtype == FP8 and DEV == "cpu"):
        return
    got = actquant.silu_mul_quant_triton(x.to(DEV), dtype, config)
    _same_codes(got[0], q, got[1], scale, dtype)


@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("t", ROWS)
def test_quant_per_token(t, dtype):
    g = testing.gen()
    x = testing.randn((t, H), g)
    q, scale = reference.quant_per_token(x, dtype)
    assert testing.rel_err(_dequant(q, scale), x.double()) < QBOUND[dtype]
    if DEV is None or (dtype == FP8 and DEV == "cpu"):
        return
    got = actquant.quant_per_token_triton(x.to(DEV), dtype)
    _same_codes(got[0], q, got[1], scale, dtype)
