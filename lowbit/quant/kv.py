"""KV-cache quantization per (token, head): asymmetric int8/int4 (optionally in groups within the
head, 4-bit packed along head_dim) or fp8 e4m3, one scale (and zero) per row of `head_dim`. The
scales are fp16 values (QServe's KV format): a cache stores a (scale, zero) pair in 4 bytes, not 8,
which is 5.6% of an int4 token's bytes (64 of codes per head)."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import QTensor, QuantSpec, dequantize, quantize


def kv_spec(bits: int, group_size: int | None = None, fp8: bool = False) -> QuantSpec:
    groups = {} if group_size is None else {"granularity": "group", "group_size": group_size}
    return QuantSpec(bits=bits, dtype="fp8" if fp8 else "int", symmetric=fp8, scale_fp16=True, **groups)


def quantize_kv(
    x: torch.Tensor, bits: int, group_size: int | None = None, fp8: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`x [..., head_dim]` -> codes `[..., head_dim]` (`[..., head_dim / 2]` packed for 4-bit),
    scale (fp32 holding fp16 values) and uint8 zero (None for fp8) of shape `[...]`, or `[..., head_dim / G]`
    with groups."""
    spec = kv_spec(bits, group_size, fp8)
    if spec.bits == 4 and x.shape[-1] % 2:
        raise LowbitError(f"4-bit KV cache needs an even head_dim, got {x.shape[-1]}")
    qt = quantize(x, spec)
    return qt.codes, qt.scale, qt.zero


def dequantize_kv(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    fp8: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    spec = kv_spec(bits, group_size, fp8)
    head_dim = codes.shape[-1] * (2 if spec.bits == 4 else 1)
    return dequantize(QTensor(codes, scale, zero, spec, (*codes.shape[:-1], head_dim)), dtype)


def kv_roundtrip(x: torch.Tensor, spec) -> torch.Tensor:
    """What a cache of format `spec` (a `recipes.KVSpec`) returns for `x`: quantize, then dequantize."""
    codes, scale, zero = quantize_kv(x, spec.bits, spec.group_size, spec.fp8)
    return dequantize_kv(codes, scale, zero, spec.bits, spec.group_size, spec.fp8, x.dtype)
