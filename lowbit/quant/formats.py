"""Quantized formats: the numerics contract every kernel implements (see docs/architecture.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NoReturn

import torch

from lowbit.errors import LowbitError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]) two per byte along the last dim.

    Element 2i goes to the low nibble, 2i+1 to the high nibble; an odd length is padded with 0.
    """
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4`: `[..., ceil(k/2)]` uint8 -> `[..., k]` int8 (signed) or uint8 codes."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :k]
    if signed:
        return (q - ((q & 0x8) << 1)).to(torch.int8)
    return q.to(torch.uint8)


FP8_MAX = 448.0


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor role (weight, activation, key or value) is quantized."""

    bits: int
    dtype: str = "int"
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    clip: float = 1.0
    scale_fp16: bool = False  # the scale rounded to fp16 before the zero and codes are taken (the KV cache's)

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in (4, 8):
            _bad(f"bits must be 4 or 8, got {self.bits!r}")
        if self.dtype not in ("int", "fp8"):
            _bad(f"dtype must be 'int' or 'fp8', got {self.dtype!r}")
        if not isinstance(self.symmetric, bool):
            _bad(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.dtype == "fp8" and (self.bits != 8 or not self.symmetric):
            _bad("fp8 is 8-bit and symmetric")
        if self.granularity not in ("tensor", "channel", "group"):
            _bad(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")
        g = self.group_size
        if self.granularity == "group" and (type(g) is not int or g < 16 or g & (g - 1)):
            _bad(f"group_size must be a power of two >= 16, got {g!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 < self.clip <= 1:
            _bad(f"clip must be a ratio in (0, 1], got {self.clip!r}")
        if not isinstance(self.scale_fp16, bool):
            _bad(f"scale_fp16 must be true or false, got {self.scale_fp16!r}")
        object.__setattr__(self, "clip", float(self.clip))

    @property
    def qmin(self) -> float:
        if self.dtype == "fp8":
            return -FP8_MAX
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> float:
        """Largest code; also the divisor of the scale (absmax / qmax, or range / qmax when asymmetric)."""
        if self.dtype == "fp8":
            return FP8_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        if not isinstance(d, dict) or "bits" not in d:
            _bad(f"expected an object with at least 'bits', got {d!r}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            _bad(f"unknown field(s) {', '.join(unknown)}")
        return cls(**d)


def _bad(msg: str) -> NoReturn:
    raise LowbitError(f"invalid quantization spec: {msg}")


@dataclass
class QTensor:
    """Codes (int8, uint8 when asymmetric, packed uint8 for 4-bit, float8_e4m3fn for fp8) and their
    fp32 scales (and uint8 zero points when asymmetric), shaped as `qparam_shape(shape, spec)`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]


def qparam_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Scale/zero shape for a tensor of `shape`: () per tensor, shape[:-1] per channel (row, token),
    shape[:-1] + (ceil(K / G),) per group."""
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "channel":
        return tuple(shape[:-1])
    return (*shape[:-1], -(-shape[-1] // spec.group_size))


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[..., K]` -> `[..., ceil(K/G), G]`, the short last group padded with zeros (a zero changes
    no absmax, no range that includes 0 and no sum of squares)."""
    k = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, -k % group_size))
    return x.unflatten(-1, (-1, group_size))


def reduce_blocks(x: torch.Tensor, spec: QuantSpec, fn) -> torch.Tensor:
    """Reduce `x [..., K]` with `fn(t, dim=-1)` (torch.amax, torch.sum...) over each block of `spec`'s
    granularity; the result has `qparam_shape(x.shape, spec)`."""
    if spec.granularity == "tensor":
        return fn(x.reshape(-1), dim=-1)
    if spec.granularity == "channel":
        return fn(x, dim=-1)
    return fn(group_view(x, spec.group_size), dim=-1)


def expand_qparams(p: torch.Tensor | None, spec: QuantSpec, k: int) -> torch.Tensor | None:
    """Broadcast a scale or zero of `qparam_shape` against the `[..., K]` tensor it quantizes."""
    if p is None or spec.granularity == "tensor":
        return p
    if spec.granularity == "channel":
        return p.unsqueeze(-1)
    return p.repeat_interleave(spec.group_size, dim=-1)[..., :k]


def compute_qparams(
    x: torch.Tensor, spec: QuantSpec, integer_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp32) and zero point (uint8, None when symmetric) per block of `x` (see docs/architecture.md).

    The asymmetric range always includes 0, so that 0 (padding, dead columns) is exact and an
    all-positive block keeps its values. A zero scale (all-zero block) becomes 1, so codes are 0,
    never NaN. `integer_scale` rounds scales to integers >= 1 before the zero point is taken
    (QServe's level-2 groups). `spec.scale_fp16` rounds them to fp16 (kept as fp32 values) first, so
    the codes are those of the scale a cache stores in 2 bytes.
    """
    x = x.detach().float()
    if spec.symmetric:
        lo = None
        scale = reduce_blocks(x.abs(), spec, torch.amax) * spec.clip / spec.qmax
    else:
        lo = reduce_blocks(x, spec, torch.amin).clamp(max=0)
        hi = reduce_blocks(x, spec, torch.amax).clamp(min=0)
        scale = (hi - lo) * spec.clip / spec.qmax
    if integer_scale:
        scale = scale.round().clamp(min=1)
    if spec.scale_fp16:
        scale = scale.half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if lo is None:
        return scale, None
    return scale, torch.round(-lo / scale).clamp(0, spec.qmax).to(torch.uint8)


def quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Unpacked codes of fp32 `x` with `scale`/`zero` already broadcastable against it."""
    if spec.dtype == "fp8":
        return (x / scale).clamp(spec.qmin, spec.qmax).to(torch.float8_e4m3fn)
    q = torch.round(x / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8 if spec.symmetric else torch.uint8)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """fp32 `(q - zero) * scale` (or `q * scale`), the inverse of `quantize_values`."""
    q = q.float()
    if zero is not None:
        q = q - zero.float()
    return q * scale


def _params(x, spec, scale, zero):
    if scale is None:
        return compute_qparams(x, spec)
    want = qparam_shape(x.shape, spec)
    if tuple(scale.shape) != want or (zero is None) != spec.symmetric:
        raise ValueError(f"scale {tuple(scale.shape)} / zero do not fit a {want} {spec}")
    return scale.float(), zero


def quantize(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> QTensor:
    """Quantize `x [..., K]` with `spec`; the scale and zero are computed unless given (e.g. searched)."""
    scale, zero = _params(x, spec, scale, zero)
    k = x.shape[-1]
    q = quantize_values(x.float(), expand_qparams(scale, spec, k), expand_qparams(zero, spec, k), spec)
    if spec.bits == 4:
        q = pack_int4(q)
    return QTensor(q, scale, zero, spec, tuple(x.shape))


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = qt.shape[-1]
    q = unpack_int4(qt.codes, k, signed=qt.spec.symmetric) if qt.spec.bits == 4 else qt.codes
    out = dequantize_values(q, expand_qparams(qt.scale, qt.spec, k), expand_qparams(qt.zero, qt.spec, k))
    return out.to(dtype)


def fake_quantize(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize in `x`'s dtype (equal to `dequantize(quantize(x, spec))`, without packing)."""
    scale, zero = _params(x, spec, scale, zero)
    k = x.shape[-1]
    s, z = expand_qparams(scale, spec, k), expand_qparams(zero, spec, k)
    return dequantize_values(quantize_values(x.float(), s, z, spec), s, z).to(x.dtype)
