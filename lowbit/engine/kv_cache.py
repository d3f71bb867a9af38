"""The paged KV cache: one storage object per attention layer, addressed by slot (block * size + offset)."""
from __future__ import annotations

import torch


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
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
