"""W8A8 GEMM: int8 or fp8 e4m3 weights (per channel) x activations (per token) -> bf16.

Both run Triton kernels (int32 or fp32 accumulator, scales in the epilogue): this module's, which
loads with cp.async, below `TMA_MIN_M` tokens, and from there the TMA-fed one of `w8a8_tma.py`.
fp8 runs `torch._scaled_mm` (cuBLAS, row-wise scales) between `FP8_TRITON_MAX_M` and
`FP8_TMA_MIN_M` tokens, where it is the faster (measured on an H200, docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import (TileConfig, acc_zeros, cdiv, k_range, split_k, splitk_buffers,
                                   store_scaled, tile_offsets, tl, triton, use_triton)
from lowbit.kernels.w8a8_tma import TmaConfig, tma_ok, w8a8_gemm_tma

FP8_TRITON_MAX_M = 16
TMA_MIN_M = 65
FP8_TMA_MIN_M = 512


@dataclass
class W8A8Weight:
    """qweight: int8 or float8_e4m3fn `[N, K]`; scale: fp32 `[N]`."""
    qweight: torch.Tensor
    scale: torch.Tensor

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @staticmethod
    def cat(parts: list["W8A8Weight"]) -> "W8A8Weight":
        """One weight whose output channels are the parts' in order."""
        if len({(p.qweight.dtype, p.qweight.shape[1]) for p in parts}) != 1:
            raise ValueError("W8A8 weights of different K or dtype")
        dtype = parts[0].qweight.dtype  # concatenated as bytes: every backend copies those, fp8 included
        codes = torch.cat([p.qweight.view(torch.uint8) for p in parts]).view(dtype)
        return W8A8Weight(codes, torch.cat([p.scale for p in parts]))

    def rows(self, start: int, stop: int, part: "W8A8Weight") -> "W8A8Weight":
        """Output channels [start, stop) as views of this weight."""
        return W8A8Weight(self.qweight[start:stop], self.scale[start:stop])


def prepare_w8a8(qweight: torch.Tensor, scale: torch.Tensor) -> W8A8Weight:
    """The canonical layout is the kernel's: row-major codes and fp32 channel scales."""
    assert qweight.dtype in (torch.int8, torch.float8_e4m3fn)
    return W8A8Weight(qweight.contiguous(), scale.float().reshape(-1).contiguous())


@dataclass(frozen=True)
class W8A8Config(TileConfig):
    block_k: int = 128


def _cp_async_config(m: int) -> W8A8Config:
    """This module's kernel above 64 tokens: where TMA cannot load the operands (`tma_ok`)."""
    if m <= 256:
        return W8A8Config(False, 64, 128, num_warps=4, num_stages=4)
    return W8A8Config(False, 128, 256, num_warps=8, num_stages=3)


def default_config(m: int, fp8: bool = False) -> W8A8Config | TmaConfig:
    """The fastest of the configs swept on an H200 (docs/benchmarks.md)."""
    if m < TMA_MIN_M:
        return W8A8Config(swap=True, block_m=max(16, triton.next_power_of_2(m)), block_n=128)
    if not fp8:  # 64-row tiles up to 512 tokens (8B layer: 224.9 against 230.2 us at 512, 323.5 against 269.7 at 600)
        return TmaConfig(block_m=64, num_warps=4, num_stages=4) if m <= 512 else TmaConfig()
    if m < 1024:
        return TmaConfig(persistent=True, num_stages=4)
    return TmaConfig(block_n=256, persistent=True)


def w8a8_gemm_triton(x_q: torch.Tensor, x_scale: torch.Tensor, w: W8A8Weight,
                     config: W8A8Config | TmaConfig | None = None) -> torch.Tensor:
    m, k = x_q.shape
    assert x_q.dtype == w.qweight.dtype and w.qweight.shape[1] == k and x_q.stride(1) == 1
    n = w.n
    cfg = config or default_config(m, x_q.dtype == torch.float8_e4m3fn)
    if isinstance(cfg, TmaConfig):
        if tma_ok(x_q, w.qweight):
            return w8a8_gemm_tma(x_q, x_scale, w.qweight, w.scale, cfg)
        cfg = _cp_async_config(m)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x_q.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    split = split_k(cfg.split_k, tiles, cdiv(k, cfg.block_k), x_q.device, cfg.waves)
    ws, locks = splitk_buffers(x_q.device, split * m * n if split > 1 else 0, tiles)
    _w8a8_kernel[(tiles, split)](
        x_q, x_scale, w.qweight, w.scale, out, ws, locks, m, n, k,
        x_q.stride(0), w.qweight.stride(0), out.stride(0),
        FP8=x_q.dtype == torch.float8_e4m3fn, SWAP=cfg.swap,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=split, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _scaled_mm_ok(x_q: torch.Tensor, w: W8A8Weight) -> bool:
    """fp8 through cuBLAS: where it is faster than our kernels, or the TMA one cannot run."""
    m, k = x_q.shape
    if x_q.dtype != torch.float8_e4m3fn or m <= FP8_TRITON_MAX_M or k % 16 or w.n % 16:
        return False
    return m < FP8_TMA_MIN_M or not tma_ok(x_q, w.qweight)


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w: W8A8Weight) -> torch.Tensor:
    """`bf16 [M, N] = (x_q @ qweight^T) * x_scale[:, None] * scale[None, :]`."""
    if not use_triton(x_q):
        return reference.w8a8_gemm(x_q, x_scale, w)
    if _scaled_mm_ok(x_q, w):
        return torch._scaled_mm(x_q, w.qweight.t(), scale_a=x_scale.reshape(-1, 1),
                                scale_b=w.scale.reshape(1, -1), out_dtype=torch.bfloat16)
    return w8a8_gemm_triton(x_q, x_scale, w)


@triton.jit
def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_scale_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K,
                 stride_xm, stride_wn, stride_om, FP8: tl.constexpr, SWAP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    if FP8:  # loaded as bytes, so masked elements can be +0.0
        ACC: tl.constexpr = tl.float32
        x_ptr = x_ptr.to(tl.pointer_type(tl.uint8))
        w_ptr = w_ptr.to(tl.pointer_type(tl.uint8))
    else:
        ACC: tl.constexpr = tl.int32
    pid, offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    first, last = k_range(tl.cdiv(K, BK), SPLIT_K)
    acc = acc_zeros(BM, BN, SWAP, ACC)
    for step in range(first, last):
        k_ok = step * BK + offs_k[None, :] < K
        a = tl.load(x_ptrs + step * BK, mask=(offs_m[:, None] < M) & k_ok, other=0)
        b = tl.load(w_ptrs + step * BK, mask=(offs_n[:, None] < N) & k_ok, other=0)
        if FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=ACC)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC)
    store_scaled(out_ptr, ws_ptr, lock_ptr, acc, xs_ptr, ws_scale_ptr, offs_m, offs_n, M, N, stride_om,
                 pid, SWAP, SPLIT_K)
