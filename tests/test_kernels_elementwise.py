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


def _with_residual(t, h, g, device="cpu"):
    """x, a residual that is a strided view (a wider buffer's columns), a bf16 weight, and what the
    residual add must give: the fp32 sum rounded to bf16, as torch's bf16 add rounds it."""
    x = testing.randn((t, h), g) * 2
    r = (testing.randn((t, h + 64), g) * 3)[:, :h]
    w = (1 + 0.1 * testing.randn((h,), g, torch.float32)).to(torch.bfloat16)
    return x.to(device), r.to(device), w.to(device), (x.float() + r.float()).to(torch.bfloat16)


def _norm64(h, w, eps):
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("t", [1, 3, 17])
def test_rmsnorm_reference_adds_the_residual(t):
    g = testing.gen()
    x, r, w, h = _with_residual(t, 576, g)
    out, new_r = reference.rmsnorm(x, w, 1e-6, r)
    assert torch.equal(new_r, h) and new_r.dtype == torch.bfloat16
    assert torch.equal(out, reference.rmsnorm(h, w, 1e-6))  # the norm of the sum, as HF computes it
    assert testing.rel_err(out, _norm64(h, w, 1e-6)) < 2 * BF16_ULP
    assert torch.equal(elementwise.rmsnorm(x, w, 1e-6, r)[1], h)  # the dispatch passes it on (the CPU: the reference)


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("t", [1, 3, 17])
def test_rmsnorm_kernel_adds_the_residual(t):
    g = testing.gen()
    x, r, w, h = _with_residual(t, 576, g, DEV)  # 576: not a power of 2, a masked block
    r_before = r.clone()
    out, new_r = elementwise.rmsnorm_triton(x, w, 1e-5, r)
    assert new_r.dtype == torch.bfloat16 and new_r.shape == out.shape == x.shape
    assert torch.equal(new_r.cpu(), h)  # written out, rounded as torch's add
    assert torch.equal(r, r_before)  # the old residual is left alone
    want, want_r = reference.rmsnorm(x.cpu(), w.cpu(), 1e-5, r.cpu())
    assert torch.equal(want_r, h)
    _mostly_equal(out, want, 1.5 * want.abs())  # as test_rmsnorm_kernel_matches_the_reference
    assert testing.rel_err(out, _norm64(h, w.cpu(), 1e-5)) < 2 * BF16_ULP
    plain = elementwise.rmsnorm_triton(x, w, 1e-5)  # without one: the norm of x alone
    assert testing.rel_err(plain, _norm64(x.cpu(), w.cpu(), 1e-5)) < 2 * BF16_ULP


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
