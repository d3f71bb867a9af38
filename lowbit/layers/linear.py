"""The one Linear layer: full-precision weights, or a quantized format chosen by a quant method.

A quantization recipe sets `layer.quant_method` to an object with `apply(layer, x)`; the
reference path (torch) and the kernels sit behind that one call, so the model never changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.rotate import apply_hadamard


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.quant_method = None
        self.online_hadamard = False  # QuaRot: x @ H before this layer (its weight holds W @ H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_hadamard:
            x = apply_hadamard(x)
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        fmt = type(self.quant_method).__name__ if self.quant_method is not None else "fp"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, format={fmt}"
