"""Prefill attention over the paged KV cache: the new tokens of several sequences (fresh prompts
and chunks over a cached context alike) attend causally to everything the cache holds for them,
in one launch, reading the cache's codes (int8 / int4 per (token, head)) or 16-bit values where
they lie: no gather of the context, no padding, no GQA repeat.

The cache format and the in-register dequantization are `paged_attention.py`'s (codes enter fp16
MMAs as `1024 + c`, scale and zero folded out per key). One program per (tile of new tokens, kv
head, sequence): its rows are the tile's tokens times the kv head's query heads (GQA padded to a
power of two), so each K/V tile read serves all of them. The new tokens of sequence s are flat
rows `cu_seqlens_q[s] .. cu_seqlens_q[s + 1]`, the last of its `seq_lens[s]` cache positions, and
query token i attends to positions `<= seq_lens[s] - q_len + i`.

Behind the engine on CUDA for chunks over a cached context in 32 bits (`layers/attention.py`; in 16
bits they take `kv_gather.py`'s packed rows and varlen flash attention, which reads each value once
per query tile in 16 bits where this kernel widens the codes again for every query tile). Fresh prompts take
flash attention over the cache write's echo instead: on an H200 (`lowbit bench kernels --only
prefill`, docs/benchmarks.md) this kernel runs at 0.53x torch SDPA over bf16 values and 0.14-0.21x
over codes, where every query tile's program converts the same K/V tiles again.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.kernels.common import cdiv, tl, triton
from lowbit.kernels.paged_attention import (_code_scores, _code_values, _codes_fp16, _pair_tiles, _scale_zero,
                                            _step_rows, kv_bits, sz_words)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128  # rows per program: new tokens x (padded) query heads of one kv head
    block_n: int = 64  # cache positions per step
    num_warps: int = 8
    num_stages: int = 2


def paged_prefill_attention_triton(q, k_cache, v_cache, k_sz, v_sz, block_tables, seq_lens, cu_seqlens_q, seqs,
                                   max_q_len, scale, out, config: PrefillConfig | None = None):
    """Causal attention of the new tokens of the sequences `seqs` (int32 `[S]`, indices into the
    batch) over the cache, written into their rows of `out` `[T, n_heads, head_dim]` (others kept);
    `reference.paged_prefill_attention` is the same without `max_q_len` and `config`.

    q `[T, n_heads, head_dim]`: the flat batch's queries; cu_seqlens_q int32 `[B + 1]`; seq_lens
    int32 `[B]` (cache positions after this step, new tokens included, already written);
    block_tables int32 `[B, max_blocks]`; max_q_len bounds the listed sequences' new tokens.
    """
    cfg = config or PrefillConfig()
    _, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    gp = triton.next_power_of_2(hq // hkv)
    bmt = max(1, cfg.block_m // gp)  # new tokens per program
    grid = (cdiv(max_q_len, bmt), hkv, seqs.numel())
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, sz_words(k_sz), sz_words(v_sz), block_tables, seq_lens, cu_seqlens_q, seqs, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        HKV=hkv, GQ=hq // hkv, GP=gp, D=d, BS=bs, BITS=kv_bits(k_cache, d), BMT=bmt, BN=cfg.block_n,
        ASM=q.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@triton.jit
def _paged_prefill_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, sl_ptr, cu_ptr, seqs_ptr, o_ptr,
                          sm_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                          HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, BITS: tl.constexpr, BMT: tl.constexpr, BN: tl.constexpr,
                          ASM: tl.constexpr):
    kvh = tl.program_id(1)
    s = tl.load(seqs_ptr + tl.program_id(2))
    q0 = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q0
    ctx = tl.load(sl_ptr + s)
    t0 = tl.program_id(0) * BMT
    DC: tl.constexpr = D // 2 if BITS == 4 else D  # cache elements per (token, head)
    STEP: tl.constexpr = 2 if BITS == 4 else 1  # head_dim stride of one code plane
    BM: tl.constexpr = BMT * GP
    r = tl.arange(0, BM)
    tok = t0 + r // GP
    g = r % GP
    row_ok = (tok < q_len) & (g < GQ)
    pos = ctx - q_len + tok  # each row's cache position: it sees positions <= pos
    offs_c = tl.arange(0, DC)
    q_rows = q_ptr + (q0 + tok[:, None]).to(tl.int64) * stride_qt + (kvh * GQ + g[:, None]) * stride_qh
    if BITS == 16:
        qa = tl.load(q_rows + offs_c[None, :], mask=row_ok[:, None], other=0.0).to(kc_ptr.dtype.element_ty)
    else:  # query planes as in the decode kernel (int4: even dims, and odd dims / 16)
        qa = tl.load(q_rows + STEP * offs_c[None, :], mask=row_ok[:, None], other=0.0).to(tl.float16)
        qsum = tl.sum(qa.to(tl.float32), 1)
        q_1024 = 1024.0 * qsum
        qb = qa  # int8 has one plane
        if BITS == 4:
            qb = (tl.load(q_rows + 2 * offs_c[None, :] + 1, mask=row_ok[:, None], other=0.0) / 16.0).to(tl.float16)
            qb_sum = tl.sum(qb.to(tl.float32), 1)
            qsum += 16.0 * qb_sum
            q_1024 += 1024.0 * qb_sum
        minus_q1024 = tl.zeros([BM, BN // 2 if BITS == 4 else BN], tl.float32) - q_1024[:, None]  # int4: per token pair
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    offs_d = tl.arange(0, D)
    qk_scale = sm_scale * 1.4426950408889634  # log2 units
    end = tl.where(t0 < q_len, tl.minimum(ctx, ctx - q_len + t0 + BMT), 0)  # causal: the tile's last row
    for k0 in range(0, end, BN):
        if BITS == 4:
            m_i, l_i, acc = _token_pairs_step(m_i, l_i, acc, minus_q1024, qa, qb, qsum, pos, kc_ptr, vc_ptr, ksz_ptr,
                                              vsz_ptr, bt_ptr + s * stride_bt, kvh, k0, end, qk_scale, HKV, D, BS, BN,
                                              ASM)
        else:
            offs_t, t_ok, krow = _step_rows(bt_ptr + s * stride_bt, kvh, k0, end, HKV, BS, BN)
            kc = tl.load(kc_ptr + krow[:, None] * DC + offs_c[None, :], mask=t_ok[:, None], other=0)
            if BITS == 16:
                scores = tl.dot(qa, tl.trans(kc)) * qk_scale
            else:
                k_s, k_z = _scale_zero(ksz_ptr, krow, t_ok)
                scores = _code_scores(minus_q1024, qa, qb, qsum, kc, k_s[None, :], k_z[None, :], qk_scale, BITS, ASM)
            scores = tl.where(t_ok[None, :] & (offs_t[None, :] <= pos[:, None]), scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every row sees position 0 in the first tile
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if BITS == 16:
                vc = tl.load(vc_ptr + krow[:, None] * D + offs_d[None, :], mask=t_ok[:, None], other=0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
            elif BITS == 8:
                vc = tl.load(vc_ptr + krow[:, None] * D + offs_d[None, :], mask=t_ok[:, None], other=0)
                v_s, v_z = _scale_zero(vsz_ptr, krow, t_ok)
                acc = _code_values(p, alpha, acc, vc, v_s[None, :], v_z[:, None], ASM)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = o_ptr + (q0 + tok[:, None]).to(tl.int64) * stride_ot + (kvh * GQ + g[:, None]) * stride_oh
    tl.store(o_rows + offs_d[None, :], (acc * inv_l).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _token_pairs_step(m_i, l_i, acc, raw_init, qa, qb, qsum, pos, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_row, kvh, k0, end,
                      qk_scale, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                      ASM: tl.constexpr):
    """One step of BN cache positions over an int4 cache (token-packed V): the positions as pairs
    (2j, 2j + 1), as a V^T byte's nibbles hold them, so the even and the odd tokens are two score tiles
    and two value planes (`c - z`, exact in fp16, the odd plane widened as 16 c and scaled back)."""
    NP: tl.constexpr = BN // 2
    tok = k0 + 2 * tl.arange(0, NP)  # even tokens
    ok_e = tok < end
    ok_o = tok + 1 < end
    row, kc_e, kc_o, vt = _pair_tiles(bt_row, kc_ptr, vc_ptr, kvh, k0, end, HKV, D, BS, BN)
    ks_e, kz_e = _scale_zero(ksz_ptr, row, ok_e)
    ks_o, kz_o = _scale_zero(ksz_ptr, row + 1, ok_o)
    sc_e = _code_scores(raw_init, qa, qb, qsum, kc_e, ks_e[None, :], kz_e[None, :], qk_scale, 4, ASM)
    sc_o = _code_scores(raw_init, qa, qb, qsum, kc_o, ks_o[None, :], kz_o[None, :], qk_scale, 4, ASM)
    sc_e = tl.where(ok_e[None, :] & (tok[None, :] <= pos[:, None]), sc_e, float("-inf"))
    sc_o = tl.where(ok_o[None, :] & (tok[None, :] + 1 <= pos[:, None]), sc_o, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(tl.maximum(sc_e, sc_o), 1))  # finite: every row sees position 0
    alpha = tl.math.exp2(m_i - m_new)
    p_e = tl.math.exp2(sc_e - m_new[:, None])
    p_o = tl.math.exp2(sc_o - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p_e + p_o, 1)
    v_e, v_o = _codes_fp16(vt, 4, ASM, False)  # [D, NP]: 1024 + c (even tokens), 1024 + 16 c (odd)
    vs_e, vz_e = _scale_zero(vsz_ptr, row, ok_e)
    vs_o, vz_o = _scale_zero(vsz_ptr, row + 1, ok_o)
    v_e = v_e - (vz_e[None, :] + 1024.0).to(tl.float16)
    v_o = ((v_o - (16.0 * vz_o[None, :] + 1024.0).to(tl.float16)) * 0.0625).to(tl.float16)
    pv_e = (p_e * vs_e[None, :]).to(tl.float16)
    pv_o = (p_o * vs_o[None, :]).to(tl.float16)
    acc = tl.dot(pv_o, tl.trans(v_o), tl.dot(pv_e, tl.trans(v_e), acc * alpha[:, None]))
    return m_new, l_i, acc
