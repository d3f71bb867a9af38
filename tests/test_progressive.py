import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import QTensor, QuantSpec, dequantize, expand_qparams, fake_quantize, unpack_int4
from lowbit.quant.progressive import dequantize_progressive, quantize_progressive, widen_progressive


@pytest.fixture(autouse=True)
def fresh_seed():
    print("seed", torch.seed())


def heavy_tailed(n, k):
    return torch.randn(n, k) * torch.randn(n, k).exp()


def test_by_hand():
    c = torch.zeros(2, 32)
    c[0, :4] = torch.tensor([119.0, -119, 0, 16])
    c[0, 16:18] = torch.tensor([-100.0, 50])
    c[1, 0] = 119
    c[1, 16:20] = torch.tensor([5.0, -3, 1, 2])
    pw = quantize_progressive(c / 64, group_size=16)
    assert torch.allclose(pw.s1, torch.full((2,), 1 / 64))
    # s2 = round(range / 15) >= 1, z2 = round(-min / s2): 238/15 -> 16, 150/15 -> 10, 119/15 -> 8, 8/15 -> 1
    assert pw.s2.dtype == torch.uint8 and pw.s2.tolist() == [[16, 10], [8, 1]]
    assert pw.z2.dtype == torch.uint8 and pw.z2.tolist() == [[7, 10], [0, 3]]
    assert unpack_int4(pw.codes4, 32, signed=False)[:, [0, 1, 2, 3, 4, 16, 17, 18, 19]].tolist() == [
        [14, 0, 7, 8, 7, 0, 15, 10, 10],
        [15, 0, 0, 0, 0, 8, 0, 4, 5],
    ]
    want = c.clone()
    want[0, :2] = torch.tensor([112.0, -112])
    want[1, 0] = 120
    assert torch.equal(widen_progressive(pw), want.to(torch.int8))


@pytest.mark.parametrize("shape,group_size", [((64, 576), 128), ((32, 203), 64), ((16, 256), 16)])
def test_widening_is_exact_integer_arithmetic_in_int8(shape, group_size):
    w = heavy_tailed(*shape)
    w[3] = 0
    pw = quantize_progressive(w, group_size)
    k = shape[1]
    assert pw.codes4.shape == (shape[0], (k + 1) // 2) and pw.s1.shape == (shape[0],)
    assert pw.s2.shape == pw.z2.shape == (shape[0], -(-k // group_size))
    assert 1 <= pw.s2.min() and pw.s2.max() <= 16 and pw.z2.max() <= 15
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=group_size)
    q4 = unpack_int4(pw.codes4, k, signed=False).int()
    wide = (q4 - expand_qparams(pw.z2, spec, k).int()) * expand_qparams(pw.s2, spec, k).int()
    assert -128 <= wide.min() and wide.max() <= 127
    assert torch.equal(widen_progressive(pw), wide.to(torch.int8))
    level2 = dequantize(QTensor(pw.codes4, pw.s2.float(), pw.z2, spec, tuple(w.shape)))
    assert torch.equal(level2, wide.float())
    assert torch.equal(dequantize_progressive(pw), wide.float() * pw.s1[:, None])
    assert not dequantize_progressive(pw)[3].any()


def test_error_comparable_to_plain_int4_groups():
    w = torch.randn(256, 1024)
    plain = fake_quantize(w, QuantSpec(bits=4, symmetric=False, granularity="group"))
    ratio = ((dequantize_progressive(quantize_progressive(w)) - w) ** 2).mean() / ((plain - w) ** 2).mean()
    assert 0.95 < ratio < 1.1, f"progressive / plain uint4 g128 MSE: {ratio:.3f}, measured about 1.02"


def test_bad_group_size_raises():
    with pytest.raises(LowbitError):
        quantize_progressive(torch.randn(4, 64), group_size=24)


def test_clip_search_by_hand():
    # one group of 16 int8 codes: an outlier 119 whose input is always 0, and 15 codes of 12.
    # No search: s2 = round(119 / 15) = 8, so 12 -> 16. With the search over the output error (the
    # outlier costs nothing), ratios 1.0 .. 0.85 give s2 = 8, 8, 7, 7 (12 -> 16 or 14), and 0.8 gives
    # s2 = round(6.35) = 6, which holds 12 exactly; the outlier clamps to code 15: 90.
    w = torch.full((1, 16), 12.0)
    w[0, 0] = 119
    x = torch.eye(16)[1:]
    assert widen_progressive(quantize_progressive(w, 16)).tolist() == [[120] + [16] * 15]
    pw = quantize_progressive(w, 16, x)
    assert pw.s2.tolist() == [[6]] and pw.z2.tolist() == [[0]]
    assert widen_progressive(pw).tolist() == [[90] + [12] * 15]


@pytest.mark.parametrize("group_size", [128, 64])
def test_clip_search_lowers_output_error_and_stays_in_int8(group_size):
    w = heavy_tailed(64, 512)
    x = torch.randn(256, 512) * torch.rand(512).mul(3).exp()
    plain, searched = quantize_progressive(w, group_size), quantize_progressive(w, group_size, x)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=group_size)
    q4 = unpack_int4(searched.codes4, 512, signed=False).int()
    wide = (q4 - expand_qparams(searched.z2, spec, 512).int()) * expand_qparams(searched.s2, spec, 512).int()
    assert wide.abs().max() <= 127 and torch.equal(widen_progressive(searched), wide.to(torch.int8))
    assert torch.equal(searched.s1, plain.s1)  # level 1 is not searched

    def out_err(pw):
        return ((x @ (dequantize_progressive(pw) - w).T) ** 2).sum()

    assert out_err(searched) < 0.97 * out_err(plain)
