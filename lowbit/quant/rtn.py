"""Round-to-nearest weight quantization with a per-block clipping-ratio search."""
from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import (
    QTensor,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    group_view,
    quantize,
    reduce_blocks,
)

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


def rtn_quantize(
    w: torch.Tensor, spec: QuantSpec, x: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QTensor]:
    """Quantize a weight `[N, K]`, choosing for each block of `spec` (group, row or tensor) the clip
    ratio in `grid` that minimizes the weight's squared error, or, given calibration inputs
    `x [..., K]`, the output's `||x (w - wq)^T||^2`. With groups the output error of a group counts
    its own columns only (cross-group terms dropped, as in AWQ's clip search); per channel and per
    tensor it is exact. Ties keep the earlier ratio, so with 1.0 first the search never does worse
    than no clipping. `gram` `[K, K]` may stand for `x^T x` (GPTQ's Hessian). Returns the chosen
    ratios (shaped like the scales) and the QTensor.
    """
    w = w.detach().float()
    ratios, scale, zero = search_clip(w, spec, x, grid, gram=gram)
    return ratios, quantize(w, spec, scale, zero)


def search_clip(w: torch.Tensor, spec: QuantSpec, x: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID,
                gram: torch.Tensor | None = None, integer_scale: bool = False, bound: float | None = None):
    """Per block of `spec`, the clip ratio in `grid` whose scale and zero give the least error (of
    the weight, or of the output under inputs `x` or their `gram`), as `rtn_quantize` describes.
    `integer_scale`: the scales are rounded to integers (QServe's level 2); `bound`: a ratio whose
    dequantized block leaves [-bound, bound] is not a candidate (the first ratio must always be one).
    -> (ratios, scale, zero), shaped like the scales."""
    if not grid:
        raise LowbitError("clip search needs at least one ratio")
    if x is not None and gram is not None:
        raise LowbitError("clip search: give calibration inputs or their gram, not both")
    w = w.detach().float()
    if x is not None:
        x = x.detach().reshape(-1, w.shape[-1]).float()
        gram = x.T @ x
    gram = None if gram is None else gram.detach().float()
    candidates = [compute_qparams(w, dataclasses.replace(spec, clip=r), integer_scale) for r in grid]
    errors = []
    for s, z in candidates:
        wq = fake_quantize(w, spec, s, z)
        e = _error(w - wq, spec, gram)
        if bound is not None:
            e = torch.where(reduce_blocks(wq.abs(), spec, torch.amax) <= bound, e, torch.inf)
        errors.append(e)
    best = torch.stack(errors).argmin(0)

    def pick(params):
        return torch.stack(params).gather(0, best.unsqueeze(0)).squeeze(0)

    scale = pick([s for s, _ in candidates])
    zero = None if spec.symmetric else pick([z for _, z in candidates])
    return torch.tensor(grid, device=w.device)[best], scale, zero


def _error(d: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None) -> torch.Tensor:
    """Per-block squared error of a weight error `d [N, K]`, plain or weighted by `gram = x^T x`."""
    if gram is None:
        return reduce_blocks(d * d, spec, torch.sum)
    if spec.granularity != "group":
        return reduce_blocks((d @ gram) * d, spec, torch.sum)
    dg = group_view(d, spec.group_size)
    return torch.einsum("ngi,gij,ngj->ng", dg, _diagonal_blocks(gram, spec.group_size), dg)


def _diagonal_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The `[G, G]` blocks on the diagonal of a `[K, K]` matrix, `[ceil(K/G), G, G]`, zero-padded."""
    pad = -h.shape[0] % g
    h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    n = h.shape[0] // g
    return h.view(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
