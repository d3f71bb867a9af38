"""The one Linear layer: full-precision weights, or a quantized format chosen by a quant method.

A quantization recipe sets `layer.quant_method` to an object with `apply(layer, x)`; the
reference path (torch) and the kernels sit behind that one call, so the model never changes.
"""
from __future__ import annotations

from dataclasses import replace

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


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear whose output is the concatenation of `parts`' outputs on the same input (q/k/v,
    gate/up): one activation quantization and one GEMM instead of several. For 16-bit weights, and
    for quantized ones that all run one kernel format; None for anything else (the reference path
    stays as it is). The parts' weights become views of the fused one, so nothing is held twice."""
    first = parts[0]
    if len(parts) < 2 or any(p.online_hadamard != first.online_hadamard or p.in_features != first.in_features
                             or (p.bias is None) != (first.bias is None) for p in parts):
        return None
    methods = [p.quant_method for p in parts]
    if all(m is None for m in methods):
        if len({(p.weight.dtype, p.weight.device) for p in parts}) != 1 or first.weight.numel() == 0:
            return None
        weight, kernel = torch.cat([p.weight for p in parts]), None
    elif all(m is not None and m.kernel is not None for m in methods):
        first_m = methods[0]
        if len({type(m.kernel) for m in methods}) != 1 or any(
                m.activation != first_m.activation or m.act_outliers != first_m.act_outliers
                or not _same_perm(m.input_perm, first_m.input_perm) for m in methods):
            return None
        weight, kernel = first.weight.new_empty(0), type(methods[0].kernel).cat([m.kernel for m in methods])
    else:
        return None
    with torch.device("meta"):  # every parameter is replaced below
        fused = Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.online_hadamard = first.online_hadamard
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    if kernel is not None:
        fused.quant_method = replace(methods[0], weight=None, kernel=kernel)
    start = 0
    for p in parts:
        stop = start + p.out_features
        if kernel is None:
            p.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        else:
            p.quant_method.kernel = kernel.rows(start, stop, p.quant_method.kernel)
        if p.bias is not None:
            p.bias = nn.Parameter(fused.bias[start:stop], requires_grad=False)
        start = stop
    return fused
