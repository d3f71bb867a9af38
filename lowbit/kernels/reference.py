"""Torch references: one per kernel, with the kernel's signature, on any device.

They read the same prepared layouts as the kernels and compute in fp32 from the codes, scales and
zeros, so they define what each kernel must return (up to accumulation order).
"""
from __future__ import annotations

import torch

from lowbit.kernels.common import KBLOCK, unpack_halves
from lowbit.quant.formats import QuantSpec, quantize, unpack_int4
from lowbit.quant.linear_method import OUTLIER_ACT
from lowbit.quant.kv import quantize_kv


def _per_group(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Group-major `[n_groups, N]` -> per element `[N, k]`."""
    return t.t().repeat_interleave(group, dim=1)[:, :k]


def w4a8_weight(w) -> torch.Tensor:
    """The int8 weight `[N, K]` a `W4A8Weight` stands for (`q8`; times `s1` is the real weight)."""
    codes = unpack_halves(w.qweight)[:, :w.k].to(torch.int16)
    if w.zs is None:
        return (codes - 8).to(torch.int8)
    zs = _per_group(w.zs, KBLOCK, w.k)
    s2, z2 = ((zs >> 8) & 0xFF).to(torch.int16), (zs & 0xFF).to(torch.int16)
    return ((codes - z2) * s2).to(torch.int8)


def w4a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w) -> torch.Tensor:
    acc = x_q.float() @ w4a8_weight(w).float().t()
    return (acc * x_scale.float()[:, None] * w.s1[None, :]).to(torch.bfloat16)


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w) -> torch.Tensor:
    acc = x_q.float() @ w.qweight.float().t()
    return (acc * x_scale.float()[:, None] * w.scale[None, :]).to(torch.bfloat16)


def w4a16_weight(w) -> torch.Tensor:
    """The fp32 weight `[N, K]` a `W4A16Weight` stands for."""
    codes = unpack_halves(w.qweight)[:, :w.k].float()
    return (codes - _per_group(w.zeros, w.group, w.k).float()) * _per_group(w.scales, w.group, w.k)


def w4a16_gemm(x: torch.Tensor, w) -> torch.Tensor:
    return (x.float() @ w4a16_weight(w).t()).to(torch.bfloat16)


def w4a4_gemm(x4: torch.Tensor, xs4: torch.Tensor, x8: torch.Tensor, xs8: torch.Tensor, w) -> torch.Tensor:
    k4 = w.k4
    xd = unpack_int4(x4, k4, signed=True).float() * xs4.float().repeat_interleave(128, dim=1)[:, :k4]
    wd = unpack_int4(w.w4, k4, signed=True).float() * _per_group(w.ws4, 128, k4)
    out = xd @ wd.t() + (x8.float() * xs8.float()[:, None]) @ (w.w8.float() * w.ws8[:, None]).t()
    return out.to(torch.bfloat16)


def rmsnorm(x, weight, eps, residual=None):
    """Hugging Face's LlamaRMSNorm: normalized in fp32, rounded to x's dtype, times the weight.
    With a residual, the norm of h = x + residual (rounded to x's dtype, as the model's add was),
    -> (out, h)."""
    h = x if residual is None else (x + residual).to(x.dtype)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * hf.to(x.dtype)
    return out if residual is None else (out, h)


def silu_mul(x):
    """x `[T, 2I]` = [gate | up] -> SiLU(gate) * up, as the Llama MLP computes it."""
    gate, up = x.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(positions, q, k, inv_freq):
    """Hugging Face's rotate-half rotary embedding (cos and sin rounded to q's dtype)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _quantize_rows(y: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype):
    fp8 = out_dtype == torch.float8_e4m3fn
    scale = amax / (448.0 if fp8 else 127.0)
    v = torch.where(scale[:, None] > 0, y / torch.where(scale > 0, scale, 1.0)[:, None], 0.0)
    q = v.clamp(-448.0, 448.0).to(out_dtype) if fp8 else torch.round(v.clamp(-128.0, 127.0)).to(torch.int8)
    return q, scale


def rmsnorm_quant(x, weight, eps, residual=None, perm=None, out_dtype=torch.int8):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    amax = y.abs().amax(-1)
    q, scale = _quantize_rows(y if perm is None else y[:, perm.long()], amax, out_dtype)
    return (q, scale) if residual is None else (q, scale, h)


def silu_mul_quant(x, out_dtype=torch.int8):
    gate, up = x.float().chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    return _quantize_rows(y, y.abs().amax(-1), out_dtype)


def group_quant(x, perm, k4, clip, k_out):
    if perm is not None:
        x = x[:, perm.long()]
    q4 = quantize(x[:, :k4], QuantSpec(bits=4, granularity="group", clip=clip))
    if not k_out:
        return q4.codes, q4.scale, x.new_zeros(x.shape[0], 0, dtype=torch.int8), q4.scale.new_ones(x.shape[0])
    q8 = quantize(x[:, k4:], OUTLIER_ACT)
    return q4.codes, q4.scale, q8.codes, q8.scale


def quant_per_token(x, out_dtype=torch.int8):
    y = x.float()
    return _quantize_rows(y, y.abs().amax(-1), out_dtype)


def at_slots(cache: torch.Tensor, slots: torch.Tensor) -> tuple:
    """The index of cache slots `slots` `[N]` (block * block_size + offset) in a head-major cache
    `[num_blocks, n_kv_heads, block_size, ...]`: `cache[at_slots(cache, slots)]` is `[N, n_kv_heads, ...]`."""
    bs = cache.shape[2]
    return slots // bs, slice(None), slots % bs


def swizzle(j: torch.Tensor) -> torch.Tensor:
    """Where byte j of an int4 row (a token's K, a dim's V^T run) lies: the middle two of every four
    bytes swap (memory holds bytes 0, 2, 1, 3), so that one shift and four masks widen a 32-bit word
    into the fp16 pairs the MMAs take, in order (`paged_attention._INT4_FP16_ASM`; Marlin's trick).
    Its own inverse: byte j lies at swizzle(j), and position m holds byte swizzle(m)."""
    return (j & ~3) | ((j & 1) << 1) | ((j >> 1) & 1)


def v_tokens_packed(k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the V cache beside `k_cache` packs its int4 codes along the tokens: an int4 cache's V is
    `[num_blocks, n_kv_heads, head_dim, block_size / 2]`, a dim's codes of tokens 2j and 2j + 1 in the low
    and high nibble of byte j (K, and int8 V, keep a token's dims together: `[..., block_size, width]`)."""
    return k_cache.dtype == torch.uint8 and k_cache.shape[-1] * 2 == head_dim


def codes_at(cache: torch.Tensor, slots: torch.Tensor, tokens_packed: bool = False, int4: bool = False) -> torch.Tensor:
    """What the cache holds at slots `[N]`: `[N, n_kv_heads, width]` (codes, packed as `pack_int4` packs
    them when `int4`, or 16-bit values); a token-packed cache gives each slot's codes unpacked,
    `[N, n_kv_heads, head_dim]`. int4 bytes lie `swizzle`d in memory."""
    if not tokens_packed:
        held = cache[at_slots(cache, slots)]
        return held[..., swizzle(torch.arange(held.shape[-1], device=held.device))] if int4 else held
    bs = cache.shape[-1] * 2
    byte = cache[slots // bs, :, :, swizzle(slots % bs // 2)]
    return (byte >> (4 * (slots % 2)).to(torch.uint8)[:, None, None]) & 15


def store_codes(cache: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, tokens_packed: bool = False,
                int4: bool = False) -> None:
    """`codes_at`'s inverse: codes `[N, n_kv_heads, width]` (unpacked `[N, n_kv_heads, head_dim]` for a
    token-packed cache) into slots `[N]`. A token-packed byte's two slots may both be written: the even
    slots' nibbles first, then the odd ones', each keeping the other nibble."""
    if not tokens_packed:
        cache[at_slots(cache, slots)] = codes[..., swizzle(torch.arange(codes.shape[-1], device=codes.device))] \
            if int4 else codes
        return
    bs = cache.shape[-1] * 2
    for parity in (0, 1):
        sel = slots % 2 == parity
        s = slots[sel]
        at = (s // bs, slice(None), slice(None), swizzle(s % bs // 2))
        cache[at] = (cache[at] & (0xF0 >> 4 * parity)) | (codes[sel] << 4 * parity)


def check_pairs_adjacent(slot_mapping: torch.Tensor) -> None:
    """The Triton write's contract for a token-packed cache: two rows whose slots share a byte (2j and 2j + 1
    of one block) are neighbours in `slot_mapping` (as a sequence's consecutive tokens are), else only
    one of them is written in the call. The engine's slot mappings keep it; this checks one."""
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    slots, order = slot_mapping[rows].long().sort()
    rows = rows[order]
    pair = (slots[:-1] % 2 == 0) & (slots[1:] == slots[:-1] + 1)
    if (pair & ((rows[1:] - rows[:-1]).abs() != 1)).any():
        raise ValueError("kv_cache_write: two slots of one int4 V byte are written by rows that are not neighbours")


def kv_cache_write(key, value, k_cache, v_cache, k_sz, v_sz, slot_mapping, echo=False):
    d = key.shape[-1]
    packed_v = v_tokens_packed(k_cache, d)  # an int4 cache
    bits = 4 if packed_v else 8
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if packed_v:
        check_pairs_adjacent(slot_mapping)
    echoed = []
    for x, cache, sz, packed in ((key, k_cache, k_sz, False), (value, v_cache, v_sz, packed_v)):
        if sz is None:  # a 16-bit cache: the values themselves
            cache[at_slots(cache, slots)] = x[keep].to(cache.dtype)
            echoed.append(x.to(cache.dtype))
            continue
        q, s, z = quantize_kv(x.float(), bits)  # the numerics contract: quant/kv.py
        qsz = torch.stack((s, z.float()), dim=-1)
        store_codes(cache, slots, unpack_int4(q[keep], d, signed=False) if packed else q[keep], packed, bits == 4)
        sz[at_slots(sz, slots)] = qsz[keep].to(sz.dtype)  # fp16 values: exact
        echoed.append(kv_dequant(q, qsz, d).to(x.dtype))
    return tuple(echoed) if echo else None


def kv_dequant(cache: torch.Tensor, sz: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """Codes `[..., n_kv_heads, head_dim or head_dim/2]` with their (scale, zero) -> fp32 values
    (sz None: the cache holds the values)."""
    if sz is None:
        return cache.float()
    q = cache if cache.shape[-1] == head_dim else unpack_int4(cache, head_dim, signed=False)
    sz = sz.float()
    return (q.float() - sz[..., 1:]) * sz[..., :1]


def kv_values(cache: torch.Tensor, sz: torch.Tensor | None, slots: torch.Tensor, head_dim: int,
              tokens_packed: bool = False) -> torch.Tensor:
    """fp32 K or V `[N, n_kv_heads, head_dim]` at cache slots `[N]`."""
    int4 = cache.dtype == torch.uint8 and cache.shape[-1] * 2 == head_dim
    return kv_dequant(codes_at(cache, slots, tokens_packed, int4), None if sz is None else sz[at_slots(sz, slots)],
                      head_dim)


def cached_kv(k_cache, v_cache, k_sz, v_sz, block_table, n: int, head_dim: int):
    """A sequence's first `n` cache positions (block table `[max_blocks]`) -> fp32 K, V `[n, n_kv_heads, head_dim]`."""
    bs = k_cache.shape[2]
    t = torch.arange(n, device=k_cache.device)
    slots = block_table[t // bs].long() * bs + t % bs
    return (kv_values(k_cache, k_sz, slots, head_dim),
            kv_values(v_cache, v_sz, slots, head_dim, v_tokens_packed(k_cache, head_dim)))


def gather_kv(k_cache, v_cache, k_sz, v_sz, block_tables, seqs, cu_k, max_k, total, head_dim, dtype):
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    parts = [cached_kv(k_cache, v_cache, k_sz, v_sz, block_tables[s], n, head_dim) for s, n in zip(seqs.tolist(), lens)]
    hkv = k_cache.shape[1]
    empty = k_cache.new_empty(0, hkv, head_dim, dtype=torch.float32)
    return tuple(torch.cat([p[i] for p in parts] or [empty]).to(dtype) for i in range(2))


def paged_decode_attention(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens, scale,
                           max_seq_len=None) -> torch.Tensor:
    b, hq, d = q.shape
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    for i in range(b):
        k, v = (x.repeat_interleave(hq // k_cache.shape[1], dim=1)  # [n, hq, d]
                for x in cached_kv(k_cache, v_cache, k_sz, v_sz, block_tables[i], int(seq_lens[i]), d))
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v)
    return out


def paged_prefill_attention(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens, cu_seqlens_q, seqs, scale,
                            out) -> torch.Tensor:
    hq, d = q.shape[1], q.shape[2]
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i in seqs.tolist():
        a, e, n = cu[i], cu[i + 1], lens[i]
        k, v = (x.repeat_interleave(hq // k_cache.shape[1], dim=1)
                for x in cached_kv(k_cache, v_cache, k_sz, v_sz, block_tables[i], n, d))
        scores = torch.einsum("qhd,nhd->hqn", q[a:e].float(), k) * scale
        pos = torch.arange(n - (e - a), n, device=q.device)  # the new tokens' cache positions
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > pos[:, None], float("-inf"))
        out[a:e] = torch.einsum("hqn,nhd->qhd", torch.softmax(scores, dim=-1), v).to(out.dtype)
    return out


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """h * c mod 2^32 for int64 h in [0, 2^32), without int64 overflow (16-bit halves of c)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def race_noise(stream: torch.Tensor, pos: torch.Tensor, vocab: int) -> torch.Tensor:
    """Each row's uniforms in (0, 1) `[B, vocab]`: a hash of (stream, pos, vocabulary index)."""
    key = fmix32((stream.long() & _M32) ^ fmix32(pos.long() & _M32))
    x = fmix32(fmix32(torch.arange(vocab, device=stream.device))[None, :] ^ key[:, None])
    return ((x >> 9) * 2 + 1).float() * 2.0 ** -24


def race_sample(logits, scale, noise, stream, pos):
    u = race_noise(stream, pos, logits.shape[-1])
    k = scale[:, None] * logits.float() + noise[:, None] * -torch.log(-torch.log(u))
    return k.argmax(-1)
