"""W4A8 GEMM: int4 weights x int8 per-token activations -> bf16, integer main loop.

Two weight formats share one layout (`W4A8Weight`):
- QServe progressive g128: `q8 = (q4 - z2) * s2` is exact in int8, `w = q8 * s1[n]`;
- per-channel int4 (signed codes, stored offset-binary: zero 8, scale 1 at level 2).

`_w4a8_kernel` widens int4 to int8 in registers, four codes per 32-bit op (`common.int4_*`),
and runs int8 x int8 -> int32 `tl.dot` (wgmma on sm_90a), one group of 128 per K-step, with the
per-token and per-channel scales in the epilogue. Four switches:
- SWAP: out^T = W x^T, the weight tile is the MMA's A operand, straight from registers, and the
  tokens its narrow side (16 and up): small M. Otherwise the weight goes through shared memory.
- SCALE_ACC (QServe): MMA the zero-shifted codes and apply s2 to the int32 partial sum once per
  group, instead of multiplying every weight by s2 (cheaper per weight, but each group's MMA
  must finish before its partial is scaled, and the group word is wanted in the accumulator's
  layout too, for which Triton re-loads it without the pipeline: one synchronous load a step).
- TMA: the activation and packed-weight tiles arrive as bulk tensor copies instead of cp.async
  (in the small-M sweep; not a default until timed).
Small M splits K across programs (one launch; see `common.store_tile`). Above 64 tokens the whole
weight is widened to int8 once per call (`_w4a8_widen_kernel`, about 4.3 TB/s) and the TMA-fed W8A8
kernel runs: faster on the H200 from 128 tokens up than this kernel with either switch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import (KBLOCK, TileConfig, acc_zeros, cdiv, grouped_tile, int4_widen, k_range,
                                   load_kblock, pack_halves, split_k, splitk_buffers, store_scaled, tl,
                                   triton, use_triton)
from lowbit.kernels.w8a8 import W8A8Weight, w8a8_gemm_triton
from lowbit.kernels.w8a8_tma import tma_ok
from lowbit.quant.formats import unpack_int4


@dataclass
class W4A8Weight:
    """A W4A8 weight in the kernels' layout (see `prepare_w4a8`).

    qweight: uint8 `[N, Kp/2]`, unsigned codes in `common.KBLOCK` half-split order (Kp = K padded);
    s1: fp32 `[N]`; zs: int32 `[Kp/128, N]`, each group's zero point z2 | scale s2 << 8, or None for
    per-channel int4 (codes offset by 8); k: the true K. zs is group-major, so a K-step reads it
    coalesced, and one 4-byte word, which Triton's pipeliner copies ahead with cp.async (4 bytes and
    up): two byte loads were left synchronous, and every K-step waited on them (long scoreboard).
    """
    qweight: torch.Tensor
    s1: torch.Tensor
    zs: torch.Tensor | None
    k: int

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @staticmethod
    def cat(parts: list["W4A8Weight"]) -> "W4A8Weight":
        """One weight whose output channels are the parts' in order (every tensor is per channel)."""
        grouped = parts[0].zs is not None
        if any(p.k != parts[0].k or (p.zs is not None) != grouped for p in parts):
            raise ValueError("W4A8 weights of different K or format")
        return W4A8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.s1 for p in parts]),
                          torch.cat([p.zs for p in parts], 1) if grouped else None, parts[0].k)

    def rows(self, start: int, stop: int, part: "W4A8Weight") -> "W4A8Weight":
        """Output channels [start, stop) as views of this weight (`part`'s own group scales kept: they
        are small and a column slice of the group-major ones would not be contiguous)."""
        return W4A8Weight(self.qweight[start:stop], self.s1[start:stop], part.zs, self.k)


def prepare_w4a8(qweight: torch.Tensor, k: int, s1: torch.Tensor, s2: torch.Tensor | None = None,
                 z2: torch.Tensor | None = None, group: int = 128) -> W4A8Weight:
    """Canonical checkpoint tensors -> `W4A8Weight` (once, at load).

    qweight: `pack_int4` codes `[N, ceil(k/2)]`: uint4 with `s2`/`z2` (uint8 `[N, ceil(k/group)]`,
    QServe progressive), or signed int4 without them (per-channel, `s1` the channel scale).
    """
    grouped = s2 is not None
    if grouped and group != KBLOCK:
        raise ValueError(f"W4A8 kernels take QServe groups of {KBLOCK}, not {group}")
    codes = unpack_int4(qweight, k, signed=not grouped)
    if not grouped:
        codes = (codes.to(torch.int16) + 8).to(torch.uint8)
    n_groups = cdiv(k, KBLOCK)

    zs = None
    if grouped:
        zs = (z2.to(torch.int32) | (s2.to(torch.int32) << 8))[:, :n_groups].t().contiguous()
    return W4A8Weight(pack_halves(codes), s1.float().contiguous(), zs, k)


@dataclass(frozen=True)
class W4A8Config(TileConfig):
    swap: bool = True
    block_m: int = 16
    scale_acc: bool = False  # QServe: s2 on the int32 partial sums (see the module doc)
    widen: bool = False  # widen to int8, then the W8A8 kernel (its default config)
    tma: bool = False  # activation and packed weight tiles by TMA (bulk copies), not cp.async


def default_config(m: int) -> W4A8Config:
    """The fastest of the configs swept on an H200 (docs/benchmarks.md)."""
    if m <= 64:  # 2 waves: 59.6 against 63.5 us at 4, the 8B layer at M = 1 (2026-12-04)
        return W4A8Config(scale_acc=True, block_m=max(16, triton.next_power_of_2(m)), block_n=64)
    return W4A8Config(widen=True)


def w4a8_widen(w: W4A8Weight) -> torch.Tensor:
    """The int8 weight `[N, Kp]` (columns past K are padding): a scratch copy for large M."""
    n, kh = w.qweight.shape
    out = torch.empty(n, 2 * kh, dtype=torch.int8, device=w.qweight.device)
    grouped = w.zs is not None
    _w4a8_widen_kernel[(cdiv(n, 64), kh // 64)](
        w.qweight, w.zs if grouped else w.qweight, out, n,
        w.qweight.stride(0), out.stride(0), GROUPED=grouped, BN=64, ASM=w.qweight.is_cuda, num_warps=4)
    return out


def w4a8_gemm_triton(x_q: torch.Tensor, x_scale: torch.Tensor, w: W4A8Weight,
                     config: W4A8Config | None = None) -> torch.Tensor:
    m, k = x_q.shape
    assert k == w.k and x_q.dtype == torch.int8 and x_q.stride(1) == 1
    n = w.n
    cfg = config or default_config(m)
    if cfg.widen:
        return w8a8_gemm_triton(x_q, x_scale, W8A8Weight(w4a8_widen(w)[:, :k], w.s1))
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x_q.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    split = split_k(cfg.split_k, tiles, cdiv(k, KBLOCK), x_q.device, cfg.waves)
    ws, locks = splitk_buffers(x_q.device, split * m * n if split > 1 else 0, tiles)
    grouped = w.zs is not None
    zs = w.zs if grouped else w.s1  # a placeholder the kernel never reads
    x_in, w_in = x_q, w.qweight
    tma = cfg.tma and tma_ok(x_q, w.qweight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_in = TensorDescriptor.from_tensor(x_q, [cfg.block_m, KBLOCK // 2])
        w_in = TensorDescriptor.from_tensor(w.qweight, [cfg.block_n, KBLOCK // 2])
    _w4a8_kernel[(tiles, split)](
        x_in, x_scale, w_in, w.s1, zs, out, ws, locks, m, n, k,
        x_q.stride(0), w.qweight.stride(0), out.stride(0),
        GROUPED=grouped, SWAP=cfg.swap, SCALE_ACC=grouped and cfg.scale_acc, BM=cfg.block_m,
        BN=cfg.block_n, SPLIT_K=split, GROUP_M=cfg.group_m, ASM=x_q.is_cuda, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def w4a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w: W4A8Weight) -> torch.Tensor:
    """`bf16 [M, N] = (x_q @ W^T) * x_scale[:, None]`; x_q int8 `[M, K]`, x_scale fp32 `[M]`."""
    if use_triton(x_q):
        return w4a8_gemm_triton(x_q, x_scale, w)
    return reference.w4a8_gemm(x_q, x_scale, w)


@triton.jit
def _w4a8_kernel(x_ptr, xs_ptr, w_ptr, s1_ptr, zs_ptr, out_ptr, ws_ptr, lock_ptr,
                 M, N, K, stride_xm, stride_wn, stride_om,
                 GROUPED: tl.constexpr, SWAP: tl.constexpr, SCALE_ACC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
                 ASM: tl.constexpr, TMA: tl.constexpr):
    """One output tile [BM tokens, BN channels] over this program's share of the K-steps. With TMA,
    x_ptr and w_ptr are tensor descriptors of `[BM, 64]` and `[BN, 64]` tiles (zero-filled edges)."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    first, last = k_range(tl.cdiv(K, 128), SPLIT_K)
    acc = acc_zeros(BM, BN, SWAP, tl.int32)
    for step in range(first, last):
        if TMA:
            a_lo = x_ptr.load([pid_m * BM, step * 128])
            a_hi = x_ptr.load([pid_m * BM, step * 128 + 64])
            p = w_ptr.load([pid_n * BN, step * 64])
        else:
            a_lo, a_hi, p = load_kblock(x_ptr, w_ptr, stride_xm, stride_wn, offs_m, offs_n, step, M, N, K)
        if GROUPED:
            z, s = _group_bytes(zs_ptr + step * N + offs_n, n_ok)
            if SCALE_ACC:
                lo, hi = int4_widen(p, z[:, None], None, ASM)
            else:
                lo, hi = int4_widen(p, z[:, None], s[:, None], ASM)
        else:
            lo, hi = int4_widen(p, tl.full([BN, 1], 8, tl.uint8), None, ASM)
        if SWAP:
            if SCALE_ACC:
                part = tl.dot(lo, tl.trans(a_lo), out_dtype=tl.int32)
                part = tl.dot(hi, tl.trans(a_hi), part, out_dtype=tl.int32)
                acc += s.to(tl.int32)[:, None] * part
            else:
                acc = tl.dot(lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
        else:
            if SCALE_ACC:
                part = tl.dot(a_lo, tl.trans(lo), out_dtype=tl.int32)
                part = tl.dot(a_hi, tl.trans(hi), part, out_dtype=tl.int32)
                acc += s.to(tl.int32)[None, :] * part
            else:
                acc = tl.dot(a_lo, tl.trans(lo), acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, tl.trans(hi), acc, out_dtype=tl.int32)
    store_scaled(out_ptr, ws_ptr, lock_ptr, acc, xs_ptr, s1_ptr, offs_m, offs_n, M, N, stride_om, pid,
                 SWAP, SPLIT_K)


@triton.jit
def _group_bytes(ptrs, ok):
    """The zero points and scales (uint8) of a K-step's group for the channels at `ptrs` (into zs)."""
    zs = tl.load(ptrs, mask=ok, other=0)
    return (zs & 0xFF).to(tl.uint8), ((zs >> 8) & 0xFF).to(tl.uint8)


@triton.jit
def _w4a8_widen_kernel(w_ptr, zs_ptr, out_ptr, N, stride_wn, stride_on,
                       GROUPED: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr):
    step = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, 64)
    ok = offs_n[:, None] < N
    p = tl.load(w_ptr + offs_n[:, None] * stride_wn + step * 64 + offs_h[None, :], mask=ok, other=0)
    if GROUPED:
        z, s = _group_bytes(zs_ptr + step * N + offs_n, offs_n < N)
        lo, hi = int4_widen(p, z[:, None], s[:, None], ASM)
    else:
        lo, hi = int4_widen(p, tl.full([BN, 1], 8, tl.uint8), None, ASM)
    dst = out_ptr + offs_n[:, None] * stride_on + step * 128 + offs_h[None, :]
    tl.store(dst, lo, mask=ok)
    tl.store(dst + 64, hi, mask=ok)
