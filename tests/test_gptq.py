import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import QuantSpec, dequantize, fake_quantize, quantize
from lowbit.quant.gptq import HessianAccumulator, gptq_quantize
from lowbit.quant.rtn import rtn_quantize

K = 576
G128 = QuantSpec(bits=4, granularity="group")
ATOM = [(slice(0, K - 128), G128), (slice(K - 128, None), QuantSpec(bits=8))]
UNALIGNED = [(slice(0, 100), QuantSpec(bits=8)), (slice(100, None), QuantSpec(bits=4, symmetric=False, granularity="group"))]
SPECS = [
    G128,
    QuantSpec(bits=4, symmetric=False, granularity="group"),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=256),
    QuantSpec(bits=4, granularity="group", group_size=32),
    QuantSpec(bits=8),
    QuantSpec(bits=8, dtype="fp8"),
    QuantSpec(bits=4, granularity="tensor"),
]
CASES = [(s, False) for s in SPECS] + [(G128, True), (SPECS[1], True), (SPECS[5], True)]


@pytest.fixture(autouse=True)
def fresh_seed():
    print("seed", torch.seed())


def correlated_inputs(t, k):
    return torch.randn(t, 32) @ torch.randn(32, k) + 0.5 * torch.randn(t, k)


def hessian(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def segments_of(spec):
    return [(slice(0, K), spec)] if isinstance(spec, QuantSpec) else spec


def rtn(w, spec):
    return torch.cat([fake_quantize(w[:, sl], s) for sl, s in segments_of(spec)], dim=1)


def test_two_columns_by_hand():
    w = torch.tensor([[0.14, 0.34], [0.7, 0.0]])
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    spec = QuantSpec(bits=4, granularity="tensor")
    wq, _ = gptq_quantize(w, h, spec, percdamp=0.0)
    # step 0.1; column 0 rounds 0.14 -> 0.1 and passes -H^-1[0,1] / H^-1[0,0] * 0.04 = +0.02 on: 0.36 -> 0.4
    assert torch.allclose(wq, torch.tensor([[0.1, 0.4], [0.7, 0.0]]))
    assert torch.allclose(fake_quantize(w, spec), torch.tensor([[0.1, 0.3], [0.7, 0.0]]))


def test_hessian_accumulator_is_the_mean_of_2_x_xt():
    x = torch.randn(3, 50, 40)
    acc = HessianAccumulator(40)
    acc.add(x[:1])
    acc.add(x[1:])
    acc.add(x[:0])
    flat = x.reshape(-1, 40)
    assert acc.tokens == 150
    assert torch.allclose(acc.hessian, 2 * flat.T @ flat / 150, rtol=1e-4, atol=1e-4)
    with pytest.raises(LowbitError):
        acc.add(torch.randn(4, 41))


@pytest.mark.parametrize("spec,act_order", CASES + [(ATOM, False), (ATOM, True), (UNALIGNED, False)], ids=str)
def test_gptq_beats_rtn_on_output_error(spec, act_order):
    x = correlated_inputs(1024, K)
    w = torch.randn(64, K)
    wq, _ = gptq_quantize(w, hessian(x), spec, act_order=act_order)
    err = ((x @ (w - wq).T) ** 2).sum()
    assert err < 0.5 * ((x @ (w - rtn(w, spec)).T) ** 2).sum()


def test_gptq_beats_rtn_with_output_clip_search():
    x = correlated_inputs(1024, K)
    w = torch.randn(64, K)
    wq, _ = gptq_quantize(w, hessian(x), G128)
    searched = dequantize(rtn_quantize(w, G128, x)[1])
    assert ((x @ (w - wq).T) ** 2).sum() < 0.5 * ((x @ (w - searched).T) ** 2).sum()


@pytest.mark.parametrize("k", [K, 203])
@pytest.mark.parametrize("spec,act_order", CASES, ids=str)
def test_diagonal_hessian_is_rtn_exactly(spec, act_order, k):
    w = torch.randn(48, k)
    h = torch.eye(k) if not act_order else torch.diag(torch.rand(k) + 0.5)
    wq, (qt,) = gptq_quantize(w, h, spec, act_order=act_order)
    assert torch.equal(wq, fake_quantize(w, spec))
    assert torch.equal(qt.codes, quantize(w, spec).codes)


@pytest.mark.parametrize("spec,act_order", CASES + [(ATOM, False), (ATOM, True), (UNALIGNED, False)], ids=str)
def test_result_lies_on_its_grid(spec, act_order):
    x = correlated_inputs(256, K)
    w = torch.randn(32, K).bfloat16()
    wq32, _ = gptq_quantize(w.float(), hessian(x), spec, act_order=act_order)
    wq, qts = gptq_quantize(w, hessian(x), spec, act_order=act_order)
    assert wq.dtype == torch.bfloat16 and torch.equal(wq, wq32.bfloat16())
    assert len(qts) == len(segments_of(spec))
    for (sl, s), qt in zip(segments_of(spec), qts):
        part = wq32[:, sl]
        assert qt.spec == s and qt.shape == tuple(part.shape)
        assert torch.equal(dequantize(qt), part)
        assert torch.equal(dequantize(quantize(part, s, qt.scale, qt.zero)), part)


@pytest.mark.parametrize("spec", [SPECS[3], SPECS[2]], ids=str)
def test_group_params_come_from_updated_columns_whatever_the_block_size(spec):
    x = correlated_inputs(256, K)
    w = torch.randn(32, K)
    base = gptq_quantize(w, hessian(x), spec, block_size=16)[1][0].scale
    for block_size in (48, K):
        scale = gptq_quantize(w, hessian(x), spec, block_size=block_size)[1][0].scale
        assert ((scale - base).abs() / base).median() < 1e-4


def test_dead_columns_are_zero():
    x = correlated_inputs(256, 64)
    x[:, [3, 40]] = 0
    w = torch.randn(16, 64)
    wq, _ = gptq_quantize(w, hessian(x), QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16))
    assert torch.isfinite(wq).all()
    assert not wq[:, [3, 40]].any()


@pytest.mark.parametrize(
    "segments",
    [
        [(slice(0, 30), G128)],
        [(slice(0, 30), G128), (slice(31, 64), G128)],
        [(slice(0, 40), G128), (slice(30, 64), G128)],
        [(slice(0, 64, 2), G128)],
        [(slice(0, 64), "int4")],
    ],
)
def test_bad_segments_raise(segments):
    with pytest.raises(LowbitError):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), segments)


def test_bad_hessian_or_damping_raise():
    with pytest.raises(LowbitError):
        gptq_quantize(torch.randn(8, 64), -torch.eye(64), G128, percdamp=0.0)
    with pytest.raises(LowbitError):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), G128, percdamp=-0.1)


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_by_output_keeps_the_weights_of_loud_inputs(act_order):
    """One input channel 100x louder than the rest (a massive activation) and, in every row, the
    largest weight on it. The weight-MSE clip search clips that weight to refine the grid of the
    many small ones; the output-error one keeps it (its error weighs 10^4 times more) and ends with
    a smaller output error d^T H d."""
    g = torch.Generator().manual_seed(7)
    k, loud = 128, 5
    w = torch.rand(16, k, generator=g) * 2 - 1
    w[:, loud] = 6.0 * torch.sign(torch.randn(16, generator=g))
    h = torch.eye(k) * 0.01
    h[loud, loud] = 100.0
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
    runs = {by_output: gptq_quantize(w, h, spec, act_order=act_order, clip_search=True, clip_by_output=by_output)[0]
            for by_output in (False, True)}
    err_loud = {b: (q[:, loud] - w[:, loud]).abs().max().item() for b, q in runs.items()}
    out_err = {b: torch.einsum("ni,ij,nj->", q - w, h, q - w).item() for b, q in runs.items()}
    # a row spans about 7 (-6..1 or -1..6): a step of 7/15 ~ 0.47. Unclipped, the loud weight is the
    # range's end, off only by the zero point's rounding; each 5% of clipping moves it by 0.35
    assert err_loud[False] > 0.2  # clipped
    assert err_loud[True] < 0.1
    assert out_err[True] < out_err[False] / 5


def test_clip_by_output_needs_gptq_and_one_error_measure():
    from lowbit.quant.recipes import Recipe

    spec = QuantSpec(bits=4, granularity="group")
    with pytest.raises(LowbitError, match="clip_by_output"):
        Recipe("x", weight=spec, method="rtn", clip_search=True, clip_by_output=True)
    with pytest.raises(LowbitError, match="clip_by_output"):
        Recipe("x", weight=spec, method="gptq", clip_by_output=True)
    w = torch.randn(4, 128)
    with pytest.raises(LowbitError, match="not both"):
        rtn_quantize(w, spec, torch.randn(8, 128), gram=torch.eye(128))
