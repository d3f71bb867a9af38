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
class QuantLinearMethod:
    """segments: [(start, stop, QTensor)] over the input columns, or a ProgressiveWeight."""

    weight: list[tuple[int, int, QTensor]] | ProgressiveWeight
    activation: QuantSpec | None = None
    act_outliers: int = 0  # the last k input channels (after input_perm) quantized as OUTLIER_ACT
    input_perm: torch.Tensor | None = None  # gathered from the input at run time (fused upstream in kernels)

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
        return F.linear(self.quantize_input(x), layer.weight, layer.bias)

    def to(self, device) -> "QuantLinearMethod":
        if self.input_perm is not None:
            self.input_perm = self.input_perm.to(device)
        return self


def install(layer, method: QuantLinearMethod) -> None:
    """Make `layer` quantized: its weight becomes the dequantized stored weight."""
    w = method.dequantized_weight(layer.weight.dtype).to(layer.weight.device)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.quant_method = method.to(layer.weight.device)
