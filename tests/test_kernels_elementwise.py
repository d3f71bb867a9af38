"""RMSNorm and rotary embedding kernels: the references against float64, the Triton kernels
(interpreted on the CPU, or CUDA) against the references in bf16, where they round as HF does."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import elementwise, reference, testing  # noqa: E402
from lowbit.layers.rotary import rope_inv_freq  # noqa: E402

DEV = testing.triton_device()
BF16_ULP = 2 ** -7  # relative spacing of bf16 values


def _mostly_equal(got, want, scale=None):
    """Bit-equal but for rare one-ulp differences (a sum or a cosine rounded the other way); an ulp
    of `scale` where the result comes from a cancelling sum (default: of the result itself)."""
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs() if scale is None else scale.float().cpu()
    diff = (got - want).abs()
    excess = diff - BF16_ULP * scale - 1e-6
    assert (excess <= 0).all(), f"off by more than an ulp at {(excess > 0).sum().item()} of {diff.numel()}: " \
                                f"max {diff.max().item():.3g}"
    assert (diff > 0).float().mean() < 0.01, f"{(diff > 0).float().mean().item():.2%} not bit-equal"


@pytest.mark.parametrize("t,h", [(1, 576), (3, 64), (17, 4096)])
def test_rmsnorm_reference_against_float64(t, h):
    g = testing.gen()
    x = testing.randn((t, h), g) * 3
    w = 1 + 0.1 * testing.randn((h,), g, torch.float32)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert testing.rel_err(reference.rmsnorm(x.float(), w, 1e-6), want) < 1e-6
    assert testing.rel_err(reference.rmsnorm(x, w.to(torch.bfloat16), 1e-6), want) < 2 * BF16_ULP


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("t,h", [(1, 576), (3, 64), (17, 4096)])
def test_rmsnorm_kernel_matches_the_reference(t, h):
    g = testing.gen()
    x = (testing.randn((t, h), g) * 3).to(DEV)
    w = (1 + 0.1 * testing.randn((h,), g, torch.float32)).to(torch.bfloat16).to(DEV)
    got = elementwise.rmsnorm_triton(x, w, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    want = reference.rmsnorm(x.cpu(), w.cpu(), 1e-5)
    # the normalized value is rounded before the weight multiply (as HF does): a last-bit difference
    # in rstd flips that rounding now and then, an ulp of it (up to 2^-7 |want|), plus the product's
    # own half ulp
    _mostly_equal(got, want, 1.5 * want.abs())


def _qk(t, hq, hk, d, g, device="cpu"):
    """q and k as the strided views of one fused q/k/v output that the model hands over."""
    qkv = testing.randn((t, (hq + 2 * hk) * d), g).to(device)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
    return qkv, q.view(t, hq, d), k.view(t, hk, d)


@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (4, 2, 128)])
def test_rotary_reference_against_float64(hq, hk, d):
    g = testing.gen()
    _, q, k = _qk(5, hq, hk, d, g)
    q, k = q.float(), k.float()
    positions = torch.randint(0, 8192, (5,), generator=g)
    inv = rope_inv_freq(d, 500000.0, None)
    ang = (positions.float()[:, None] * inv[None, :]).double()  # HF's fp32 angle (at 8k: 1e-3 off)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    for x, got in zip((q, k), reference.rotary(positions, q, k, inv)):
        x1, x2 = x.double().chunk(2, -1)
        want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        assert testing.rel_err(got, want) < 1e-6


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("t,hq,hk,d", [(1, 9, 3, 64), (17, 32, 8, 128), (3, 4, 4, 32)])
def test_rotary_kernel_matches_the_reference_in_place(t, hq, hk, d):
    g = testing.gen()
    qkv, q, k = _qk(t, hq, hk, d, g, DEV)
    v_before = qkv[:, (hq + hk) * d:].clone()
    positions = torch.randint(0, 8192, (t,), generator=g).to(DEV)
    inv = rope_inv_freq(d, 500000.0, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)).to(DEV)
    q_in, k_in = q.cpu().clone(), k.cpu().clone()
    want = reference.rotary(positions.cpu(), q_in, k_in, inv.cpu())
    got = elementwise.rotary_triton(positions, q, k, inv)
    assert got[0] is q and got[1] is k  # rotated in place, in the fused buffer
    for a, b, x in zip(got, want, (q_in, k_in)):
        # o = x cos -/+ x' sin: a cosine one ulp off moves o by an ulp of |x| + |x'|, not of o
        _mostly_equal(a, b, x.abs() + torch.cat(x.chunk(2, -1)[::-1], -1).abs())
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)  # v untouched


def test_dispatch_keeps_fp32_and_the_cpu_on_the_reference():
    g = testing.gen()
    x = testing.randn((3, 64), g).float()
    w = torch.ones(64)
    assert torch.equal(elementwise.rmsnorm(x, w, 1e-6), reference.rmsnorm(x, w, 1e-6))
    _, q, k = _qk(2, 4, 2, 32, g)
    positions, inv = torch.arange(2), rope_inv_freq(32, 10000.0, None)
    got = elementwise.rotary(positions, q, k, inv)
    assert got[0] is not q  # the reference returns new tensors
    for a, b in zip(got, reference.rotary(positions, q, k, inv)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("t,i", [(1, 1536), (3, 64), (17, 3000)])
def test_silu_mul_reference_against_float64(t, i):
    g = testing.gen()
    x = testing.randn((t, 2 * i), g).float() * 3
    gate, up = x.double().chunk(2, -1)
    assert testing.rel_err(reference.silu_mul(x), gate / (1 + torch.exp(-gate)) * up) < 1e-6


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("t,i", [(1, 1536), (3, 64), (17, 3000)])
def test_silu_mul_kernel_matches_the_reference(t, i):
    g = testing.gen()
    x = (testing.randn((t, 2 * i), g) * 3).to(DEV)
    got = elementwise.silu_mul_triton(x)
    assert got.shape == (t, i) and got.dtype == torch.bfloat16
    _mostly_equal(got, reference.silu_mul(x.cpu()))
