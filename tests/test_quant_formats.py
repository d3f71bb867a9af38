import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_qparams,
    fake_quantize,
    qparam_shape,
    quantize,
)

INT8 = QuantSpec(bits=8)
INT4_G16 = QuantSpec(bits=4, granularity="group", group_size=16)
UINT4 = QuantSpec(bits=4, symmetric=False)
UINT8 = QuantSpec(bits=8, symmetric=False)
FP8 = QuantSpec(bits=8, dtype="fp8")

SPECS = [
    INT8,
    UINT8,
    QuantSpec(bits=4, symmetric=False, granularity="tensor"),
    QuantSpec(bits=8, granularity="group", group_size=64),
    QuantSpec(bits=4, granularity="group"),
    QuantSpec(bits=4, symmetric=False, granularity="group"),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, clip=0.9),
]


@pytest.fixture(autouse=True)
def fresh_seed():
    print("seed", torch.seed())


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_int8_symmetric_by_hand():
    qt = quantize(t([7.9375, -0.09375, 0.03125, 0.15625]), INT8)
    assert qt.codes.dtype == torch.int8 and qt.zero is None
    assert qt.codes.tolist() == [[127, -2, 0, 2]]
    assert qt.scale.tolist() == [0.0625]
    assert dequantize(qt).tolist() == [[7.9375, -0.125, 0.0, 0.125]]


def test_int4_groups_by_hand_short_last_group_and_packing():
    x = torch.zeros(1, 20)
    x[0, :4] = torch.tensor([1.75, -0.375, 0.125, 0.625])
    x[0, 16:] = torch.tensor([0.875, -0.875, 0.3125, 0.0625])
    qt = quantize(x, INT4_G16)
    assert qt.scale.tolist() == [[0.25, 0.125]]
    assert qt.codes.tolist() == [[0xE7, 0x20, 0, 0, 0, 0, 0, 0, 0x97, 0x02]]
    want = torch.zeros(1, 20)
    want[0, :4] = torch.tensor([1.75, -0.5, 0.0, 0.5])
    want[0, 16:] = torch.tensor([0.875, -0.875, 0.25, 0.0])
    assert torch.equal(dequantize(qt), want)


def test_asymmetric_by_hand():
    qt = quantize(t([-1.5, 2.25, 0.125, 0.375]), UINT4)
    assert qt.scale.tolist() == [0.25] and qt.zero.tolist() == [6] and qt.zero.dtype == torch.uint8
    assert qt.codes.tolist() == [[0xF0, 0x86]]
    assert dequantize(qt).tolist() == [[-1.5, 2.25, 0.0, 0.5]]

    qt = quantize(t([-0.5, 1.5]), UINT8)
    assert qt.codes.dtype == torch.uint8 and qt.codes.tolist() == [[0, 255]] and qt.zero.tolist() == [64]
    assert qt.scale.item() == pytest.approx(2 / 255)


def test_asymmetric_range_includes_zero():
    qt = quantize(t([1.0, 2.0, 3.75]), UINT4)
    assert qt.scale.tolist() == [0.25] and qt.zero.tolist() == [0]
    assert qt.codes.tolist() == [[0x84, 0x0F]]
    assert dequantize(qt).tolist() == [[1.0, 2.0, 3.75]]


def test_fp8_by_hand():
    qt = quantize(t([896.0, 2.125, -3.0, 0.0]), FP8)
    assert qt.codes.dtype == torch.float8_e4m3fn and qt.zero is None
    assert qt.scale.tolist() == [2.0]
    assert qt.codes.float().tolist() == [[448.0, 1.0, -1.5, 0.0]]
    assert dequantize(qt).tolist() == [[896.0, 2.0, -3.0, 0.0]]


def test_clip_and_tensor_granularity_by_hand():
    qt = quantize(t([15.875, 0.0625]), QuantSpec(bits=8, clip=0.5))
    assert qt.scale.tolist() == [0.0625] and qt.codes.tolist() == [[127, 1]]

    qt = quantize(t([1.0, -7.0], [3.5, 0.5]), QuantSpec(bits=4, granularity="tensor"))
    assert qt.scale.shape == () and qt.scale.item() == 1.0
    assert dequantize(qt).tolist() == [[1.0, -7.0], [4.0, 0.0]]


@pytest.mark.parametrize("spec", SPECS + [FP8], ids=str)
def test_all_zero_row_gives_zero_not_nan(spec):
    x = torch.randn(3, 40)
    x[1] = 0
    qt = quantize(x, spec)
    out = dequantize(qt)
    assert torch.isfinite(qt.scale).all() and torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(40))


@pytest.mark.parametrize("k", [576, 203, 40])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_int_round_trip_within_half_a_step(spec, k):
    x = torch.randn(16, k) * torch.rand(16, 1).add(0.1)
    qt = quantize(x, spec)
    assert qt.scale.dtype == torch.float32 and tuple(qt.scale.shape) == qparam_shape(x.shape, spec)
    assert qt.codes.shape == (16, (k + 1) // 2 if spec.bits == 4 else k)
    out = dequantize(qt)
    assert out.shape == x.shape
    step = expand_qparams(qt.scale, spec, k)
    zero = 0 if spec.symmetric else expand_qparams(qt.zero, spec, k).float()
    lo, hi = (((q - zero) * step).expand(x.shape) for q in (spec.qmin, spec.qmax))
    inside = (x >= lo - step / 2) & (x <= hi + step / 2)
    assert inside.all() or spec.clip < 1
    assert ((out - x).abs() <= step / 2 * 1.001 + 1e-7)[inside].all()
    assert torch.equal(out[x < lo], lo[x < lo]) and torch.equal(out[x > hi], hi[x > hi])


def test_fp8_round_trip_relative_error():
    x = torch.randn(16, 203) * torch.rand(16, 1).add(0.1)
    qt = quantize(x, FP8)
    err = (dequantize(qt) - x).abs()
    bound = torch.maximum(x.abs() * 2**-4, qt.scale.unsqueeze(-1) * 2**-10) * 1.0001
    assert (err <= bound).all()


def test_group_576_last_group_has_64_columns():
    x = torch.randn(8, 576)
    spec = QuantSpec(bits=4, granularity="group")
    qt = quantize(x, spec)
    assert qt.scale.shape == (8, 5) and qt.codes.shape == (8, 288)
    assert torch.equal(qt.scale[:, 4], x[:, 512:].abs().amax(-1) / 7)
    assert torch.equal(qt.scale[:, 3], x[:, 384:512].abs().amax(-1) / 7)


def test_per_token_activations_any_leading_dims():
    x = torch.randn(2, 5, 96)
    for spec in (INT8, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)):
        qt = quantize(x, spec)
        flat = quantize(x.reshape(10, 96), spec)
        assert tuple(qt.scale.shape) == qparam_shape(x.shape, spec)
        assert torch.equal(qt.codes.reshape(flat.codes.shape), flat.codes)
        assert torch.equal(dequantize(qt).reshape(10, 96), dequantize(flat))


@pytest.mark.parametrize("spec", SPECS + [FP8], ids=str)
def test_fake_quantize_matches_dequantize_and_keeps_dtype(spec):
    x = torch.randn(6, 203)
    assert torch.equal(fake_quantize(x, spec), dequantize(quantize(x, spec)))
    xb = x.bfloat16()
    out = fake_quantize(xb, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(quantize(xb, spec), torch.bfloat16))


def test_given_params_are_used_and_checked():
    x = torch.randn(4, 64)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    scale, zero = compute_qparams(x * 2, spec)
    qt = quantize(x, spec, scale, zero)
    assert qt.scale is not None and torch.equal(qt.scale, scale) and torch.equal(qt.zero, zero)
    assert torch.equal(fake_quantize(x, spec, scale, zero), dequantize(qt))
    with pytest.raises(ValueError):
        quantize(x, spec, scale[:, :1], zero)
    with pytest.raises(ValueError):
        quantize(x, spec, scale, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),
        dict(bits=True),
        dict(bits=8, dtype="fp4"),
        dict(bits=4, dtype="fp8"),
        dict(bits=8, dtype="fp8", symmetric=False),
        dict(bits=8, symmetric="yes"),
        dict(bits=8, granularity="row"),
        dict(bits=4, granularity="group", group_size=100),
        dict(bits=4, granularity="group", group_size=8),
        dict(bits=4, granularity="group", group_size=0),
        dict(bits=4, granularity="group", group_size=128.0),
        dict(bits=8, clip=0.0),
        dict(bits=8, clip=1.5),
        dict(bits=8, clip=float("nan")),
        dict(bits=8, clip="1"),
    ],
)
def test_bad_specs_raise_one_line_errors(kwargs):
    with pytest.raises(LowbitError) as e:
        QuantSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_group_size_only_checked_for_groups():
    assert QuantSpec(bits=8, group_size=100).granularity == "channel"


@pytest.mark.parametrize("d", [{"bits": 4, "groupsize": 128}, {"symmetric": True}, [4]])
def test_bad_spec_dicts_raise(d):
    with pytest.raises(LowbitError):
        QuantSpec.from_dict(d)


@pytest.mark.parametrize("spec", SPECS + [FP8], ids=str)
def test_spec_json_round_trip(spec):
    again = QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()
