"""Causal attention over a flat token batch, reading/writing the paged KV cache (torch reference).

The cache object (`engine/kv_cache.py`) owns the storage format: it quantizes on `store` and
dequantizes on `gather`, so this layer is the same for bf16, int8, int4 and fp8 caches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.layers.context import AttentionContext


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [Lq, Hq, D]; k, v: [Lk, Hk, D] with Lk >= Lq; query i sits at key position Lk - Lq + i."""
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    mask = None
    if lq > 1:
        qpos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        mask = torch.arange(lk, device=q.device)[None, :] <= qpos
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.kv_cache = None  # set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cu = ctx.cu_seqlens_q_list
        if ctx.uses_cache:
            self.kv_cache.store(k, v, ctx.slot_mapping)
        out = torch.empty_like(q)
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            if ctx.uses_cache:
                ki, vi = self.kv_cache.gather(ctx.block_tables[i], ctx.seq_lens_list[i])
            else:
                ki, vi = k[s:e], v[s:e]
            out[s:e] = causal_attention(q[s:e], ki, vi, self.scale)
        return out
