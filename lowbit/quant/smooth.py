"""Per-channel scale migration between a producer and its consumers: SmoothQuant, AWQ's scale search
and QServe's SmoothAttention.

Dividing channel j of what a producer writes by `s_j` and multiplying column j of every consumer
linear by `s_j` leaves `x W^T` unchanged while moving the range of channel j from the activation to
the weight. A producer is anything with the channel on dim 0: an RMSNorm weight `[K]`, the previous
linear's rows `[K, M]` or its bias `[K]`. (A nonlinearity between them breaks this: for a gated MLP
only `up_proj`, not `gate_proj`, can produce `down_proj`'s scale.)
"""
from __future__ import annotations

from typing import Callable

import torch

from lowbit.errors import LowbitError


def _scale_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`t` with its dim-0 entries multiplied by `s`, in `t`'s dtype."""
    return (t * s.to(t.device).view(-1, *(1,) * (t.dim() - 1))).to(t.dtype)


def _scale_columns(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w * s.to(w.device)).to(w.dtype)


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` `[K]`, the weight max taken over the
    columns of all consumers `[N_i, K]`; both maxima and s are clamped to at least `eps`."""
    w_absmax = torch.stack([w.abs().amax(0).to(act_absmax) for w in weights]).amax(0)
    s = act_absmax.clamp(min=eps).pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)


def apply_smoothing(
    producer: torch.Tensor,
    weights: list[torch.Tensor],
    s: torch.Tensor,
    producer_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """`(producer / s, [W * s, ...], producer_bias / s)`: channel j of the producer's output (dim 0 of a
    norm weight `[K]` or a linear's rows `[K, M]`) divided by `s_j`, column j of each consumer times it."""
    inv = 1 / s
    bias = None if producer_bias is None else _scale_rows(producer_bias, inv)
    return _scale_rows(producer, inv), [_scale_columns(w, s) for w in weights], bias


def awq_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    grid: int = 20,
) -> torch.Tensor:
    """AWQ: the scale `s = mean|x|^r` (r = 0, 1/grid, ..., (grid-1)/grid; normalized so max*min = 1)
    whose `quantize_fn(W * s) / s` gives the smallest output MSE against `x W^T`, summed over the
    consumers. r = 0 is s = 1, plain quantization, so the result never does worse than that on `x`.

    x: calibration inputs `[T, K]`; weights: consumers `[N_i, K]`; quantize_fn: `w -> fake-quantized w`.
    """
    if grid < 1:
        raise LowbitError(f"awq grid must be >= 1, got {grid}")
    x_mean = x.abs().mean(0)
    refs = [x @ w.T for w in weights]
    best, best_loss = None, float("inf")
    for i in range(grid):
        s = x_mean.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(
            float((x @ (quantize_fn(_scale_columns(w, s)) / s).T - ref).pow(2).mean())
            for w, ref in zip(weights, refs)
        )
        if best is None or loss < best_loss:
            best, best_loss = s, loss
    return best


def smooth_attention_scales(k_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5) -> torch.Tensor:
    """SmoothAttention (QServe) `lam = max|K|^alpha` `[n_kv_heads, head_dim]` from the keys' per-channel
    absmax, with channels i and i + head_dim/2 (the pair rotate-half RoPE mixes) sharing the larger.

    RoPE rotates each pair by an angle; a scale equal on both members commutes with that rotation, so
    keys divided by lam and queries multiplied by it give the same q.k after RoPE.
    """
    head_dim = k_absmax.shape[-1]
    if head_dim % 2:
        raise LowbitError(f"rotate-half RoPE needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    pair_max = torch.maximum(k_absmax[..., :half], k_absmax[..., half:])
    lam = pair_max.clamp(min=eps).pow(alpha)
    return torch.cat((lam, lam), dim=-1)


def apply_smooth_attention(
    wq: torch.Tensor,
    wk: torch.Tensor,
    lam: torch.Tensor,
    bq: torch.Tensor | None = None,
    bk: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(wq, wk, bq, bk)` with k_proj's rows (kv head j, channel i) divided by `lam[j, i]` and q_proj's
    rows multiplied by the `lam` of their kv group (q heads j*g .. j*g+g-1, as HF's `repeat_kv`)."""
    n_kv, head_dim = lam.shape
    group = wq.shape[0] // (n_kv * head_dim)
    lam_q = lam.repeat_interleave(group, dim=0).flatten()
    lam_k = 1 / lam.flatten()
    return (
        _scale_rows(wq, lam_q),
        _scale_rows(wk, lam_k),
        None if bq is None else _scale_rows(bq, lam_q),
        None if bk is None else _scale_rows(bk, lam_k),
    )
