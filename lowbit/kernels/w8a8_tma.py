"""W8A8 GEMM above 64 tokens on Hopper: int8 or fp8 operands brought in by TMA, the output sent out by it.

The kernel of `w8a8.py` loads its tiles with cp.async, one address per thread and element; here
each tile is one bulk copy from a descriptor built on the host, which leaves the warps free for the
MMAs, and TMA fills the ragged edges with zeros (a K tail of zero bytes is +0.0 in fp8 too).
`persistent` runs one program per SM over the tiles in grouped order (the grid's size is read at
run time, so a grid smaller than the GPU compiles nothing new), `warp_specialize` hands the
loads to producer warps, `split_store` writes the output tile in two halves of columns (a smaller
staging buffer in shared memory). On the H200, Llama-3-8B's layer at M = 4096 took 1463 us in int8
and 1403 us in fp8 (128 x 256 tiles, persistent) against 1698 us for the cp.async kernel and
1583 us for cuBLAS fp8 (docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels.common import cdiv, grouped_tile, sm_count, tl, triton


@dataclass(frozen=True)
class TmaConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_stages: int = 3
    num_warps: int = 8
    persistent: bool = False
    warp_specialize: bool = False
    split_store: bool = True
    group_m: int = 8


def tma_ok(x_q: torch.Tensor, codes: torch.Tensor) -> bool:
    """TMA wants sm_90 or newer, 16-byte aligned bases and row strides, and unit column strides;
    the bf16 output `[M, N]` then needs N % 8 == 0."""
    if x_q.is_cuda and torch.cuda.get_device_capability(x_q.device)[0] < 9:
        return False
    return codes.shape[0] % 8 == 0 and all(
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
        for t in (x_q, codes))


def w8a8_gemm_tma(x_q: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  cfg: TmaConfig) -> torch.Tensor:
    """`bf16 [M, N] = (x_q @ codes^T) * x_scale[:, None] * scale[None, :]` (both int8 or both fp8)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, _ = x_q.shape
    n = codes.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x_q.device)
    fp8 = x_q.dtype == torch.float8_e4m3fn
    if fp8 and not x_q.is_cuda:  # the interpreter's TMA copies bytes; the kernel bitcasts them back
        x_q, codes = x_q.view(torch.uint8), codes.view(torch.uint8)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    programs = min(tiles, sm_count(x_q.device) if x_q.is_cuda else 4) if cfg.persistent else tiles
    _w8a8_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x_q, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(codes, [cfg.block_n, cfg.block_k]),
        TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n // (2 if cfg.split_store else 1)]),
        x_scale, scale, m, n, x_q.shape[1], FP8=fp8, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
        GROUP_M=cfg.group_m, WS=cfg.warp_specialize, SPLIT_STORE=cfg.split_store,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@triton.jit
def _scaled_half(acc, xs, cs_ptr, offs_n, N):
    cs = tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)
    return (acc.to(tl.float32) * xs[:, None] * cs[None, :]).to(tl.bfloat16)


@triton.jit
def _w8a8_tma_kernel(x_desc, w_desc, out_desc, xs_ptr, cs_ptr, M, N, K, FP8: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     WS: tl.constexpr, SPLIT_STORE: tl.constexpr):
    ACC: tl.constexpr = tl.float32 if FP8 else tl.int32
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, tl.num_programs(0), flatten=True, warp_specialize=WS):
        pid_m, pid_n = grouped_tile(tile, grid_m, grid_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, K, BK):
            a = x_desc.load([om, k0])
            b = w_desc.load([on, k0])
            if FP8 and a.dtype == tl.uint8:
                a = a.to(tl.float8e4nv, bitcast=True)
                b = b.to(tl.float8e4nv, bitcast=True)
            acc = tl.dot(a, b.T, acc, out_dtype=ACC)
        offs_m = om + tl.arange(0, BM)
        xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
        if SPLIT_STORE:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            offs_n = on + tl.arange(0, BN // 2)
            out_desc.store([om, on], _scaled_half(left, xs, cs_ptr, offs_n, N))
            out_desc.store([om, on + BN // 2], _scaled_half(right, xs, cs_ptr, offs_n + BN // 2, N))
        else:
            out_desc.store([om, on], _scaled_half(acc, xs, cs_ptr, on + tl.arange(0, BN), N))
