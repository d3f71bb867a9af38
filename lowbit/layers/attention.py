"""Causal attention over a flat token batch, reading/writing the paged KV cache.

The cache object (`engine/kv_cache.py`) owns the storage format: it quantizes on `store` and
dequantizes on `read` / `gather`, so this layer is the same for bf16, int8, int4 and fp8 caches.
Sequences with one new token run the cache's decode kernel together (when it has one); fresh prompts
(nothing cached before them) attend together over their K/V as the cache holds them (echoed by
the write, so nothing is read back): SDPA over views of runs of equal length (cuDNN only for shapes
that recur, `layers/context.py`), else varlen flash attention on CUDA, padded SDPA elsewhere; chunks
over a cached context (the kernel-layout caches on CUDA) attend together by varlen flash attention
over their contexts gathered into 16-bit rows (the cache's prefill kernel in 32 bits), or one sequence
at a time over what the cache hands back.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

from lowbit.layers.context import AttentionContext
from lowbit.quant.kv import kv_roundtrip
from lowbit.quant.rotate import apply_hadamard


def repeat_kv(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """GQA: each kv head serves `heads / x.shape[dim]` consecutive query heads."""
    return x if x.shape[dim] == heads else x.repeat_interleave(heads // x.shape[dim], dim=dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [Lq, Hq, D]; k, v: [Lk, Hk, D] with Lk >= Lq; query i sits at key position Lk - Lq + i."""
    lq, hq, _ = q.shape
    lk = k.shape[0]
    k, v = repeat_kv(k, hq, 1), repeat_kv(v, hq, 1)
    # no materialized mask: a boolean one sends SDPA to its fp32 math path on CUDA (10x slower
    # than flash for a 1k prompt); the lower-right causal bias keeps the flash/efficient kernels
    causal = {"is_causal": True} if lq == lk else {"attn_mask": causal_lower_right(lq, lk)} if lq > 1 else {}
    # [1, H, L, D]: SDPA's fused kernels take only 4-D inputs (3-D ones always run the fp32 math path)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **causal)[0].transpose(0, 1)


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
                            pad_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Sequences of `lens` tokens (back to back in q, k, v) that each attend causally to themselves
    (fresh prompts, perplexity, calibration, scoring): one SDPA call over the sequences padded on
    the right to the longest (`pad_index`: `context.padding_index(lens)`). Under a causal mask a real query
    never sees the padding after it, so no other mask is needed."""
    b, n = len(lens), max(lens)

    def pad(x):
        out = x.new_zeros(b * n, *x.shape[1:])
        out[pad_index] = x
        return out.view(b, n, *x.shape[1:]).transpose(1, 2)  # [B, H, n, D]

    qp = pad(q)
    kp, vp = repeat_kv(pad(k), qp.shape[1], 1), repeat_kv(pad(v), qp.shape[1], 1)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(b * n, *q.shape[1:])[pad_index]


def _varlen_kwargs() -> dict | None:
    """Keyword arguments that make `varlen_attn` causal with GQA on this torch (None: unusable).
    torch 2.10-2.11 take `window_size` and read GQA from the shapes; later ones ask for `enable_gqa`."""
    params = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
    if "window_size" not in params:
        return None
    return {"window_size": (-1, 0), **({"enable_gqa": True} if "enable_gqa" in params else {})}


_VARLEN = _varlen_kwargs()


_UNPLANNED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


def _run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, run, scale: float):
    """One SDPA call over a run of equal-length sequences, their packed rows viewed `[B, H, L, D]`
    (no copy in); the result lands in its rows of `out`. A run whose shape is not `planned`
    (`ShapeHistory`) keeps cuDNN out, so no execution plan is built for it."""
    start, b, n, planned = run
    rows = slice(start, start + b * n)
    qv, kv, vv = (x[rows].view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    with contextlib.nullcontext() if planned else sdpa_kernel(_UNPLANNED):
        o = F.scaled_dot_product_attention(qv, kv, vv, is_causal=True, scale=scale, enable_gqa=True)
    out[rows].view(b, n, *q.shape[1:]).copy_(o.transpose(1, 2))


def fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                    scale: float) -> torch.Tensor:
    """The fresh sequences of `ctx` (`fresh_lens` tokens each, back to back in q `[T, Hq, D]` and
    k, v `[T, Hkv, D]`), each attending causally to itself. Where they are at most MAX_VIEW_RUNS runs
    of equal length (a batch of same-length prompts and a chunk), one SDPA call per run over views of
    the rows: on the H200 cuDNN's kernel took 337 us for 16 prompts of 1024 where varlen flash attention
    took about 590 (docs/benchmarks.md), for shapes that recur (`ShapeHistory`). Otherwise, on CUDA in
    16 bits, flash attention over the packed rows (`varlen_attn`: no padding, GQA in the kernel);
    elsewhere one padded SDPA call."""
    runs = ctx.fresh_runs
    if runs is not None:
        out = torch.empty_like(q)
        for run in runs:
            _run_attention(q, k, v, out, run, scale)
        return out
    if _varlen_serves(q, k.dtype):
        n = max(ctx.fresh_lens)
        return varlen_attn(q, k, v, ctx.fresh_cu, ctx.fresh_cu, n, n, scale=scale, **_VARLEN)
    return padded_causal_attention(q, k, v, ctx.fresh_lens, ctx.fresh_pad, scale)


def _varlen_serves(q: torch.Tensor, kv_dtype: torch.dtype) -> bool:
    """Whether varlen flash attention takes these operands: CUDA, 16 bits, a head_dim it compiles."""
    return (_VARLEN is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and kv_dtype == q.dtype
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def chunk_attention(q: torch.Tensor, cache, ctx: AttentionContext, scale: float, out: torch.Tensor) -> None:
    """The chunks of `ctx` (new tokens over a cached context, already written) attend causally to all the
    cache holds for them, into their rows of `out`. In 16 bits on CUDA: their contexts gathered once into
    packed rows of values (`cache.gather_batch`), then one varlen flash-attention call, whose causal mask
    is aligned to the last key (new token i of n sees the first L - n + i + 1 of L positions); else
    the cache's prefill kernel over its codes (one launch)."""
    cu = ctx.cu_seqlens_q_list
    max_q = max(cu[i + 1] - cu[i] for i in ctx.chunk_seqs)
    if not _varlen_serves(q, q.dtype):
        cache.prefill(q, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q, ctx.chunk_index, max_q, scale, out)
        return
    k, v = cache.gather_batch(ctx.block_tables, ctx.chunk_index, ctx.chunk_cu_k, ctx.chunk_k_lens, q.dtype)
    rows = ctx.chunk_rows
    out[rows] = varlen_attn(q[rows], k, v, ctx.chunk_cu_q, ctx.chunk_cu_k, max_q, max(ctx.chunk_k_lens), scale=scale,
                            **_VARLEN)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.kv_cache = None  # set by the model runner
        self.kv_spec = None  # a quantized KV format (quant.recipes.KVSpec), set by a recipe
        self.rotate_kv = False  # Hadamard over head_dim on q and k (QuaRot): q.k unchanged, keys flatter

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cu = ctx.cu_seqlens_q_list
        if self.rotate_kv:
            q, k = apply_hadamard(q), apply_hadamard(k)
        if not ctx.uses_cache:
            if self.kv_spec is not None:  # what a quantized cache would hand back
                k, v = kv_roundtrip(k, self.kv_spec), kv_roundtrip(v, self.kv_spec)
            return fresh_attention(q, k, v, ctx, self.scale)
        cache = self.kv_cache
        held = cache.store(k, v, ctx.slot_mapping, echo=bool(ctx.fresh_seqs))
        decodes = ctx.decode_seqs if cache.decode_kernel else None
        if decodes and ctx.decode_only:  # no host data read: CUDA-graph safe
            return cache.decode(q, ctx.block_tables, ctx.seq_lens, self.scale, ctx.max_seq_len)
        if ctx.fresh_seqs and len(ctx.fresh_seqs) == len(cu) - 1:  # fresh prompts only
            return fresh_attention(q, held[0].to(q.dtype), held[1].to(q.dtype), ctx, self.scale)
        out = torch.empty_like(q)
        if decodes:
            rows, seqs = ctx.decode_rows, ctx.decode_index
            out[rows] = cache.decode(q[rows], ctx.block_tables[seqs], ctx.seq_lens[seqs], self.scale,
                                     ctx.max_seq_len)
        if ctx.fresh_seqs:  # nothing cached before them: their own K/V as the cache holds them, one call
            rows = ctx.fresh_rows
            out[rows] = fresh_attention(q[rows], held[0][rows].to(q.dtype), held[1][rows].to(q.dtype), ctx,
                                        self.scale)
        if cache.prefill_kernel:  # chunks over cached context: all of them at once
            if ctx.chunk_seqs:
                chunk_attention(q, cache, ctx, self.scale, out)
            return out
        done = set(decodes or ()) | set(ctx.fresh_seqs or ())
        for i in range(len(cu) - 1):
            if i not in done:  # one at a time over what the cache hands back (the numbers decode sees)
                s, e = cu[i], cu[i + 1]
                ki, vi = cache.gather(ctx.block_tables[i], ctx.seq_lens_list[i])
                out[s:e] = causal_attention(q[s:e], ki, vi, self.scale)
        return out
