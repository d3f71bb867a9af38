"""W4A4 GEMM with int8 outliers (Atom) -> bf16.

The input channels are reordered so the `k_out` outlier channels come last. The first
`K4 = K - k_out` channels are int4 (signed, per group of 128, scales on both sides); the outliers
are int8 (per token x per channel). Each group's int32 partial sum is rescaled into an fp32
accumulator (`xs4[m, g] * ws4[g, n]`); the outliers add one int8 MMA with their own scales.
Both int4 operands keep the canonical nibble order: the two nibble planes of a group are two
matching halves of the reduction, so no relayout is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import (TileConfig, cdiv, int4_signed, k_range, split_k, splitk_buffers,
                                   store_tile, tile_offsets, tl, triton, use_triton)

GROUP = 128


@dataclass
class W4A4Weight:
    """w4: `pack_int4` codes `[N, ceil(K4/2)]`; ws4: fp32 `[n_groups, N]` (rows may be strided: `rows`); w8: int8 `[N, k_out]`;
    ws8: fp32 `[N]`; k4: the int4 channel count."""
    w4: torch.Tensor
    ws4: torch.Tensor
    w8: torch.Tensor
    ws8: torch.Tensor
    k4: int

    @property
    def n(self) -> int:
        return self.w4.shape[0]

    @staticmethod
    def cat(parts: list["W4A4Weight"]) -> "W4A4Weight":
        """One weight whose output channels are the parts' in order (the same K and outlier channels)."""
        if len({(p.k4, p.w8.shape[1]) for p in parts}) != 1:
            raise ValueError("W4A4 weights of different K or outlier channels")
        return W4A4Weight(torch.cat([p.w4 for p in parts]), torch.cat([p.ws4 for p in parts], dim=1),
                          torch.cat([p.w8 for p in parts]), torch.cat([p.ws8 for p in parts]), parts[0].k4)

    def rows(self, start: int, stop: int, part: "W4A4Weight") -> "W4A4Weight":
        """Output channels [start, stop) as views of this weight (ws4's columns: a strided view)."""
        return W4A4Weight(self.w4[start:stop], self.ws4[:, start:stop], self.w8[start:stop], self.ws8[start:stop],
                          self.k4)


def prepare_w4a4(w4: torch.Tensor, k4: int, ws4: torch.Tensor, w8: torch.Tensor,
                 ws8: torch.Tensor) -> W4A4Weight:
    """Canonical tensors (ws4 `[N, ceil(k4/128)]`) -> the kernel's: group-major int4 scales."""
    assert w8.shape[1] <= GROUP, "at most 128 outlier channels"
    return W4A4Weight(w4.contiguous(), ws4.float().t().contiguous(), w8.contiguous(),
                      ws8.float().reshape(-1).contiguous(), k4)


def default_config(m: int) -> TileConfig:
    if m <= 16:  # by count, untimed: 213 SASS instructions per group step against 250 unswapped (bench sass)
        return TileConfig(swap=True, block_m=16, block_n=64, num_stages=3)
    if m <= 256:
        return TileConfig(block_m=64, block_n=128, num_stages=3)
    # not 128 x 256: the int32 group partial beside the fp32 accumulator would spill
    return TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


def w4a4_gemm_triton(x4, xs4, x8, xs8, w: W4A4Weight, config: TileConfig | None = None) -> torch.Tensor:
    m = x4.shape[0]
    n, k_out = w.n, w.w8.shape[1]
    cfg = config or default_config(m)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x4.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    split = split_k(cfg.split_k, tiles, cdiv(w.k4, GROUP), x4.device, cfg.waves)
    ws, locks = splitk_buffers(x4.device, split * m * n if split > 1 else 0, tiles)
    _w4a4_kernel[(tiles, split)](
        x4, xs4, x8, xs8, w.w4, w.ws4, w.w8, w.ws8, out, ws, locks, m, n, w.k4, k_out,
        x4.stride(0), xs4.stride(0), x8.stride(0), w.w4.stride(0), w.ws4.stride(0), w.w8.stride(0), out.stride(0),
        BM=cfg.block_m, BN=cfg.block_n, BKO=max(16, triton.next_power_of_2(k_out)), SPLIT_K=split,
        GROUP_M=cfg.group_m, SWAP=cfg.swap, EVEN_K=w.k4 % GROUP == 0, ASM=x4.is_cuda, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def w4a4_gemm(x4: torch.Tensor, xs4: torch.Tensor, x8: torch.Tensor, xs8: torch.Tensor,
              w: W4A4Weight) -> torch.Tensor:
    """Activations as `quantize_atom` returns them: x4 `pack_int4` codes `[M, ceil(K4/2)]`, xs4
    fp32 `[M, n_groups]`, x8 int8 `[M, k_out]`, xs8 fp32 `[M]`."""
    if use_triton(x4):
        return w4a4_gemm_triton(x4, xs4, x8, xs8, w)
    return reference.w4a4_gemm(x4, xs4, x8, xs8, w)


@triton.jit
def _w4a4_kernel(x4_ptr, xs4_ptr, x8_ptr, xs8_ptr, w4_ptr, ws4_ptr, w8_ptr, ws8_ptr, out_ptr,
                 ws_ptr, lock_ptr, M, N, K4, KO, stride_x4, stride_xs4, stride_x8, stride_w4,
                 stride_ws4, stride_w8, stride_om, BM: tl.constexpr, BN: tl.constexpr, BKO: tl.constexpr,
                 SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr,
                 ASM: tl.constexpr):
    """One output tile over this program's share of the groups; SWAP computes it transposed (the
    weight tile the MMAs' A operand, widened in registers; the few tokens their N side). EVEN_K (whole
    groups only): no mask along K, so Triton copies the code tiles by cp.async in 16-byte pieces
    (a mask along K, whose bound it cannot see aligned, makes it load byte by byte)."""
    HALF: tl.constexpr = 64
    pid, offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_bytes = (K4 + 1) // 2
    first, last = k_range(tl.cdiv(K4, 128), SPLIT_K)
    acc = tl.zeros([BN, BM] if SWAP else [BM, BN], dtype=tl.float32)
    for g in range(first, last):
        b_ok = (g * HALF + offs_h[None, :] < k_bytes) | EVEN_K
        xp = tl.load(x4_ptr + offs_m[:, None] * stride_x4 + g * HALF + offs_h[None, :],
                     mask=m_ok[:, None] & b_ok, other=0)
        wp = tl.load(w4_ptr + offs_n[:, None] * stride_w4 + g * HALF + offs_h[None, :],
                     mask=n_ok[:, None] & b_ok, other=0)
        x_lo, x_hi = int4_signed(xp, ASM)
        w_lo, w_hi = int4_signed(wp, ASM)
        xs = tl.load(xs4_ptr + offs_m * stride_xs4 + g, mask=m_ok, other=0.0)
        wsc = tl.load(ws4_ptr + g * stride_ws4 + offs_n, mask=n_ok, other=0.0)
        if SWAP:
            part = tl.dot(w_lo, tl.trans(x_lo), out_dtype=tl.int32)
            part = tl.dot(w_hi, tl.trans(x_hi), part, out_dtype=tl.int32)
            acc += part.to(tl.float32) * wsc[:, None] * xs[None, :]
        else:
            part = tl.dot(x_lo, tl.trans(w_lo), out_dtype=tl.int32)
            part = tl.dot(x_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
            acc += part.to(tl.float32) * xs[:, None] * wsc[None, :]
    if tl.program_id(1) == 0:
        offs_o = tl.arange(0, BKO)
        o_ok = offs_o[None, :] < KO
        x8 = tl.load(x8_ptr + offs_m[:, None] * stride_x8 + offs_o[None, :], mask=m_ok[:, None] & o_ok, other=0)
        w8 = tl.load(w8_ptr + offs_n[:, None] * stride_w8 + offs_o[None, :], mask=n_ok[:, None] & o_ok, other=0)
        xs = tl.load(xs8_ptr + offs_m, mask=m_ok, other=0.0)
        wsc = tl.load(ws8_ptr + offs_n, mask=n_ok, other=0.0)
        if SWAP:
            acc += tl.dot(w8, tl.trans(x8), out_dtype=tl.int32).to(tl.float32) * wsc[:, None] * xs[None, :]
        else:
            acc += tl.dot(x8, tl.trans(w8), out_dtype=tl.int32).to(tl.float32) * xs[:, None] * wsc[None, :]
    if SWAP:
        acc = tl.trans(acc)
    store_tile(out_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, M, N, stride_om, pid, tl.program_id(1),
               SPLIT_K)
