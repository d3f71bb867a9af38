"""A batch of sequences' cached K/V as packed rows of values: what flash attention over a cached
context reads (a prompt's later chunks, a prompt whose prefix the cache already holds).

`gather_kv` reads each listed sequence's first `seq_len` cache positions through its block table,
from any of the layouts of `paged_attention.py` (16-bit values, int8 / int4 codes with per (token,
head) scale and zero, int4 V packed along the tokens), and writes them back to back `[total, n_kv_heads,
head_dim]` in the activations' dtype, `(c - z) * s` as the reference computes it. One pass over the
codes: flash attention then reads each value once per query tile in 16 bits, where a kernel over the
codes widens every K/V tile again for each query tile (docs/benchmarks.md: the paged prefill kernel at
0.14-0.21x SDPA over bf16 values).
"""
from __future__ import annotations

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import cdiv, tl, triton, use_triton
from lowbit.kernels.paged_attention import _scale_zero, _swizzle, kv_bits, sz_words

TOKENS_PER_PROGRAM = 32


def gather_kv_triton(k_cache, v_cache, k_sz, v_sz, block_tables, seqs, cu_k, max_k: int, total: int, head_dim: int,
                     dtype):
    _, hkv, bs, _ = k_cache.shape
    d, bits = head_dim, kv_bits(k_cache, head_dim)
    out = [torch.empty(total, hkv, d, dtype=dtype, device=k_cache.device) for _ in range(2)]
    if total == 0:
        return out[0], out[1]
    grid = (cdiv(max_k, TOKENS_PER_PROGRAM), seqs.numel(), hkv)
    for cache, sz, rows, packed in ((k_cache, k_sz, out[0], False),
                                    (v_cache, v_sz, out[1], reference.v_tokens_packed(k_cache, d))):
        _gather_kernel[grid](cache, sz_words(sz), block_tables, seqs, cu_k, rows, block_tables.stride(0), HKV=hkv, D=d,
                             BS=bs, BITS=bits, TOKENS_PACKED=packed, BT=TOKENS_PER_PROGRAM, num_warps=4)
    return out[0], out[1]


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_sz: torch.Tensor | None, v_sz: torch.Tensor | None,
              block_tables: torch.Tensor, seqs: torch.Tensor, cu_k: torch.Tensor, max_k: int, total: int,
              head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached K and V of the sequences `seqs` (int32 `[S]`, indices into `block_tables` `[B, max_blocks]`),
    `[total, n_kv_heads, head_dim]` each in `dtype`: sequence i's `cu_k[i + 1] - cu_k[i]` first positions at
    rows `cu_k[i]` on (cu_k int32 `[S + 1]`; max_k: the longest; total: `cu_k[-1]`, both host ints)."""
    if use_triton(k_cache):
        return gather_kv_triton(k_cache, v_cache, k_sz, v_sz, block_tables, seqs, cu_k, max_k, total, head_dim, dtype)
    return reference.gather_kv(k_cache, v_cache, k_sz, v_sz, block_tables, seqs, cu_k, max_k, total, head_dim, dtype)


@triton.jit
def _gather_kernel(cache_ptr, sz_ptr, bt_ptr, seqs_ptr, cu_ptr, out_ptr, stride_bt, HKV: tl.constexpr,
                   D: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, TOKENS_PACKED: tl.constexpr,
                   BT: tl.constexpr):
    """BT positions of one listed sequence and kv head -> their rows. A code is read from its byte
    (int4: a dim's nibble in a token's row, or a token's nibble in a dim's run of V^T) and shifted."""
    i = tl.program_id(1)
    h = tl.program_id(2)
    s = tl.load(seqs_ptr + i)
    first = tl.load(cu_ptr + i)
    n = tl.load(cu_ptr + i + 1) - first
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = t < n
    blk = tl.load(bt_ptr + s * stride_bt + t // BS, mask=ok, other=0).to(tl.int64)
    row = (blk * HKV + h) * BS + t % BS  # the (token, head) row of a head-major block
    offs_d = tl.arange(0, D)
    if BITS == 16:
        x = tl.load(cache_ptr + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        if TOKENS_PACKED:  # V^T: a dim's codes of tokens 2j, 2j + 1 in byte j of its run (swizzled)
            byte = tl.load(cache_ptr + ((blk * HKV + h) * D)[:, None] * (BS // 2) + offs_d[None, :] * (BS // 2)
                           + _swizzle(t % BS // 2)[:, None], mask=ok[:, None], other=0)
            c = (byte >> (4 * (t % 2)).to(tl.uint8)[:, None]) & 15
        elif BITS == 4:  # dims 2j, 2j + 1 of a token in byte j of its row (swizzled)
            byte = tl.load(cache_ptr + row[:, None] * (D // 2) + _swizzle(offs_d // 2)[None, :], mask=ok[:, None],
                           other=0)
            c = (byte >> (4 * (offs_d % 2)).to(tl.uint8)[None, :]) & 15
        else:
            c = tl.load(cache_ptr + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0)
        scale, zero = _scale_zero(sz_ptr, row, ok)
        x = (c.to(tl.float32) - zero[:, None]) * scale[:, None]
    tl.store(out_ptr + ((first + t) * HKV + h)[:, None].to(tl.int64) * D + offs_d[None, :],
             x.to(out_ptr.dtype.element_ty), mask=ok[:, None])
