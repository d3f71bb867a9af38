"""Atom's channel reordering: a linear's input channels are permuted so the k outlier channels come
last (int8) after the normal ones (int4 groups).

A permutation `perm` of the channels between a producer and its consumers is folded into both:
`permute_output` on the producer (dim 0 of the previous linear's rows `[K, M]` and bias `[K]`) and
`permute_input` on each consumer's columns `[N, K]`. An RMSNorm producer needs more than a permuted
weight, because its input (the residual stream) stays in the original order: the norm must also
gather its input, `norm(permute_input(x, perm), permute_output(g, perm))` (the RMS itself does not
depend on the order).
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def select_outlier_channels(act_stat: torch.Tensor, k: int = 128) -> torch.Tensor:
    """Permutation `[K]` (int64): the normal channels in their original order, then the k channels with
    the largest `act_stat` (a calibration statistic such as mean square or absmax), also in order."""
    if act_stat.dim() != 1 or not 0 <= k < act_stat.numel():
        shape = tuple(act_stat.shape)
        raise LowbitError(f"outlier channels need a 1-D statistic and 0 <= k < K, got k={k}, shape {shape}")
    n = act_stat.numel()
    order = torch.argsort(act_stat, descending=True, stable=True)
    is_outlier = torch.zeros(n, dtype=torch.bool, device=act_stat.device)
    is_outlier[order[:k]] = True
    channels = torch.arange(n, device=act_stat.device)
    return torch.cat((channels[~is_outlier], channels[is_outlier]))


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`inv` with `inv[perm] = arange(K)`, so `t[perm][inv] == t`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def permute_output(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A producer's output channels reordered: `t[perm]` along dim 0 (linear rows, bias, norm weight)."""
    return t.index_select(0, perm.to(t.device))


def permute_input(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A consumer's input channels reordered: `w[..., perm]` (a linear's columns, or an activation)."""
    return w.index_select(-1, perm.to(w.device))
