"""The paged KV cache: one storage object per attention layer, addressed by slot (block * size + offset).

`PagedKVCache` (the model dtype) and `KernelKVCache` (int8 / int4 per (token, head)) keep the
layout of `kernels/paged_attention.py`, so decode attention is one kernel call over all sequences;
`QuantizedPagedKVCache` holds the other formats (groups within the head, fp8) for the torch path.
"""
from __future__ import annotations

import torch

from lowbit.kernels.paged_attention import kv_cache_write, paged_decode_attention, supports_head_dim
from lowbit.kernels.common import use_triton
from lowbit.kernels.kv_gather import gather_kv
from lowbit.kernels.paged_prefill import paged_prefill_attention_triton
from lowbit.kernels.reference import at_slots, kv_values
from lowbit.quant.kv import dequantize_kv, quantize_kv


class PagedKVCache:
    """Full-precision K/V blocks `[num_blocks, n_kv_heads, block_size, head_dim]` (head-major, as the kernels read them).

    `store` writes the new tokens' K/V at their slots; `gather` returns a sequence's K/V in order;
    `decode` (when `decode_kernel`) attends one query token per sequence over the cache, `prefill`
    several (chunks over a cached context).
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.block_size, self.head_dim, self.dtype = block_size, head_dim, dtype
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.k_sz = self.v_sz = None  # scale and zero pairs of a quantized cache

    @property
    def decode_kernel(self) -> bool:
        """Whether `decode` runs: the kernel reads 16-bit values (fp32 caches keep the torch path)."""
        return self.dtype in (torch.bfloat16, torch.float16) and supports_head_dim(self.head_dim)

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, echo: bool = False):
        """Write the new tokens' K/V `[T, n_kv_heads, head_dim]` at their slots (-1: skip); with
        `echo`, return every row's K/V as the cache holds them (what `read` would give back)."""
        return kv_cache_write(k, v, self.k, self.v, self.k_sz, self.v_sz, slot_mapping, echo)

    def gather(self, block_table: torch.Tensor, seq_len: int):
        """A sequence's first `seq_len` K/V, in order, as the model dtype."""
        return self.read(self.slots(block_table, seq_len))

    def read(self, slots: torch.Tensor):
        """K/V at the cache slots `slots` `[N]` -> two `[N, n_kv_heads, head_dim]` in the model dtype."""
        if self.k_sz is None:
            return self.k[at_slots(self.k, slots)], self.v[at_slots(self.v, slots)]
        return (kv_values(self.k, self.k_sz, slots, self.head_dim).to(self.dtype),
                kv_values(self.v, self.v_sz, slots, self.head_dim, self.v_tokens_packed).to(self.dtype))

    def decode(self, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               max_seq_len: int | None) -> torch.Tensor:
        """q `[B, n_heads, head_dim]`, one token per sequence -> attention output, one kernel launch."""
        return paged_decode_attention(q, self.k, self.v, self.k_sz, self.v_sz, block_tables, seq_lens,
                                      scale, max_seq_len)

    @property
    def prefill_kernel(self) -> bool:
        """Whether `prefill` runs: the kernel layout on CUDA (elsewhere chunks attend one at a time
        over `gather`, as over the generic caches, so both give the same numbers)."""
        return self.decode_kernel and use_triton(self.k)

    def prefill(self, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                cu_seqlens_q: torch.Tensor, seqs: torch.Tensor, max_q_len: int, scale: float,
                out: torch.Tensor) -> None:
        """The new tokens of the sequences `seqs` (int32, batch indices) attend causally over the
        cache, into their rows of `out`; one kernel launch (when `prefill_kernel`)."""
        paged_prefill_attention_triton(q, self.k, self.v, self.k_sz, self.v_sz, block_tables, seq_lens,
                                       cu_seqlens_q, seqs, max_q_len, scale, out)

    def gather_batch(self, block_tables: torch.Tensor, seqs: torch.Tensor, cu_k: torch.Tensor, k_lens: list[int],
                     dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Several sequences' K/V as packed rows in `dtype` (`kernels.kv_gather.gather_kv`): sequence
        `seqs[i]`'s first `k_lens[i]` positions at rows `cu_k[i]` on; one pass on CUDA."""
        return gather_kv(self.k, self.v, self.k_sz, self.v_sz, block_tables, seqs, cu_k, max(k_lens), sum(k_lens),
                         self.head_dim, dtype)

    def slots(self, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
        nb = -(-seq_len // self.block_size)
        offs = torch.arange(self.block_size, device=block_table.device)
        return (block_table[:nb, None].long() * self.block_size + offs).reshape(-1)[:seq_len]

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype, spec=None) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class KernelKVCache(PagedKVCache):
    """Asymmetric int8 / int4 codes per (token, head) in the kernels' layout: codes uint8
    `[num_blocks, n_kv_heads, block_size, head_dim (or / 2)]` (int4's V packed along the tokens instead:
    `[num_blocks, n_kv_heads, head_dim, block_size / 2]`; int4 rows' bytes `reference.swizzle`d), fp16
    (scale, zero) pairs `[num_blocks, n_kv_heads, block_size, 2]` (the kernels read a pair as one 32-bit
    word). Same numbers as `QuantizedPagedKVCache` (quant/kv.py)."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, spec):
        self.block_size, self.head_dim, self.dtype = block_size, head_dim, dtype
        shape = (num_blocks, num_kv_heads, block_size)
        self.k = torch.zeros(*shape, head_dim * spec.bits // 8, dtype=torch.uint8, device=device)
        self.v_tokens_packed = spec.bits == 4
        v_shape = (num_blocks, num_kv_heads, head_dim, block_size // 2) if self.v_tokens_packed else self.k.shape
        self.v = torch.zeros(v_shape, dtype=torch.uint8, device=device)
        self.k_sz, self.v_sz = (torch.zeros(*shape, 2, dtype=torch.float16, device=device) for _ in range(2))

    @property
    def decode_kernel(self) -> bool:
        return True

    @staticmethod
    def fits(spec, head_dim: int, block_size: int) -> bool:
        """int4's token-packed V wants blocks of a power of two tokens, >= 8: a dim's run of a block holds
        whole 4-byte words (two tokens a byte), which its swizzle permutes within (`reference.swizzle`)."""
        return (spec.bits in (4, 8) and spec.group_size is None and not spec.fp8 and supports_head_dim(head_dim)
                and (spec.bits == 8 or (block_size >= 8 and block_size & (block_size - 1) == 0)))

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype, spec=None) -> int:
        return 2 * num_kv_heads * (head_dim * spec.bits // 8 + 4)  # codes, fp16 scale and zero


class QuantizedPagedKVCache(PagedKVCache):
    """K/V stored as codes with a scale (and zero) per (token, head) or group, quantized once when written."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, spec):
        self.block_size, self.head_dim, self.spec, self.dtype = block_size, head_dim, spec, dtype
        slots = num_blocks * block_size
        probe = torch.zeros(1, num_kv_heads, head_dim, device=device)
        codes, scale, zero = quantize_kv(probe, spec.bits, spec.group_size, spec.fp8)
        self.parts = {  # scales in fp16: the values quant/kv.py makes
            name: [torch.zeros((slots, *t.shape[1:]), dtype=torch.float16 if name == "scale" else t.dtype,
                               device=device) for _ in range(2)]
            for name, t in (("codes", codes), ("scale", scale), ("zero", zero)) if t is not None
        }

    @property
    def decode_kernel(self) -> bool:
        return False

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, echo: bool = False):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        held = []
        for i, x in enumerate((k, v)):
            codes, scale, zero = quantize_kv(x, self.spec.bits, self.spec.group_size, self.spec.fp8)
            for name, t in (("codes", codes), ("scale", scale), ("zero", zero)):
                if t is not None:
                    self.parts[name][i][slots] = t[keep].to(self.parts[name][i].dtype)  # index_copy_: no CPU fp8
            if echo:
                held.append(dequantize_kv(codes, scale, zero, self.spec.bits, self.spec.group_size,
                                          self.spec.fp8, self.dtype))
        return tuple(held) if echo else None

    def read(self, slots: torch.Tensor):
        out = []
        for i in range(2):
            zero = self.parts["zero"][i][slots] if "zero" in self.parts else None
            out.append(dequantize_kv(self.parts["codes"][i][slots], self.parts["scale"][i][slots].float(), zero,
                                     self.spec.bits, self.spec.group_size, self.spec.fp8, self.dtype))
        return out[0], out[1]

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype, spec=None) -> int:
        groups = 1 if spec.group_size is None else head_dim // spec.group_size
        code_bytes = head_dim * spec.bits // 8
        return 2 * num_kv_heads * (code_bytes + groups * (2 + (0 if spec.fp8 else 1)))


def kv_cache_class(spec, head_dim: int, block_size: int) -> type[PagedKVCache]:
    """The cache for a layer's KV format (`quant.recipes.KVSpec`, None: the model dtype)."""
    if spec is None:
        return PagedKVCache
    return KernelKVCache if KernelKVCache.fits(spec, head_dim, block_size) else QuantizedPagedKVCache


def make_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device,
                  spec=None) -> PagedKVCache:
    args = (num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    cls = kv_cache_class(spec, head_dim, block_size)
    return cls(*args) if spec is None else cls(*args, spec)
