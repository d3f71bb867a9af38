import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import QuantSpec, dequantize, fake_quantize, reduce_blocks
from lowbit.quant.rtn import CLIP_GRID, rtn_quantize

G128 = QuantSpec(bits=4, granularity="group")
SPECS = [
    G128,
    QuantSpec(bits=4, symmetric=False, granularity="group"),
    QuantSpec(bits=4, symmetric=False),
    QuantSpec(bits=8, granularity="tensor"),
]


@pytest.fixture(autouse=True)
def fresh_seed():
    print("seed", torch.seed())


def heavy_tailed(n, k):
    return torch.randn(n, k) * torch.randn(n, k).exp()


def sse(w, wq, spec):
    return reduce_blocks((w - wq) ** 2, spec, torch.sum)


def test_outlier_group_by_hand():
    w = torch.full((2, 128), 0.1)
    w[0, 5] = 1.0
    w[1] = 0.7
    w[1, ::2] = -0.7
    ratios, qt = rtn_quantize(w, G128)
    err = sse(w, dequantize(qt), G128)
    # row 0: 127 * (s - 0.1)^2 + (1 - 7 s)^2 with s = r / 7: 0.2333 at r = 1, 0.0690 at 0.75, 0.0659 at 0.8
    assert torch.equal(ratios, torch.tensor([[0.8], [1.0]]))
    assert err[0, 0].item() == pytest.approx(127 * (0.8 / 7 - 0.1) ** 2 + 0.2**2, rel=1e-4)
    assert sse(w, fake_quantize(w, G128), G128)[0, 0].item() == pytest.approx(127 * (1 / 7 - 0.1) ** 2, rel=1e-4)
    assert err[1, 0].item() == 0

    ratios, qt = rtn_quantize(w[:1], G128, grid=(1.0, 0.7))
    assert torch.equal(ratios, torch.tensor([[0.7]]))
    assert torch.allclose(dequantize(qt)[0], torch.where(w[0] > 0.5, 0.7, 0.1))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_search_never_worse_than_no_clipping(spec):
    w = heavy_tailed(32, 576)
    ratios, qt = rtn_quantize(w, spec)
    assert ratios.shape == qt.scale.shape and torch.isin(ratios, torch.tensor(CLIP_GRID)).all()
    searched, plain = sse(w, dequantize(qt), spec), sse(w, fake_quantize(w, spec), spec)
    assert (searched <= plain).all()
    assert searched.sum() < plain.sum()
    assert torch.equal(dequantize(qt), fake_quantize(w, spec, qt.scale, qt.zero))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_output_error_search(spec):
    w = heavy_tailed(32, 576)
    x = torch.randn(256, 576) * torch.rand(576).mul(4).exp()

    def out_err(wq):
        return ((x @ (w - wq).T) ** 2).sum(0)

    _, by_output = rtn_quantize(w, spec, x)
    _, by_weight = rtn_quantize(w, spec)
    got, plain, weight_search = out_err(dequantize(by_output)), out_err(fake_quantize(w, spec)), out_err(dequantize(by_weight))
    assert got.sum() <= plain.sum() and got.sum() <= weight_search.sum()
    if spec.granularity == "channel":
        assert (got <= plain).all() and (got <= weight_search).all()
    if spec.granularity != "tensor":
        assert got.sum() < 0.95 * plain.sum()


@pytest.mark.parametrize("grid", [(), (1.0, 1.2), (0.0,)])
def test_bad_grid_raises(grid):
    with pytest.raises(LowbitError):
        rtn_quantize(torch.randn(4, 32), G128, grid=grid)
