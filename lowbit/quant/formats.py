"""Quantized formats: the numerics contract every kernel implements (see docs/architecture.md)."""
from __future__ import annotations

import torch


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
