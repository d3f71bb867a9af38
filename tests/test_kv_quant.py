import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import expand_qparams
from lowbit.quant.kv import dequantize_kv, kv_spec, quantize_kv

CONFIGS = [(8, None, False), (4, None, False), (8, 32, False), (4, 16, False), (8, None, True), (8, 32, True)]


@pytest.fixture(autouse=True)
def fresh_seed():
    print("seed", torch.seed())


def test_int4_by_hand():
    codes, scale, zero = quantize_kv(torch.tensor([[[-1.5, 2.25, 0.125, 0.375]]]), bits=4)
    assert codes.tolist() == [[[0xF0, 0x86]]] and scale.tolist() == [[0.25]] and zero.tolist() == [[6]]
    assert dequantize_kv(codes, scale, zero, bits=4).tolist() == [[[-1.5, 2.25, 0.0, 0.5]]]


def test_scales_are_fp16_values_and_codes_use_them():
    """Range [0, 1] in 4 bits: the scale is fp16(1 / 15) = 0.066650390625, not fp32's 0.0666666...,
    and 0.9665 / 0.066650390625 = 14.501 takes code 15 (0.9665 / fp32's scale = 14.4975 would take 14)."""
    codes, scale, zero = quantize_kv(torch.tensor([[0.0, 1.0, 0.9665, 0.5]]), bits=4)
    assert scale.tolist() == [0.066650390625] and zero.tolist() == [0]
    assert codes.tolist() == [[0xF0, 0x8F]]  # codes 0, 15, 15, 8 (0.5 / s = 7.502)


def test_int8_and_fp8_by_hand():
    codes, scale, zero = quantize_kv(torch.tensor([[-0.5, 1.5]]), bits=8)
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0, 255]] and zero.tolist() == [64]
    codes, scale, zero = quantize_kv(torch.tensor([[896.0, 2.125, -3.0, 0.0]]), bits=8, fp8=True)
    assert zero is None and scale.tolist() == [2.0] and codes.float().tolist() == [[448.0, 1.0, -1.5, 0.0]]
    assert dequantize_kv(codes, scale, zero, bits=8, fp8=True).tolist() == [[896.0, 2.0, -3.0, 0.0]]


@pytest.mark.parametrize("bits,group_size,fp8", CONFIGS)
def test_round_trip_per_token_and_head(bits, group_size, fp8):
    x = torch.randn(7, 4, 64) * torch.rand(7, 4, 1).add(0.1)
    codes, scale, zero = quantize_kv(x, bits, group_size, fp8)
    blocks = (7, 4) if group_size is None else (7, 4, 64 // group_size)
    assert codes.shape == (7, 4, 32 if bits == 4 else 64) and scale.shape == blocks and scale.dtype == torch.float32
    assert (zero is None) == fp8 and (fp8 or zero.shape == blocks)
    out = dequantize_kv(codes, scale, zero, bits, group_size, fp8, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    err = (out.float() - x).abs()
    step = expand_qparams(scale, kv_spec(bits, group_size, fp8), 64)
    bound = torch.maximum(x.abs() * 2**-4, step * 2**-10) if fp8 else step / 2
    # plus the bf16 rounding of the output: half an ulp of it, |out| 2^-8 at most
    assert (err <= bound * 1.001 + out.float().abs() * 2**-8).all()
    one = quantize_kv(x[2, 1], bits, group_size, fp8)
    assert torch.equal(one[0].view(torch.uint8), codes[2, 1].view(torch.uint8)) and torch.equal(one[1], scale[2, 1])


@pytest.mark.parametrize(
    "bits,group_size,fp8,head_dim", [(3, None, False, 64), (8, 24, False, 64), (4, None, True, 64), (4, None, False, 63)]
)
def test_bad_arguments_raise(bits, group_size, fp8, head_dim):
    with pytest.raises(LowbitError):
        quantize_kv(torch.randn(2, head_dim), bits, group_size, fp8)
