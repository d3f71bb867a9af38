"""The paged KV cache: one storage object per attention layer, addressed by slot (block * size + offset)."""
from __future__ import annotations

import torch

from lowbit.quant.kv import dequantize_kv, quantize_kv


class PagedKVCache:
    """Full-precision K/V blocks `[num_blocks, block_size, n_kv_heads, head_dim]`.

    `store` writes the new tokens' K/V at their slots; `gather` returns a sequence's K/V in order.
    Quantized caches implement the same two methods.
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device):
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        self.k.index_copy_(0, slots, k[keep].to(self.k.dtype))
        self.v.index_copy_(0, slots, v[keep].to(self.v.dtype))

    def gather(self, block_table: torch.Tensor, seq_len: int):
        slots = self.slots(block_table, seq_len)
        return self.k[slots], self.v[slots]

    def slots(self, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
        nb = -(-seq_len // self.block_size)
        offs = torch.arange(self.block_size, device=block_table.device)
        return (block_table[:nb, None].long() * self.block_size + offs).reshape(-1)[:seq_len]

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype, spec=None) -> int:
        """K and V bytes of one token in one layer (codes plus scales and zeros when quantized)."""
        if spec is None:
            return 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        groups = 1 if spec.group_size is None else head_dim // spec.group_size
        code_bytes = head_dim * spec.bits // 8
        return 2 * num_kv_heads * (code_bytes + groups * (4 + (0 if spec.fp8 else 1)))


class QuantizedPagedKVCache(PagedKVCache):
    """K/V stored as codes with a scale (and zero) per (token, head), quantized once when written."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, spec):
        self.block_size, self.spec, self.dtype = block_size, spec, dtype
        slots = num_blocks * block_size
        probe = torch.zeros(1, num_kv_heads, head_dim, device=device)
        codes, scale, zero = quantize_kv(probe, spec.bits, spec.group_size, spec.fp8)
        self.parts = {
            name: [torch.zeros((slots, *t.shape[1:]), dtype=t.dtype, device=device) for _ in range(2)]
            for name, t in (("codes", codes), ("scale", scale), ("zero", zero)) if t is not None
        }

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        for i, x in enumerate((k, v)):
            codes, scale, zero = quantize_kv(x[keep], self.spec.bits, self.spec.group_size, self.spec.fp8)
            for name, t in (("codes", codes), ("scale", scale), ("zero", zero)):
                if t is not None:
                    self.parts[name][i].index_copy_(0, slots, t)

    def gather(self, block_table: torch.Tensor, seq_len: int):
        slots = self.slots(block_table, seq_len)
        out = []
        for i in range(2):
            zero = self.parts["zero"][i][slots] if "zero" in self.parts else None
            out.append(dequantize_kv(self.parts["codes"][i][slots], self.parts["scale"][i][slots], zero,
                                     self.spec.bits, self.spec.group_size, self.spec.fp8, self.dtype))
        return out[0], out[1]
