"""QServe progressive group quantization: int8 per output channel, then uint4 groups of the int8
codes with integer scales and zeros, so a kernel widens 4-bit codes to int8 with integer ops only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.formats import QuantSpec, compute_qparams, expand_qparams, quantize, unpack_int4
from lowbit.quant.rtn import search_clip

LEVEL1_MAX = 119
"""Level-1 codes stay in [-119, 119]: level 2 moves a code by at most half its scale (<= 16 / 2),
so the widened code stays in [-127, 127]."""


@dataclass
class ProgressiveWeight:
    codes4: torch.Tensor  # uint8 [N, ceil(K/2)], packed uint4 codes
    s1: torch.Tensor  # fp32 [N], level-1 scale per output channel
    s2: torch.Tensor  # uint8 [N, ceil(K/G)], integer level-2 scale per group
    z2: torch.Tensor  # uint8 [N, ceil(K/G)], level-2 zero point per group
    group_size: int
    shape: tuple[int, int]

    @property
    def level2(self) -> QuantSpec:
        return level2_spec(self.group_size)


def level2_spec(group_size: int = 128) -> QuantSpec:
    return QuantSpec(bits=4, symmetric=False, granularity="group", group_size=group_size)


def quantize_progressive(w: torch.Tensor, group_size: int = 128, x: torch.Tensor | None = None) -> ProgressiveWeight:
    """With calibration inputs `x [..., K]`, each level-2 group's clip ratio is searched for the least
    output error (QServe's weight clipping; `rtn.search_clip`), among the ratios whose widened codes
    stay in [-127, 127]. A row's output error is its level-1 scale squared times that of its int8
    codes, so the search runs on the codes."""
    w = w.detach().float()
    level1 = QuantSpec(bits=8, granularity="channel")
    s1 = compute_qparams(w, level1)[0] * (level1.qmax / LEVEL1_MAX)
    q8 = quantize(w, level1, s1).codes.float()
    spec = level2_spec(group_size)
    if x is None:
        s2, z2 = compute_qparams(q8, spec, integer_scale=True)
    else:
        _, s2, z2 = search_clip(q8, spec, x, integer_scale=True, bound=127)
    qt = quantize(q8, spec, s2, z2)
    return ProgressiveWeight(qt.codes, s1, s2.to(torch.uint8), z2, group_size, tuple(w.shape))


def widen_progressive(pw: ProgressiveWeight) -> torch.Tensor:
    """The int8 codes `(q4 - z2) * s2`, in integer arithmetic as a kernel does it."""
    k = pw.shape[-1]
    q4 = unpack_int4(pw.codes4, k, signed=False).to(torch.int16)
    z2 = expand_qparams(pw.z2, pw.level2, k).to(torch.int16)
    s2 = expand_qparams(pw.s2, pw.level2, k).to(torch.int16)
    return ((q4 - z2) * s2).to(torch.int8)


def dequantize_progressive(pw: ProgressiveWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (widen_progressive(pw).float() * pw.s1.unsqueeze(-1)).to(dtype)
