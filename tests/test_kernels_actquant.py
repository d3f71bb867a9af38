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


@pytest.mark.parametrize("k_out", [0, 64], ids=["no-outliers", "outliers"])
@pytest.mark.parametrize("perm", [False, True], ids=["", "perm"])
@pytest.mark.parametrize("t", ROWS)
def test_group_quant(t, perm, k_out):
    """W4A4's inputs: per group of 128 (the last one short when k4 = 576), `s = absmax * 0.9 / 7` and
    `q = clamp(round(y / s), -8, 7)` packed two a byte; the outliers `absmax / 127` per token. The
    Triton kernel gives the same codes (a tie broken the other way, rarely) and scales."""
    from lowbit.quant.formats import unpack_int4
    g = testing.gen()
    x, _, _, p = _inputs(t, g)
    p = p if perm else None
    k4 = H - k_out
    x4, xs4, x8, xs8 = reference.group_quant(x, p, k4, 0.9, k_out)
    y = x.double()[:, p.long()] if p is not None else x.double()
    for gi in range(xs4.shape[1]):
        cols = slice(gi * 128, min(k4, gi * 128 + 128))
        s = y[:, cols].abs().amax(1) * 0.9 / 7
        assert torch.allclose(xs4[:, gi].double(), s, rtol=1e-6)
        want = torch.clamp(torch.round(y[:, cols].float() / xs4[:, gi, None]), -8, 7)  # in fp32, as the contract
        assert torch.equal(unpack_int4(x4, k4, signed=True)[:, cols].float(), want)
    if k_out:
        assert torch.allclose(xs8.double(), y[:, k4:].abs().amax(1) / 127, rtol=1e-6)
        assert testing.rel_err(x8.double() * xs8.double()[:, None], y[:, k4:]) < QBOUND[torch.int8]
    else:
        assert x8.shape == (t, 0) and torch.equal(xs8, torch.ones(t))
    if DEV is None:
        return
    got = actquant.group_quant_triton(x.to(DEV), None if p is None else p.to(DEV), k4, 0.9, k_out)
    assert torch.equal(got[1].cpu(), xs4) and torch.equal(got[3].cpu(), xs8)
    diff = (unpack_int4(got[0].cpu(), k4, signed=True).int() - unpack_int4(x4, k4, signed=True).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    if k_out:
        d8 = (got[2].cpu().int() - x8.int()).abs()
        assert d8.max() <= 1 and (d8 > 0).float().mean() < 0.01
