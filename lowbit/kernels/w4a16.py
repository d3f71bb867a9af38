"""W4A16 GEMM for small batches: bf16 activations x int4 weights (groups along K) -> bf16.

Weights: signed int4 with scales (symmetric) or uint4 with scales and zero points, per group of
64 or 128 or per channel. The weight tile is dequantized to bf16 in registers, `(q - z) * s`,
and multiplied on bf16 tensor cores; small M puts the weight on the MMA's wide side (see w4a8).
The codes become bf16 by the 0x4300 magic number (`common.int4_bf16`), and the scale is rounded to
bf16 for the multiply, so a weight can differ from the fp32 `(q - z) * s` by its last bit twice
(`w4a16_dequantize`, the large-M copy, rounds once from fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import (KBLOCK, TileConfig, acc_zeros, cdiv, int4_bf16, int4_widen, k_range, load_kblock,
                                   pack_halves, split_k, splitk_buffers, store_tile, tile_offsets, tl,
                                   triton, use_triton)
from lowbit.quant.formats import unpack_int4


@dataclass
class W4A16Weight:
    """qweight: uint8 `[N, Kp/2]`, unsigned codes in `common.KBLOCK` half-split order;
    scales, zeros: fp32 `[n_groups, N]` (zeros hold integer codes, in 4-byte words: Triton's pipeliner
    copies a K-step's loads ahead with cp.async only from 4 bytes up, and every step waited on byte
    loads); group: K per scale (Kp for one per channel); k: the true K. Signed codes are stored
    offset-binary with zero 8."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    k: int

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @staticmethod
    def cat(parts: list["W4A16Weight"]) -> "W4A16Weight":
        """One weight whose output channels are the parts' in order (scales and zeros are per channel)."""
        if any(p.k != parts[0].k or p.group != parts[0].group for p in parts):
            raise ValueError("W4A16 weights of different K or group")
        return W4A16Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts], 1),
                           torch.cat([p.zeros for p in parts], 1), parts[0].group, parts[0].k)

    def rows(self, start: int, stop: int, part: "W4A16Weight") -> "W4A16Weight":
        """Output channels [start, stop) as views of this weight (`part`'s own group-major scales
        and zeros kept: a column slice of the fused ones would not be contiguous)."""
        return W4A16Weight(self.qweight[start:stop], part.scales, part.zeros, self.group, self.k)


def prepare_w4a16(qweight: torch.Tensor, k: int, scales: torch.Tensor,
                  zeros: torch.Tensor | None = None, group: int | None = 128) -> W4A16Weight:
    """Canonical `pack_int4` codes `[N, ceil(k/2)]` (signed if `zeros` is None), scales
    `[N, ceil(k/group)]` (`[N]` or `[N, 1]` with group None: per channel), zeros uint8 like scales."""
    kp = cdiv(k, KBLOCK) * KBLOCK
    if group is None:
        group = kp
    elif KBLOCK % group or group < KBLOCK // 2:
        raise ValueError(f"W4A16 groups must be {KBLOCK // 2} or {KBLOCK}, or per channel")
    n = qweight.shape[0]
    codes = unpack_int4(qweight, k, signed=zeros is None)
    if zeros is None:
        codes = (codes.to(torch.int16) + 8).to(torch.uint8)
        zeros = torch.full_like(scales.reshape(n, -1), 8, dtype=torch.uint8)
    n_groups = cdiv(kp, group)

    def group_major(t, dtype):
        t = t.reshape(n, -1).to(dtype)
        return torch.nn.functional.pad(t, (0, n_groups - t.shape[1])).t().contiguous()

    return W4A16Weight(pack_halves(codes), group_major(scales, torch.float32),
                       group_major(zeros, torch.float32), group, k)


def default_config(m: int) -> TileConfig:
    """Small M: the fastest of `lowbit bench kernels --sweep` on an H200 at M = 1, 16 and 64 (since the
    zeros are 4-byte words the pipeliner copies ahead: 128-channel tiles, 3 stages; docs/benchmarks.md)."""
    if m <= 64:
        return TileConfig(swap=True, block_m=max(16, triton.next_power_of_2(m)), block_n=128, num_stages=3, waves=2)
    return TileConfig(block_m=64, block_n=128)


def w4a16_gemm_triton(x: torch.Tensor, w: W4A16Weight, config: TileConfig | None = None) -> torch.Tensor:
    m, k = x.shape
    assert k == w.k and x.dtype == torch.bfloat16 and x.stride(1) == 1
    n = w.n
    cfg = config or default_config(m)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    split = split_k(cfg.split_k, tiles, cdiv(k, KBLOCK), x.device, cfg.waves)
    ws, locks = splitk_buffers(x.device, split * m * n if split > 1 else 0, tiles)
    _w4a16_kernel[(tiles, split)](
        x, w.qweight, w.scales, w.zeros, out, ws, locks, m, n, k, x.stride(0), w.qweight.stride(0),
        out.stride(0), w.group, GROUP64=w.group == KBLOCK // 2, SWAP=cfg.swap, BM=cfg.block_m, BN=cfg.block_n, SPLIT_K=split,
        GROUP_M=cfg.group_m, ASM=x.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


DEQUANT_MIN_M = 128  # from here on: the weight dequantized to bf16 once per call, then cuBLAS


def w4a16_dequantize(w: W4A16Weight) -> torch.Tensor:
    """The bf16 weight `[N, Kp]` (columns past K are padding): a scratch copy for large M."""
    n, kh = w.qweight.shape
    out = torch.empty(n, 2 * kh, dtype=torch.bfloat16, device=w.qweight.device)
    _w4a16_dequant_kernel[(cdiv(n, 64), kh // 64)](w.qweight, w.scales, w.zeros, out, n, w.qweight.stride(0),
                                                   out.stride(0), w.group, BN=64, ASM=w.qweight.is_cuda,
                                                   num_warps=4)
    return out


def w4a16_gemm(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    """`bf16 [M, N] = x @ dequant(W)^T`, x bf16 `[M, K]`. The kernel streams the 4-bit weight for
    small M; from DEQUANT_MIN_M tokens the GEMM is compute-bound and cuBLAS bf16 runs it on a
    dequantized copy (one pass over the weight, amortized over the tokens)."""
    if use_triton(x):
        if x.shape[0] >= DEQUANT_MIN_M:
            return x @ w4a16_dequantize(w)[:, :w.k].t()
        return w4a16_gemm_triton(x, w)
    return reference.w4a16_gemm(x, w)


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K,
                  stride_xm, stride_wn, stride_om, GROUP, GROUP64: tl.constexpr, SWAP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, ASM: tl.constexpr):
    pid, offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    n_ok = offs_n < N
    first, last = k_range(tl.cdiv(K, 128), SPLIT_K)
    acc = acc_zeros(BM, BN, SWAP, tl.float32)
    for step in range(first, last):
        a_lo, a_hi, p = load_kblock(x_ptr, w_ptr, stride_xm, stride_wn, offs_m, offs_n, step, M, N, K)
        g_lo = step * 128 // GROUP
        g_hi = (step * 128 + 64) // GROUP
        z_lo = tl.load(z_ptr + g_lo * N + offs_n, mask=n_ok, other=0)[:, None]
        s_lo = tl.load(s_ptr + g_lo * N + offs_n, mask=n_ok, other=0.0)[:, None]
        if GROUP64:  # the two nibble planes are two groups, with their own zero points and scales
            z_hi = tl.load(z_ptr + g_hi * N + offs_n, mask=n_ok, other=0)[:, None]
            s_hi = tl.load(s_ptr + g_hi * N + offs_n, mask=n_ok, other=0.0)[:, None]
        else:
            z_hi, s_hi = z_lo, s_lo
        w_lo, w_hi = int4_bf16(p, z_lo, s_lo, z_hi, s_hi, ASM)
        if SWAP:
            acc = tl.dot(w_lo, tl.trans(a_lo), acc)
            acc = tl.dot(w_hi, tl.trans(a_hi), acc)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc)
    if SWAP:
        y = tl.trans(acc)
    else:
        y = acc
    store_tile(out_ptr, ws_ptr, lock_ptr, y, offs_m, offs_n, M, N, stride_om, pid, tl.program_id(1),
               SPLIT_K)


@triton.jit
def _w4a16_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_on, GROUP, BN: tl.constexpr,
                          ASM: tl.constexpr):
    """One K-step (128 columns) of BN rows: `(q - z) * s` in bf16, both nibble planes."""
    step = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, 64)
    n_ok = offs_n < N
    p = tl.load(w_ptr + offs_n[:, None] * stride_wn + step * 64 + offs_h[None, :], mask=n_ok[:, None], other=0)
    g_lo = step * 128 // GROUP
    g_hi = (step * 128 + 64) // GROUP
    z_lo = tl.load(z_ptr + g_lo * N + offs_n, mask=n_ok, other=0)[:, None]
    z_hi = tl.load(z_ptr + g_hi * N + offs_n, mask=n_ok, other=0)[:, None]
    lo, _ = int4_widen(p, z_lo.to(tl.uint8), None, ASM)
    _, hi = int4_widen(p, z_hi.to(tl.uint8), None, ASM)
    s_lo = tl.load(s_ptr + g_lo * N + offs_n, mask=n_ok, other=0.0)[:, None]
    s_hi = tl.load(s_ptr + g_hi * N + offs_n, mask=n_ok, other=0.0)[:, None]
    dst = out_ptr + offs_n[:, None] * stride_on + step * 128 + offs_h[None, :]
    tl.store(dst, (lo.to(tl.float32) * s_lo).to(tl.bfloat16), mask=n_ok[:, None])
    tl.store(dst + 64, (hi.to(tl.float32) * s_hi).to(tl.bfloat16), mask=n_ok[:, None])
