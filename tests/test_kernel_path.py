"""A quantized Linear computes the same function through its kernel as through the reference path.

On the CPU the kernels' dispatch runs their torch references (same layouts, same signatures), so
this holds the model-level plumbing (layout preparation, activation quantization, epilogue) to the
fake-quantized reference; on a GPU the same test runs the Triton kernels.
"""
import pytest
import torch

from lowbit.layers.linear import Linear
from lowbit.quant.formats import QuantSpec
from lowbit.quant.linear_method import QuantLinearMethod, install
from lowbit.quant.progressive import quantize_progressive
from lowbit.quant.quantize import OUTLIER_WEIGHT
from lowbit.quant.formats import quantize

INT8_TOKEN = QuantSpec(bits=8, granularity="channel")
FP8 = QuantSpec(bits=8, dtype="fp8", granularity="channel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_layer(k, n, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k, generator=g) * 0.05
    if bias:
        lin.bias.data = torch.randn(n, generator=g)
    return lin.to(DEVICE)


W4A16 = {"w4a16": QuantSpec(bits=4, symmetric=False, granularity="group"),
         "w4a16-g64": QuantSpec(bits=4, granularity="group", group_size=64),
         "w4a16-channel": QuantSpec(bits=4, granularity="channel")}  # GPTQ's g128 asymmetric, and others


W4A4_ACT = QuantSpec(bits=4, granularity="group", clip=0.9)  # Atom's and QuaRot's int4 g128 activations


def method_for(fmt, w):
    if fmt.startswith("w4a4"):  # Atom: reordered input, the last 64 channels int8; QuaRot: int4 throughout
        k = w.shape[1]
        k_out = 64 if fmt == "w4a4-atom" else 0
        wq = w.float().cpu()
        segments = [(0, k - k_out, quantize(wq[:, :k - k_out], QuantSpec(bits=4, granularity="group", clip=0.85)))]
        if k_out:
            segments.append((k - k_out, k, quantize(wq[:, k - k_out:], OUTLIER_WEIGHT)))
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if k_out else None
        return QuantLinearMethod(segments, W4A4_ACT, act_outliers=k_out, input_perm=perm)
    if fmt == "w4a8":
        return QuantLinearMethod(quantize_progressive(w.float().cpu()), INT8_TOKEN)
    if fmt in W4A16:
        return QuantLinearMethod([(0, w.shape[1], quantize(w.float().cpu(), W4A16[fmt]))], None)
    spec = OUTLIER_WEIGHT if fmt == "w8a8-int8" else FP8
    return QuantLinearMethod([(0, w.shape[1], quantize(w.float().cpu(), spec))], INT8_TOKEN if fmt == "w8a8-int8" else FP8)


@pytest.mark.parametrize("fmt", ["w4a8", "w8a8-int8", "w8a8-fp8", *W4A16, "w4a4-atom", "w4a4-rot"])
@pytest.mark.parametrize("m,k,bias", [(1, 576, False), (3, 256, True), (17, 640, False)])
def test_kernel_path_matches_the_reference_path(fmt, m, k, bias):
    seed = torch.seed() % 2**31
    lin = make_layer(k, 192, bias, seed)
    method = method_for(fmt, lin.weight.data)
    install(lin, method)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    method.kernel = None
    ref = lin(x).double()
    assert method.prepare_kernel() and method.kernel is not None
    got = lin(x).double()
    # the kernel returns bf16: its rounding is the bound (the reference path is fp32)
    assert ((got - ref).norm() / ref.norm()).item() < 8e-3, f"seed {seed}"


def test_formats_without_a_kernel_keep_the_reference_path():
    lin = make_layer(256, 64, False, 0)
    method = QuantLinearMethod([(0, 256, quantize(lin.weight.data.cpu(), QuantSpec(bits=8)))],
                               QuantSpec(bits=8, granularity="channel", clip=0.9))
    install(lin, method)
    assert method.kernel_format() is None and not method.prepare_kernel()
    for spec in (QuantSpec(bits=4, granularity="group", group_size=32), QuantSpec(bits=8)):  # W4A16 takes groups of 64, 128, channels
        method = QuantLinearMethod([(0, 256, quantize(lin.weight.data.cpu(), spec))], None)
        assert method.kernel_format() is None
    # W4A4 takes symmetric int4 groups of 128 on both sides (and int8 outliers per channel)
    int4_g64 = QuantSpec(bits=4, granularity="group", group_size=64)
    for w_spec, a_spec in ((int4_g64, W4A4_ACT), (QuantSpec(bits=4, granularity="group"), int4_g64),
                           (QuantSpec(bits=4, granularity="group", symmetric=False), W4A4_ACT)):
        method = QuantLinearMethod([(0, 256, quantize(lin.weight.data.cpu(), w_spec))], a_spec)
        assert method.kernel_format() is None
    w4a4 = method_for("w4a4-atom", lin.weight.data)
    assert w4a4.kernel_format() == "w4a4" and w4a4.token_dtype() is None  # it quantizes its own input
