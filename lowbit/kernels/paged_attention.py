"""Paged KV cache with asymmetric int8 / int4 codes (or 16-bit values): the write and decode attention.

Cache layout (one set for K, one for V), head-major within a block: a (block, kv head)'s tokens
are one contiguous run (int4, block size 16: 1 KB of codes), which the decode kernel reads about
10% faster than 64-byte pieces a token's heads apart (batch 64, H200; docs/benchmarks.md):
- codes uint8 `[num_blocks, n_kv_heads, block_size, head_dim]` (int8), or for int4: K
  `[num_blocks, n_kv_heads, block_size, head_dim / 2]` (`pack_int4` order along head_dim) and V
  `[num_blocks, n_kv_heads, head_dim, block_size / 2]`, packed along the tokens (a dim's codes of
  tokens 2j and 2j + 1 in the low and high nibble of byte j: `reference.v_tokens_packed`), so that
  the P.V product, which runs along the tokens, takes its operand pairs straight from one byte; both
  int4 rows (a token's K bytes, a dim's V run) hold every 4 bytes in the order 0, 2, 1, 3
  (`reference.swizzle`), so int4 blocks are of 8 tokens or more;
- scale and zero fp16 `[num_blocks, n_kv_heads, block_size, 2]`, one pair per (token, head), read
  as one 32-bit word: `s = fp16((max - min) / (2^b - 1))` (1 for a constant row),
  `z = clamp(round(-min / s), 0, 2^b - 1)`,
  `q = clamp(round(x / s) + z, 0, 2^b - 1)`, `x ~ (q - z) * s`;
- or unquantized: the values themselves `[num_blocks, n_kv_heads, block_size, head_dim]` (bf16 /
  fp16; the write also takes fp32), no scale and zero (None).

Decode attention (one query token per sequence, GQA): one program per (sequence, kv head, split
of the context); the group's query heads share each K/V tile (padded to the MMA's 16 rows; int4:
the tokens are the MMAs' rows and the heads their columns, padded to 8, see `_paged_decode_kv4_kernel`).
Codes enter fp16 MMAs without a conversion:
a code c in the low bits of 0x6400 is the fp16 `1024 + c` (an int4 high nibble, left in place,
gives `1024 + 16 c`: K's odd dims, whose query plane is divided by 16, or V's odd tokens, whose
probabilities are), two codes per 32-bit op. Scale and zero are folded out per token:
`score = s_k (q . (1024 + c) - (1024 + z_k) sum(q))`; `p * s_v` weighs V's tokens, whose zero comes
off their codes in fp16 (int8) or as one per-head sum at the end (int4); the QK MMA's accumulator
starts at `-1024 sum(q)`, and scores are kept in log2 units (exp2). A 16-bit cache enters the MMAs as it is (query and probabilities in its
dtype). Long contexts are split across programs and merged by log-sum-exp (flash-decoding).
`lowbit bench sass` counts the main loop's instructions (compiled for sm_90a without a GPU).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from lowbit.kernels import reference
from lowbit.kernels.common import cdiv, round_half_even, sm_count, tl, triton, use_triton

MIN_SPLIT_TOKENS = 256


@dataclass(frozen=True)
class DecodeConfig:
    """Defaults: the fastest of those swept on an H200 (docs/benchmarks.md)."""
    block_n: int = 128  # tokens per step
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4  # (sequence, head, split) programs per SM
    maxnreg: int | None = None  # cap on registers per thread (None: the compiler's choice); fewer
    # registers can fit more programs on an SM (KV4 at 128: 4 instead of 3, no spills in the SASS)


# per cache width, from the sweep of 2026-12-04 on the H200 (docs/benchmarks.md): 16-bit tiles are 2-4x
# larger (half the tokens per step); KV8 as one-warp programs (row reductions within the warp, no barrier
# across warps) of 32-token steps: 7-8% faster at batch 64 x 4k and at batch 2048. KV4 (token-packed V):
# one-warp programs of 64-token steps, the fewest instructions per byte of the configs compiled
# (`lowbit bench sass`: 8.46 bytes per warp instruction against 4.93 for the 4-warp kernel it replaced; not
# yet timed: docs/benchmarks.md)
_DEFAULT_DECODE = {16: DecodeConfig(block_n=64), 8: DecodeConfig(block_n=32, num_warps=1, waves=16, maxnreg=168),
                   4: DecodeConfig(block_n=64, num_warps=1, waves=16)}


def default_decode_config(bits: int) -> DecodeConfig:
    return _DEFAULT_DECODE[bits]


def kv_bits(cache: torch.Tensor, head_dim: int) -> int:
    """8 or 4 for uint8 codes; 16 for a cache of the values themselves."""
    if cache.dtype != torch.uint8:
        return 16
    return 4 if cache.shape[-1] * 2 == head_dim else 8


def supports_head_dim(head_dim: int) -> bool:
    """The kernels tile head_dim whole (a power of two) and int4's half of it feeds an MMA (>= 16)."""
    return 32 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def kv_cache_write_triton(key, value, k_cache, v_cache, k_sz, v_sz, slot_mapping, echo=False):
    t, hkv, d = key.shape
    bits, bs = kv_bits(k_cache, d), k_cache.shape[2]
    echoed = []
    for x, cache, sz, packed in ((key, k_cache, k_sz, False), (value, v_cache, v_sz, bits == 4)):
        out = torch.empty(t, hkv, d, dtype=x.dtype, device=x.device) if echo and bits != 16 else x
        _kv_write_kernel[(t,)](x, cache, sz, slot_mapping, out, x.stride(0), x.stride(1), t, HKV=hkv, BS=bs, D=d,
                               BITS=bits, BH=triton.next_power_of_2(hkv), ECHO=out is not x, TOKENS_PACKED=packed,
                               num_warps=4)
        echoed.append(out.to(cache.dtype) if bits == 16 else out)
    return tuple(echoed) if echo else None


def kv_cache_write(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   k_sz: torch.Tensor | None, v_sz: torch.Tensor | None, slot_mapping: torch.Tensor,
                   echo: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Quantize key/value `[T, n_kv_heads, head_dim]` into the cache slots `slot_mapping` `[T]`
    (block * block_size + offset; -1: skip), in place; a 16-bit cache (k_sz, v_sz None) stores them as they are.
    An int4 V byte holds two slots' codes (2j, 2j + 1): rows writing both in one call must be neighbours
    in `slot_mapping`, as a sequence's consecutive tokens are (`reference.check_pairs_adjacent`).
    With `echo`, also returns every row's K and V as the cache holds them (dequantized, in key's
    dtype; a 16-bit cache: in its dtype), so attention over these tokens needs no read-back."""
    if use_triton(key):
        return kv_cache_write_triton(key, value, k_cache, v_cache, k_sz, v_sz, slot_mapping, echo)
    return reference.kv_cache_write(key, value, k_cache, v_cache, k_sz, v_sz, slot_mapping, echo)


def decode_splits(batch: int, n_kv_heads: int, max_seq_len: int, device, waves: int) -> int:
    """Enough (sequence, head, split) programs for `waves` per SM, each >= MIN_SPLIT_TOKENS."""
    n_sm = sm_count(device) if device.type == "cuda" else 4
    want = cdiv(waves * n_sm, batch * n_kv_heads)
    return max(1, min(want, cdiv(max_seq_len, MIN_SPLIT_TOKENS)))


def paged_decode_attention_triton(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens, scale,
                                  max_seq_len=None, splits=None, config: DecodeConfig | None = None):
    """`paged_decode_attention` with the split count and tile config open (the benchmark's sweep)."""
    b, hq, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    bits = kv_bits(k_cache, d)
    gq = hq // hkv
    cfg = config or default_decode_config(bits)
    max_seq_len = max_seq_len or block_tables.shape[1] * bs
    splits = splits or decode_splits(b, hkv, max_seq_len, q.device, cfg.waves)
    per_split = cdiv(cdiv(max_seq_len, splits), cfg.block_n) * cfg.block_n
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if splits > 1:
        part_o = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    args = (q, k_cache, v_cache, sz_words(k_sz), sz_words(v_sz), block_tables, seq_lens, out, part_o, part_lse,
            scale, q.stride(0), q.stride(1), block_tables.stride(0), per_split)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    if bits == 4:
        _paged_decode_kv4_kernel[(b, hkv, splits)](*args, HKV=hkv, GQ=gq, D=d, BS=bs, BH=max(8, triton.next_power_of_2(gq)),
                                                   BN=cfg.block_n, SPLITS=splits, ASM=q.is_cuda, **launch)
    else:
        _paged_decode_kernel[(b, hkv, splits)](*args, HKV=hkv, GQ=gq, D=d, BS=bs, BITS=bits,
                                               BH=max(16, triton.next_power_of_2(gq)), BN=cfg.block_n, SPLITS=splits,
                                               ASM=q.is_cuda, **launch)
    if splits > 1:
        _merge_splits_kernel[(b, hq)](part_o, part_lse, out, D=d, SPLITS=splits,
                                      SP=triton.next_power_of_2(splits), num_warps=4)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_sz: torch.Tensor | None, v_sz: torch.Tensor | None, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """q `[B, n_heads, head_dim]` (one token per sequence) -> `[B, n_heads, head_dim]` in q's dtype.

    The cache holds codes with k_sz / v_sz, or 16-bit values with k_sz = v_sz = None.
    block_tables int32 `[B, max_blocks]` (-1 past the end), seq_lens int32 `[B]` (tokens in the
    cache, >= 1). max_seq_len bounds seq_lens (default: what the block table can hold); it only
    sets the split of the context, so a fixed value keeps the launch CUDA-graph safe.
    """
    if use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens,
                                             scale, max_seq_len)
    return reference.paged_decode_attention(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens,
                                            scale, max_seq_len)


def sz_words(sz: torch.Tensor | None) -> torch.Tensor | None:
    """A cache's fp16 (scale, zero) pairs `[..., 2]` as the 32-bit words `_scale_zero` reads."""
    return None if sz is None else sz.view(torch.int32)


@triton.jit
def _scale_zero(words_ptr, rows, mask):
    """The fp32 scale and zero of cache rows `rows`: one 32-bit word a row, the fp16 pair (scale in the
    low half). Triton's pipeliner copies a 4-byte load ahead (cp.async); two 2-byte loads it would leave
    synchronous in the loop. `mask` None: unmasked. (Converting each half in place by inline PTX
    compiled to more instructions than these shifts: `bench sass --kernel decode-kv4`, 1120 against 1110.)"""
    if mask is None:
        w = tl.load(words_ptr + rows)
    else:
        w = tl.load(words_ptr + rows, mask=mask, other=0)
    s = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    z = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def _quant_asym(x, lo, hi, QMAX: tl.constexpr):
    """Codes of x for the per-row range [lo, hi] (`[rows, 1]`), with their scale and zero."""
    s = tl.math.div_rn(hi - lo, QMAX).to(tl.float16).to(tl.float32)  # the fp16 scale the cache holds (quant/kv.py)
    s = tl.where(s > 0, s, 1.0)
    z = tl.clamp(round_half_even(tl.clamp(tl.math.div_rn(-lo, s), -2.0 * QMAX, 2.0 * QMAX)), 0.0, QMAX)
    v = tl.clamp(tl.math.div_rn(x, s), -2.0 * QMAX, 2.0 * QMAX)
    return tl.clamp(round_half_even(v) + z, 0.0, QMAX).to(tl.uint8), s, z


@triton.jit
def _quant_row(ptrs, h_ok, QMAX: tl.constexpr):
    """Codes, scale and zero of the rows at `ptrs` `[heads, D]`, their range holding 0 (quant/kv.py)."""
    x = tl.load(ptrs, mask=h_ok, other=0.0).to(tl.float32)
    return _quant_asym(x, tl.minimum(tl.min(x, 1), 0.0)[:, None], tl.maximum(tl.max(x, 1), 0.0)[:, None], QMAX)


@triton.jit
def _kv_write_kernel(x_ptr, cache_ptr, sz_ptr, slot_ptr, echo_ptr, stride_t, stride_h, n_tokens, HKV: tl.constexpr,
                     BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, BH: tl.constexpr, ECHO: tl.constexpr,
                     TOKENS_PACKED: tl.constexpr):
    """One token's heads -> their cache slot; with ECHO also `(c - z) * s` (what the cache now
    holds) into a contiguous `[T, HKV, D]` of x's dtype, for every token (slot -1 too).
    TOKENS_PACKED (int4 V): the slot's byte also holds its partner slot's (slot ^ 1) codes; when the
    row beside this one writes the partner, the even slot's program quantizes both rows and stores
    the byte, else the partner's nibble is kept from the cache."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BH)
    h_ok = offs_h[:, None] < HKV
    ok = h_ok & (slot >= 0)
    rows = x_ptr + t * stride_t + offs_h[:, None] * stride_h
    dst = (slot // BS * HKV + offs_h) * BS + slot % BS  # (token, head) row of the cache
    echo_rows = echo_ptr + (t * HKV + offs_h[:, None]) * D
    if BITS == 16:
        offs_d = tl.arange(0, D)
        x = tl.load(rows + offs_d[None, :], mask=h_ok, other=0.0)
        tl.store(cache_ptr + dst[:, None] * D + offs_d[None, :], x.to(cache_ptr.dtype.element_ty), mask=ok)
    elif TOKENS_PACKED:
        offs_d = tl.arange(0, D)
        c, s, z = _quant_row(rows + offs_d[None, :], h_ok, 15.0)
        partner = slot ^ 1
        prev = tl.load(slot_ptr + t - 1, mask=t > 0, other=-2)
        nxt = tl.load(slot_ptr + t + 1, mask=t + 1 < n_tokens, other=-2)
        byte_ptr = (cache_ptr + ((slot // BS * HKV + offs_h[:, None]) * D + offs_d[None, :]) * (BS // 2)
                    + _swizzle(slot % BS // 2))
        if (slot >= 0) & ((prev == partner) | (nxt == partner)):
            if slot % 2 == 0:  # the pair's byte, stored once, by its even slot's program
                other = tl.where(prev == partner, t - 1, t + 1)
                cp, _, _ = _quant_row(x_ptr + other * stride_t + offs_h[:, None] * stride_h + offs_d[None, :], h_ok,
                                      15.0)
                tl.store(byte_ptr, c | (cp << 4), mask=ok)
        else:
            cp = (tl.load(byte_ptr, mask=ok, other=0) >> (4 - 4 * (slot % 2)).to(tl.uint8)) & 15
            tl.store(byte_ptr, tl.where(slot % 2 == 0, c | (cp << 4), cp | (c << 4)), mask=ok)
        if ECHO:
            tl.store(echo_rows + offs_d[None, :], ((c.to(tl.float32) - z) * s).to(echo_ptr.dtype.element_ty), mask=h_ok)
    elif BITS == 8:
        offs_d = tl.arange(0, D)
        c, s, z = _quant_row(rows + offs_d[None, :], h_ok, 255.0)
        tl.store(cache_ptr + dst[:, None] * D + offs_d[None, :], c, mask=ok)
        if ECHO:
            tl.store(echo_rows + offs_d[None, :], ((c.to(tl.float32) - z) * s).to(echo_ptr.dtype.element_ty), mask=h_ok)
    else:
        offs_d = tl.arange(0, D // 2)
        x0 = tl.load(rows + 2 * offs_d[None, :], mask=h_ok, other=0.0).to(tl.float32)
        x1 = tl.load(rows + 2 * offs_d[None, :] + 1, mask=h_ok, other=0.0).to(tl.float32)
        lo = tl.minimum(tl.minimum(tl.min(x0, 1), tl.min(x1, 1)), 0.0)[:, None]  # the range holds 0, as in quant/kv.py
        hi = tl.maximum(tl.maximum(tl.max(x0, 1), tl.max(x1, 1)), 0.0)[:, None]
        c0, s, z = _quant_asym(x0, lo, hi, 15.0)
        c1, _, _ = _quant_asym(x1, lo, hi, 15.0)
        tl.store(cache_ptr + dst[:, None] * (D // 2) + offs_d[None, :], _swizzled(c0 | (c1 << 4)), mask=ok)
        if ECHO:
            tl.store(echo_rows + 2 * offs_d[None, :], ((c0.to(tl.float32) - z) * s).to(echo_ptr.dtype.element_ty),
                     mask=h_ok)
            tl.store(echo_rows + 2 * offs_d[None, :] + 1,
                     ((c1.to(tl.float32) - z) * s).to(echo_ptr.dtype.element_ty), mask=h_ok)
    if BITS != 16:
        h_ok = (offs_h < HKV) & (slot >= 0)
        tl.store(sz_ptr + dst * 2, tl.sum(s, 1).to(tl.float16), mask=h_ok)
        tl.store(sz_ptr + dst * 2 + 1, tl.sum(z, 1).to(tl.float16), mask=h_ok)


# a 32-bit word of four swizzled bytes (memory order 0, 2, 1, 3: `reference.swizzle`) holds bytes 0, 1 in
# its 16-bit lanes' low bytes and 2, 3 in their high bytes, so each plane's pair is one mask away
_INT4_FP16_ASM = tl.constexpr("""{
.reg .b32 t;
shr.b32 t, $4, 8;
lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xea;
lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xea;
lop3.b32 $2, $4, 0x00F000F0, 0x64006400, 0xea;
lop3.b32 $3, t, 0x00F000F0, 0x64006400, 0xea;
}""")

_INT8_FP16_ASM = tl.constexpr("""{
.reg .b32 t;
prmt.b32 t, $2, 0, 0x4140;
or.b32 $0, t, 0x64006400;
prmt.b32 t, $2, 0, 0x4342;
or.b32 $1, t, 0x64006400;
}""")


@triton.jit
def _swizzled(x):
    """A 2-D tile with the middle two of every four elements along its last dim swapped
    (`reference.swizzle`, in registers)."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.reshape(tl.permute(tl.reshape(x, [R, C // 4, 2, 2]), (0, 1, 3, 2)), [R, C])


@triton.jit
def _swizzle(j):
    """`reference.swizzle`: where byte j of an int4 row lies."""
    return (j & ~3) | ((j & 1) << 1) | ((j >> 1) & 1)


@triton.jit
def _codes_fp16(c, BITS: tl.constexpr, ASM: tl.constexpr, PURE: tl.constexpr = True):
    """uint8 code tile -> fp16 planes: int8 (1024 + c, unused); int4 (1024 + low, 1024 + 16 high), its
    bytes `swizzle`d along the tile's last dim, the planes in order. ASM: two values per 32-bit op,
    int8's bytes moved into the fp16 lanes by PRMT, int4's already there (a shift for the high
    bytes), masked and offset by one LOP3 (int8 rows swizzled the same way compiled to 1084 instead of
    1107 instructions a step of `decode-kv8`, with 2 spills: not taken). PURE=False keeps the
    conversion where it is written: for V (whose MMA operand runs along the tokens, across the cache's
    rows) Triton would otherwise move the layout change before it and transpose single bytes through
    shared memory; after it, 16-bit values transpose with ldmatrix."""
    if BITS == 4:
        if ASM:
            a, b = tl.inline_asm_elementwise(_INT4_FP16_ASM, "=r,=r,=r,=r,r", [c],
                                             dtype=(tl.float16, tl.float16), is_pure=PURE, pack=4)
        else:
            a = _swizzled(((c & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True))
            b = _swizzled(((c & 0xF0).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True))
    else:
        if ASM:
            a = tl.inline_asm_elementwise(_INT8_FP16_ASM, "=r,=r,r", [c], dtype=tl.float16,
                                          is_pure=PURE, pack=4)
        else:
            a = (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        b = a
    return a, b


@triton.jit
def _code_scores(raw_init, qa, qb, qsum, kc, k_s, k_z, qk_scale, BITS: tl.constexpr, ASM: tl.constexpr):
    """A tile of key codes -> scores in log2 units, scale and zero folded out:
    `s_k (q . (1024 + c) - (1024 + z_k) sum(q))` with the MMA's accumulator starting at `raw_init`
    (`-1024 sum(q)`); qb is the odd-dims plane (int4; unused for int8). k_s / k_z: each score's
    key scale and zero, in the scores' shape (or one that broadcasts to it)."""
    k_s = k_s * qk_scale
    k_zs = k_z * k_s
    ka, kb = _codes_fp16(kc, BITS, ASM)
    raw = tl.dot(qa, tl.trans(ka), raw_init)
    if BITS == 4:
        raw = tl.dot(qb, tl.trans(kb), raw)
    return raw * k_s - qsum[:, None] * k_zs


@triton.jit
def _code_values(p, alpha, acc, vc, v_s, v_z, ASM: tl.constexpr):
    """The accumulator times alpha plus `p @ V` over a tile of int8 value codes `[BN, D]`, `p * s_v`
    weighing each token. v_s as k_s in `_code_scores`; v_z: each value row's zero `[BN, 1]`, taken off
    its codes in fp16 (`(1024 + c) - (1024 + z)`: small integers, exact, since the write's zeros are
    integer codes), so no per-row correction is summed across the tokens (a reduction across the warps)."""
    pv = (p * v_s).to(tl.float16)
    va, _ = _codes_fp16(vc, 8, ASM, False)
    return acc * alpha[:, None] + tl.dot(pv, va - (v_z + 1024.0).to(tl.float16))


@triton.jit
def _paged_decode_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, sl_ptr, o_ptr, po_ptr,
                         plse_ptr, sm_scale, stride_qb, stride_qh, stride_bt, per_split,
                         HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         BITS: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
                         SPLITS: tl.constexpr, ASM: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b)
    start = sp * per_split
    end = tl.minimum(start + per_split, seq_len)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, D)
    h_ok = offs_h[:, None] < GQ
    q_rows = q_ptr + b * stride_qb + (kvh * GQ + offs_h[:, None]) * stride_qh
    if BITS == 16:  # the query in the cache's dtype
        qa = tl.load(q_rows + offs_d[None, :], mask=h_ok, other=0.0).to(kc_ptr.dtype.element_ty)
    else:
        qa = tl.load(q_rows + offs_d[None, :], mask=h_ok, other=0.0).to(tl.float16)
        qsum = tl.sum(qa.to(tl.float32), 1)
        minus_q1024 = tl.zeros([BH, BN], tl.float32) - 1024.0 * qsum[:, None]  # the MMA's accumulator init
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp2 in the softmax
    for t0 in range(start, end, BN):
        _, n_ok, row = _step_rows(bt_ptr + b * stride_bt, kvh, t0, end, HKV, BS, BN)
        kc = tl.load(kc_ptr + row[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0)
        if BITS == 16:
            scores = tl.dot(qa, tl.trans(kc)) * qk_scale
        else:
            # unmasked: a token past the end reads block 0's (maybe not finite), `n_ok` masks the results
            k_s, k_z = _scale_zero(ksz_ptr, row, None)
            scores = _code_scores(minus_q1024, qa, qa, qsum, kc, k_s[None, :], k_z[None, :], qk_scale, BITS, ASM)
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: a step has at least one token
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        # masked: a slot that is no token's may hold anything (16 bits: inf), and p's 0 times inf is
        # no 0 in the MMA (past the end, K only reaches scores that are masked)
        vc = tl.load(vc_ptr + row[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0)
        if BITS == 16:
            acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        else:
            v_s, v_z = _scale_zero(vsz_ptr, row, None)  # v_z finite: a row past the end has p = 0
            acc = _code_values(p, alpha, acc, vc, tl.where(n_ok, v_s, 0.0)[None, :], v_z[:, None], ASM)
    has = l_i > 0  # an empty split has no tokens
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)[:, None]
    heads = kvh * GQ + offs_h[:, None]
    if SPLITS == 1:
        tl.store(o_ptr + (b * HKV * GQ + heads) * D + offs_d[None, :], (acc * inv_l).to(o_ptr.dtype.element_ty),
                 mask=h_ok)
    else:
        part = (b * HKV * GQ + heads) * SPLITS + sp
        tl.store(po_ptr + part * D + offs_d[None, :], acc * inv_l, mask=h_ok)
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(plse_ptr + part, lse[:, None], mask=h_ok)


@triton.jit
def _step_rows(bt_row, kvh, t0, end, HKV: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """A step's BN cache positions from t0, which are before `end`, and their (token, head) rows."""
    offs = t0 + tl.arange(0, BN)
    ok = offs < end
    blk = tl.load(bt_row + offs // BS, mask=ok, other=0).to(tl.int64)
    return offs, ok, (blk * HKV + kvh) * BS + offs % BS


@triton.jit
def _paged_decode_kv4_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, sl_ptr, o_ptr, po_ptr,
                             plse_ptr, sm_scale, stride_qb, stride_qh, stride_bt, per_split,
                             HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             BH: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr, ASM: tl.constexpr):
    """Decode over an int4 cache with token-packed V, transposed: the MMAs' rows are tokens (scores
    `[tokens, heads]` = K . q^T) and head dims (`out^T [D, heads]` += V^T . p^T), their columns the
    group's heads (padded to BH >= 8), so both code tiles are A operands that widen in registers
    along their rows (K: a token's dims; V^T: a dim's tokens) and p needs no transpose. A step takes
    its BN tokens as BN / 2 pairs (2j, 2j + 1): even tokens and odd tokens are two score tiles, and
    a V^T byte's low and high nibbles their two value planes (the high one `1024 + 16 c`, its
    probabilities divided by 16). V's zero comes off once at the end: `out^T -= sum p s_v (1024 + z_v)`,
    a per-head sum kept beside l."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    DC: tl.constexpr = D // 2  # K's bytes per (token, head)
    NP: tl.constexpr = BN // 2  # token pairs per step
    seq_len = tl.load(sl_ptr + b)
    start = sp * per_split
    end = tl.minimum(start + per_split, seq_len)
    offs_h = tl.arange(0, BH)
    offs_c = tl.arange(0, DC)
    offs_d = tl.arange(0, D)
    h_ok = offs_h[:, None] < GQ
    q_rows = q_ptr + b * stride_qb + (kvh * GQ + offs_h[:, None]) * stride_qh
    # query planes: even dims, and odd dims / 16 (a K byte's high nibble widens to 1024 + 16 c)
    qa = tl.load(q_rows + 2 * offs_c[None, :], mask=h_ok, other=0.0).to(tl.float16)
    qb = (tl.load(q_rows + 2 * offs_c[None, :] + 1, mask=h_ok, other=0.0) / 16.0).to(tl.float16)
    qa_sum = tl.sum(qa.to(tl.float32), 1)
    qb_sum = tl.sum(qb.to(tl.float32), 1)
    qsum = qa_sum + 16.0 * qb_sum
    raw_init = tl.zeros([NP, BH], tl.float32) - (1024.0 * (qa_sum + qb_sum))[None, :]  # the MMAs' start: -q . 1024
    qa_t = tl.trans(qa)
    qb_t = tl.trans(qb)
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    v_off = tl.zeros([BH], tl.float32)  # sum p s_v (1024 + z_v): V's zero and the codes' 1024
    acc = tl.zeros([D, BH], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp2 in the softmax
    for t0 in range(start, end, BN):
        tok = t0 + 2 * tl.arange(0, NP)  # the even token of each pair
        e_ok = tok < end
        o_ok = tok + 1 < end
        row, kc_e, kc_o, vt = _pair_tiles(bt_ptr + b * stride_bt, kc_ptr, vc_ptr, kvh, t0, end, HKV, D, BS, BN)
        ks_e, kz_e = _scale_zero(ksz_ptr, row, None)
        ks_o, kz_o = _scale_zero(ksz_ptr, row + 1, None)
        scores_e = _pair_scores(raw_init, qa_t, qb_t, qsum, kc_e, ks_e[:, None], kz_e[:, None], qk_scale, e_ok, ASM)
        scores_o = _pair_scores(raw_init, qa_t, qb_t, qsum, kc_o, ks_o[:, None], kz_o[:, None], qk_scale, o_ok, ASM)
        # the two tiles meet elementwise before each reduction across the lanes: one shuffle tree, not two
        m_new = tl.maximum(m_i, tl.max(tl.maximum(scores_e, scores_o), 0))  # finite: >= 1 token
        alpha = tl.math.exp2(m_i - m_new)
        p_e = tl.math.exp2(scores_e - m_new[None, :])
        p_o = tl.math.exp2(scores_o - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p_e + p_o, 0)
        m_i = m_new
        vs_e, vz_e = _scale_zero(vsz_ptr, row, None)  # the zeros finite: a row past the end has p = 0
        vs_o, vz_o = _scale_zero(vsz_ptr, row + 1, None)
        pv_e = (p_e * tl.where(e_ok, vs_e, 0.0)[:, None]).to(tl.float16)
        pv_o = (p_o * (tl.where(o_ok, vs_o, 0.0) / 16.0)[:, None]).to(tl.float16)
        z_e = vz_e[:, None] + 1024.0
        z_o = 16.0 * vz_o[:, None] + 1024.0
        v_off = v_off * alpha + tl.sum(pv_e.to(tl.float32) * z_e + pv_o.to(tl.float32) * z_o, 0)
        v_e, v_o = _codes_fp16(vt, 4, ASM)  # [D, NP]: even tokens' 1024 + c, odd's 1024 + 16 c
        acc = tl.dot(v_o, pv_o, tl.dot(v_e, pv_e, acc * alpha[None, :]))
    has = l_i > 0  # an empty split has no tokens
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    out = (acc - v_off[None, :]) * inv_l[None, :]  # [D, BH]
    heads = kvh * GQ + offs_h
    hk = offs_h[None, :] < GQ
    if SPLITS == 1:
        tl.store(o_ptr + (b * HKV * GQ + heads[None, :]) * D + offs_d[:, None], out.to(o_ptr.dtype.element_ty), mask=hk)
    else:
        part = (b * HKV * GQ + heads) * SPLITS + sp
        tl.store(po_ptr + part[None, :] * D + offs_d[:, None], out, mask=hk)
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(plse_ptr + part, lse, mask=offs_h < GQ)


@triton.jit
def _pair_tiles(bt_row, kc_ptr, vc_ptr, kvh, t0, end, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                BN: tl.constexpr):
    """A step of BN cache positions from t0 (a multiple of BN) of an int4 cache as token pairs (2j, 2j + 1):
    the even tokens' rows `[BN / 2]`, the even and the odd tokens' K codes `[BN / 2, D / 2]` and V^T's
    bytes `[D, BN / 2]` (a pair per byte). Blocks are read whole runs at a time (`[blocks, pairs]`
    tiles), so Triton sees each run's contiguity and copies it by cp.async. Unmasked codes: a position
    past `end` reads block 0's (finite) codes; the caller masks its scores."""
    DC: tl.constexpr = D // 2
    NP: tl.constexpr = BN // 2
    NB: tl.constexpr = BN // BS if BN > BS else 1  # blocks per step
    PB: tl.constexpr = NP // NB  # pairs per block and step
    HB: tl.constexpr = BS // 2  # V^T bytes per (block, head, dim)
    offs_b = t0 // BS + tl.arange(0, NB)
    blk = tl.load(bt_row + offs_b, mask=offs_b * BS < end, other=0).to(tl.int64)
    # the step's first token in its block: 0 when a step spans whole blocks (written so Triton sees a
    # multiple of BN, which keeps V^T's byte runs aligned for cp.async)
    off0 = ((t0 // BN) % (BS // BN)) * BN if BS > BN else 0
    offs_j = tl.arange(0, PB)
    rows = ((blk * HKV + kvh) * BS + off0)[:, None] + 2 * offs_j[None, :]  # [NB, PB]: even tokens' rows
    offs_c = tl.arange(0, DC)
    kc_e = tl.reshape(tl.load(kc_ptr + rows[:, :, None] * DC + offs_c[None, None, :]), [NP, DC])
    kc_o = tl.reshape(tl.load(kc_ptr + (rows + 1)[:, :, None] * DC + offs_c[None, None, :]), [NP, DC])
    vbase = (blk * HKV + kvh) * (D * HB) + off0 // 2  # [NB]
    vt = tl.load(vc_ptr + vbase[None, :, None] + tl.arange(0, D)[:, None, None] * HB + offs_j[None, None, :])
    return tl.reshape(rows, [NP]), kc_e, kc_o, tl.reshape(vt, [D, NP])


@triton.jit
def _pair_scores(raw_init, qa_t, qb_t, qsum, kc, k_s, k_z, qk_scale, ok, ASM: tl.constexpr):
    """`_code_scores` transposed, for one token of each pair: key codes `[NP, D / 2]` -> scores
    `[NP, heads]` in log2 units, -inf where not `ok`."""
    ka, kb = _codes_fp16(kc, 4, ASM)
    raw = tl.dot(kb, qb_t, tl.dot(ka, qa_t, raw_init))
    k_s = k_s * qk_scale
    return tl.where(ok[:, None], raw * k_s - qsum[None, :] * (k_z * k_s), float("-inf"))


@triton.jit
def _merge_splits_kernel(po_ptr, plse_ptr, o_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
                         SP: tl.constexpr):
    """out = sum_s w_s o_s, w = softmax over the splits' log-sum-exps (empty splits: -inf)."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    lse = tl.load(plse_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(top > float("-inf"), top, 0.0))
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    o = tl.load(po_ptr + (row * SPLITS + offs_s[:, None]) * D + offs_d[None, :],
                mask=offs_s[:, None] < SPLITS, other=0.0)
    tl.store(o_ptr + row * D + offs_d, tl.sum(w[:, None] * o, 0).to(o_ptr.dtype.element_ty))
