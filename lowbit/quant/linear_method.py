"""The quantized Linear: stored weight format + run-time activation handling (reference path).

`layer.weight` holds the dequantized weight, so the reference forward is one `F.linear` on the
fake-quantized activation; the stored codes (`segments` or `progressive`) are what checkpoints
keep and what the kernels read. Both compute the same function (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.quant.formats import QTensor, QuantSpec, dequantize, fake_quantize
from lowbit.quant.progressive import ProgressiveWeight, dequantize_progressive

OUTLIER_ACT = QuantSpec(bits=8, granularity="channel")  # Atom: outlier channels int8 per token


@dataclass
class QuantizedActivation:
    """An input already quantized per token by the kernel that produced it (`rmsnorm_quant`,
    `silu_mul_quant`), for Linears whose kernel reads that format (`QuantLinearMethod.token_dtype`)."""
    q: torch.Tensor  # [T, K] int8 or float8_e4m3fn
    scale: torch.Tensor  # [T] fp32
    dtype: torch.dtype  # the activations' own dtype, which the layer's output takes

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


@dataclass
class QuantLinearMethod:
    """segments: [(start, stop, QTensor)] over the input columns, or a ProgressiveWeight; None once
    released for serving, when the kernel's layout (`kernel`) is all that is kept (`install`)."""

    weight: list[tuple[int, int, QTensor]] | ProgressiveWeight | None
    activation: QuantSpec | None = None
    act_outliers: int = 0  # the last k input channels (after input_perm) quantized as OUTLIER_ACT
    input_perm: torch.Tensor | None = None  # gathered from the input at run time (fused upstream in kernels)
    kernel: object | None = None  # the weight in a kernel's layout (`prepare_kernel`), used when set

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(self.weight, ProgressiveWeight):
            return dequantize_progressive(self.weight, dtype)
        return torch.cat([dequantize(qt, dtype) for _, _, qt in self.weight], dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x[..., self.input_perm]
        if self.activation is None:
            return x
        k = self.act_outliers
        if not k:
            return fake_quantize(x, self.activation)
        return torch.cat([fake_quantize(x[..., :-k], self.activation), fake_quantize(x[..., -k:], OUTLIER_ACT)], -1)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self._apply_kernel(layer, x)
        return F.linear(self.quantize_input(x), layer.weight, layer.bias)

    def kernel_format(self) -> str | None:
        """Which GEMM kernel computes this layer's function exactly, if any: "w4a8" (QServe progressive
        weights x int8 per token), "w8a8" (int8 x int8 or fp8 x fp8, per channel x per token),
        "w4a16" (int4 weights in groups of 64 or 128 or per channel x 16-bit activations: GPTQ),
        "w4a4" (int4 g128 weights and activations, with Atom's int8 outlier channels or without)."""
        act = self.activation
        if act is not None and act.bits == 4 and act.granularity == "group":
            return "w4a4" if self._w4a4_format() else None
        if self.act_outliers or self.input_perm is not None:
            return None
        if act is None:
            return "w4a16" if _w4a16_format(self.weight) else None
        if act.granularity != "channel" or not act.symmetric or act.clip != 1.0 or act.bits != 8:
            return None
        if isinstance(self.weight, ProgressiveWeight):
            return "w4a8" if act.dtype == "int" and self.weight.group_size == 128 else None
        if len(self.weight) == 1:
            spec = self.weight[0][2].spec
            if spec.bits == 8 and spec.granularity == "channel" and spec.symmetric and spec.dtype == act.dtype:
                return "w8a8"
        return None

    def _w4a4_format(self) -> bool:
        """Symmetric int4 groups of 128 on both sides over the first K - k channels (after input_perm),
        and the last k (Atom's outliers, k = act_outliers <= 128) int8: per token x per channel."""
        act, w = self.activation, self.weight
        if (act.dtype != "int" or not act.symmetric or act.group_size != 128 or isinstance(w, ProgressiveWeight)
                or w is None or len(w) != 1 + bool(self.act_outliers) or self.act_outliers > 128):
            return False
        (start, k4, qt4), *rest = w
        spec = qt4.spec
        if start != 0 or spec.bits != 4 or spec.dtype != "int" or not spec.symmetric or spec.granularity != "group" \
                or spec.group_size != 128:
            return False
        if not rest:
            return True
        o_start, o_stop, qt8 = rest[0]
        return (o_start == k4 and o_stop - o_start == self.act_outliers and qt8.spec.bits == 8
                and qt8.spec.dtype == "int" and qt8.spec.symmetric and qt8.spec.granularity == "channel")

    def prepare_kernel(self) -> bool:
        """Put the weight in its kernel's layout (once, at load); False when no kernel computes this format."""
        from lowbit.kernels.w4a4 import prepare_w4a4
        from lowbit.kernels.w4a8 import prepare_w4a8
        from lowbit.kernels.w4a16 import prepare_w4a16
        from lowbit.kernels.w8a8 import prepare_w8a8

        fmt = self.kernel_format()
        if fmt == "w4a16":
            qt = self.weight[0][2]
            group = qt.spec.group_size if qt.spec.granularity == "group" else None
            self.kernel = prepare_w4a16(qt.codes, qt.shape[1], qt.scale, qt.zero, group)
        elif fmt == "w4a8":
            pw = self.weight
            self.kernel = prepare_w4a8(pw.codes4, pw.shape[1], pw.s1, pw.s2, pw.z2, pw.group_size)
        elif fmt == "w8a8":
            qt = self.weight[0][2]
            self.kernel = prepare_w8a8(qt.codes, qt.scale)
        elif fmt == "w4a4":
            qt4 = self.weight[0][2]
            n = qt4.shape[0]
            w8, ws8 = ((self.weight[1][2].codes, self.weight[1][2].scale) if self.act_outliers else
                       (qt4.codes.new_zeros(n, 0, dtype=torch.int8), qt4.scale.new_ones(n)))
            self.kernel = prepare_w4a4(qt4.codes, qt4.shape[1], qt4.scale, w8, ws8)
        return fmt is not None

    def token_dtype(self) -> torch.dtype | None:
        """The per-token activation codes this layer's kernel reads (int8 or fp8); None without a
        kernel, or for one that reads the activations as they are (W4A16) or quantizes them itself (W4A4)."""
        if self.kernel is None or self.activation is None or self.activation.bits == 4:
            return None
        return torch.float8_e4m3fn if self.activation.dtype == "fp8" else torch.int8

    def _apply_kernel(self, layer, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        from lowbit.kernels.actquant import quant_per_token
        from lowbit.kernels.w4a4 import W4A4Weight, w4a4_gemm
        from lowbit.kernels.w4a8 import W4A8Weight, w4a8_gemm
        from lowbit.kernels.w4a16 import W4A16Weight, w4a16_gemm
        from lowbit.kernels.w8a8 import w8a8_gemm

        shape = x.shape
        if isinstance(self.kernel, W4A16Weight):  # bf16 activations as they are
            y = w4a16_gemm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.kernel)
        elif isinstance(self.kernel, W4A4Weight):
            y = w4a4_gemm(*self._w4a4_input(x.reshape(-1, shape[-1])), self.kernel)
        else:
            if isinstance(x, QuantizedActivation):
                x_q, x_s = x.q, x.scale
            else:
                x_q, x_s = quant_per_token(x.reshape(-1, shape[-1]), self.token_dtype())
            gemm = w4a8_gemm if isinstance(self.kernel, W4A8Weight) else w8a8_gemm
            y = gemm(x_q, x_s, self.kernel)
        y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], -1)

    def _w4a4_input(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x `[M, K]` -> what the W4A4 kernel reads (`actquant.group_quant`: int4 g128 codes and scales of
        the first K4 channels after input_perm, int8 per-token codes and scales of the outliers): the
        same quantization as `quantize_input`'s, kept as codes."""
        from lowbit.kernels.actquant import group_quant
        return group_quant(x, self.input_perm, self.kernel.k4, self.activation.clip, self.act_outliers)

    def to(self, device) -> "QuantLinearMethod":
        """Move what the forward reads to `device` (the codes too, so kernels can be prepared there)."""
        if self.input_perm is not None:
            self.input_perm = self.input_perm.to(device)
        if self.weight is None:
            return self
        if isinstance(self.weight, ProgressiveWeight):
            for name in ("codes4", "s1", "s2", "z2"):
                setattr(self.weight, name, getattr(self.weight, name).to(device))
        else:
            for _, _, qt in self.weight:
                qt.codes, qt.scale = qt.codes.to(device), qt.scale.to(device)
                qt.zero = None if qt.zero is None else qt.zero.to(device)
        return self


def _w4a16_format(weight) -> bool:
    """One int4 segment in groups of 64 or 128 or per channel: what the W4A16 kernel reads."""
    if isinstance(weight, ProgressiveWeight) or weight is None or len(weight) != 1:
        return False
    spec = weight[0][2].spec
    return spec.bits == 4 and spec.dtype == "int" and (
        spec.granularity == "channel" or spec.granularity == "group" and spec.group_size in (64, 128))


def install(layer, method: QuantLinearMethod, keep_codes: bool = True) -> None:
    """Make `layer` quantized: its weight becomes the dequantized stored weight (the reference path).

    A 16-bit model on CUDA runs the layer on its Triton kernel where one computes its format (the
    kernels return bf16; an fp32 model keeps the exact reference path, e.g. for accuracy tables),
    and then keeps no dequantized copy. With `keep_codes=False` (models loaded to serve, random-weight
    models) it also releases the stored codes, so the kernel's layout is the only copy of the weight.
    """
    w = method.dequantized_weight(layer.weight.dtype).to(layer.weight.device)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.quant_method = method.to(layer.weight.device)
    if w.is_cuda and w.dtype != torch.float32 and method.prepare_kernel():
        layer.weight = torch.nn.Parameter(w.new_empty(0), requires_grad=False)
        if not keep_codes:
            method.weight = None
