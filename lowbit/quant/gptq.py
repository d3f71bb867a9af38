"""GPTQ (Frantar et al., 2022): quantize a weight one column at a time and fold each column's
rounding error into the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs, so that the layer's output error (not the weight's) is what gets minimized."""
from __future__ import annotations

import dataclasses
import math

import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import (
    QTensor,
    QuantSpec,
    compute_qparams,
    dequantize_values,
    quantize,
    quantize_values,
)
from lowbit.quant.rtn import rtn_quantize


class HessianAccumulator:
    """Running `H = 2/T X^T X` over calibration inputs `x [..., K]` of one linear layer (the mean
    over the T tokens seen so far; GPTQ does not depend on H's overall scale)."""

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(k, k, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        k = self.hessian.shape[0]
        if x.shape[-1] != k:
            raise LowbitError(f"GPTQ: calibration input has {x.shape[-1]} features, the layer has {k}")
        x = x.detach().reshape(-1, k).float()
        if not x.shape[0]:
            return
        self.hessian *= self.tokens / (self.tokens + x.shape[0])
        self.tokens += x.shape[0]
        x = x * math.sqrt(2 / self.tokens)
        self.hessian += x.T @ x


@dataclasses.dataclass
class _Segment:
    start: int
    stop: int
    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor | None
    clip_search: bool = False

    def params(self, col: int):
        """Scale and zero of column `col` (an index of the whole weight), broadcastable over rows."""
        if self.spec.granularity != "group":
            return self.scale, self.zero
        g = (col - self.start) // self.spec.group_size
        return self.scale[:, g], None if self.zero is None else self.zero[:, g]

    def refit(self, col: int, cols: torch.Tensor, gram: torch.Tensor | None) -> None:
        """Recompute the params of the group starting at `col` from its columns `cols` as they are now."""
        g = (col - self.start) // self.spec.group_size
        scale, zero = fit_params(cols, dataclasses.replace(self.spec, granularity="channel"), self.clip_search, gram)
        self.scale[:, g] = scale
        if zero is not None:
            self.zero[:, g] = zero

    def group_at(self, col: int) -> int:
        """Width of the group starting at `col`, 0 when no group starts there."""
        if self.spec.granularity != "group" or (col - self.start) % self.spec.group_size:
            return 0
        return min(self.spec.group_size, self.stop - col)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | list[tuple[slice, QuantSpec]],
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    clip_by_output: bool = False,
) -> tuple[torch.Tensor, list[QTensor]]:
    """GPTQ-quantize a weight `[N, K]` given the Hessian `[K, K]` of its inputs.

    `spec` is one format for the whole weight or a list of `(column_slice, spec)` segments covering
    the columns in order (Atom: `[(slice(0, K - 128), int4 groups), (slice(K - 128, K), int8 per
    channel)]`). Without `act_order` each group's scale and zero are taken from the updated columns
    when GPTQ reaches the group; with `act_order` (columns visited by decreasing Hessian diagonal)
    they are taken from the original weight in the original column order beforehand ("static
    groups"), so the stored format is the plain one either way. Returns the fake-quantized weight (in
    `w`'s dtype; `dequantize` of the QTensors, concatenated along K, gives it exactly in fp32) and one
    QTensor per segment. `clip_search` picks each group's (row's) clipping ratio by the weight MSE
    of its columns when its params are fitted (RTN's grid), instead of the plain min/max; with
    `clip_by_output` by the group's output error instead, `d^T H d` over the group's columns (GPTQ's
    own objective without the cross-group terms), so weights on the inputs with the largest
    activations are not clipped for the sake of many small ones.
    """
    if percdamp < 0:
        raise LowbitError(f"GPTQ: percdamp must be >= 0, got {percdamp}")
    w32 = w.detach().float().clone()
    k = w32.shape[1]
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w32[:, dead] = 0
    # static params from the original weight; without act_order, groups are redone as GPTQ reaches them
    h_orig = h if clip_by_output else None  # the original column order, where groups are fitted

    def gram(a: int, b: int) -> torch.Tensor | None:
        return None if h_orig is None else h_orig[a:b, a:b]

    segments = [
        _Segment(start, stop, fmt, *fit_params(w32[:, start:stop], fmt, clip_search, gram(start, stop)), clip_search)
        for start, stop, fmt in _segment_bounds(spec, k)
    ]
    owner = [seg for seg in segments for _ in range(seg.start, seg.stop)]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=h.device)
    order = perm.tolist()
    w32, h = w32[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, percdamp)
    groups = [] if act_order else [
        (c, c + seg.group_at(c)) for seg in segments for c in range(seg.start, seg.stop) if seg.group_at(c)
    ]

    q = torch.zeros_like(w32)
    for i1, i2 in _blocks(k, block_size, groups):
        w1 = w32[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j, col = i1 + i, order[i1 + i]
            seg = owner[col]
            width = 0 if act_order else seg.group_at(col)
            if width:  # `_blocks` makes sure the group's columns are all updated by now
                seg.refit(col, w1[:, i : i + width] if i + width <= i2 - i1 else w32[:, j : j + width],
                          gram(col, col + width))
            s, z = seg.params(col)
            x = w1[:, i]
            q[:, j] = dequantize_values(quantize_values(x, s, z, seg.spec), s, z)
            err[:, i] = (x - q[:, j]) / hinv[j, j]
            w1[:, i + 1 :] -= err[:, i : i + 1] * hinv[j, j + 1 : i2]
        w32[:, i2:] -= err @ hinv[i1:i2, i2:]

    q = q[:, torch.argsort(perm)]
    qts = [quantize(q[:, seg.start : seg.stop], seg.spec, seg.scale, seg.zero) for seg in segments]
    return q.to(w.dtype), qts


def fit_params(x: torch.Tensor, spec: QuantSpec, clip_search: bool, gram: torch.Tensor | None = None):
    """Scale and zero for `x` under `spec`: min/max, or the clipping ratio with the least error
    (of the weight, or of the output under `gram` = the Hessian of these columns)."""
    if not clip_search:
        return compute_qparams(x, spec)
    _, qt = rtn_quantize(x, spec, gram=gram)
    return qt.scale, qt.zero


def _segment_bounds(spec, k: int) -> list[tuple[int, int, QuantSpec]]:
    if isinstance(spec, QuantSpec):
        return [(0, k, spec)]
    bounds, pos = [], 0
    for sl, s in spec:
        start, stop, step = sl.indices(k)
        if start != pos or step != 1 or stop <= start or not isinstance(s, QuantSpec):
            raise LowbitError(f"GPTQ: segments must be (slice, QuantSpec) pairs covering columns 0..{k} in order")
        bounds.append((start, stop, s))
        pos = stop
    if pos != k:
        raise LowbitError(f"GPTQ: segments cover columns 0..{pos}, the weight has {k}")
    return bounds


def _blocks(k: int, size: int, groups: list[tuple[int, int]]):
    """Blocks `[i1, i2)` for the lazy updates. A block never ends inside a group that started after
    its first column, so a group's params are always taken from fully updated columns."""
    i1 = 0
    while i1 < k:
        i2 = min(i1 + size, k)
        for a, b in groups:
            if i1 < a < i2 < b:
                i2 = a
        yield i1, i2
        i1 = i2


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened Hessian: its row j holds the weights that
    spread column j's error over the later columns."""
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if not info:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info:
        raise LowbitError(f"GPTQ: the Hessian is not positive definite; raise percdamp (now {percdamp})")
    return upper
