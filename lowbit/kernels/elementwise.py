"""RMSNorm, the rotary embedding and SiLU-and-mul in one pass each, for 16-bit activations on CUDA.

Hugging Face's Llama computes each in several torch ops (the norm: upcast, square, mean, rsqrt,
scale, downcast, weight; the rotary embedding: cos, sin, rotate-half by a negation and a
concatenation, two products and a sum; SiLU, then a product), each a full read and write of the
activations. These
kernels read and write them once and round where HF's ops round, so they give HF's values: the norm
rounds the normalized row to the input's dtype before the weight multiplies it; the rotary
embedding rounds cos and sin to the activations' dtype, then each product and the sum; SiLU-and-mul
rounds SiLU(gate), then the product. The norm can also add the residual before it (the decoder's
residual add, rounded as torch's add). fp32 tensors and CPU tensors take the torch references
(`reference.rmsnorm`, `reference.rotary`, `reference.silu_mul`).
"""
from __future__ import annotations

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import libdevice, tl, triton, use_triton


def _kernel_dtype(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in (torch.bfloat16, torch.float16)


def rmsnorm_triton(x, weight, eps, residual=None):
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    r2 = x2 if residual is None else residual.reshape(-1, h)
    r_out = x2 if residual is None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(h)
    _rmsnorm_kernel[(x2.shape[0],)](x2, r2, r_out, weight, out, h, eps, x2.stride(0), r2.stride(0),
                                    RESID=residual is not None, BLOCK=block,
                                    num_warps=min(16, max(4, block // 1024)))
    out = out.view(*x.shape[:-1], h)
    return out if residual is None else (out, r_out.view(*x.shape[:-1], h))


def rotary_triton(positions, q, k, inv_freq):
    t, hq, d = q.shape
    _rotary_kernel[(t,)](q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         HQ=hq, HK=k.shape[1], BH=triton.next_power_of_2(max(hq, k.shape[1])), HALF=d // 2,
                         LIBDEVICE=q.is_cuda, num_warps=4, enable_fp_fusion=False)  # no FMA: HF rounds each product
    return q, k


def silu_mul_triton(x):
    t, two_i = x.shape
    out = torch.empty(t, two_i // 2, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(two_i // 2, block))](x, out, two_i // 2, x.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x `[T, 2I]` = [gate | up] -> `SiLU(gate) * up` `[T, I]`."""
    if _kernel_dtype(x) and x.stride(-1) == 1:
        return silu_mul_triton(x)
    return reference.silu_mul(x)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`weight * (x / rms(x))` over the last dim, as HF's LlamaRMSNorm computes it. With a residual
    (vLLM's fused_add_rms_norm), the norm of h = x + residual (rounded to x's dtype) in the same pass,
    so the decoder's residual add costs no kernel of its own -> (out, h), h the next residual."""
    if _kernel_dtype(x) and x.stride(-1) == 1 and (
            residual is None or (residual.dtype == x.dtype and residual.stride(-1) == 1)):
        return rmsnorm_triton(x, weight, eps, residual)
    return reference.rmsnorm(x, weight, eps, residual)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor):
    """HF's rotate-half rotary embedding of q `[T, Hq, D]` and k `[T, Hk, D]` at `positions` `[T]`,
    with `inv_freq` fp32 `[D/2]`. On the kernel path q and k are rotated in place (and returned)."""
    half = q.shape[-1] // 2
    if _kernel_dtype(q) and q.stride(-1) == k.stride(-1) == 1 and half & (half - 1) == 0:
        return rotary_triton(positions, q, k, inv_freq)
    return reference.rotary(positions, q, k, inv_freq)


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, ro_ptr, w_ptr, o_ptr, H, eps, stride_x, stride_r, RESID: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if RESID:  # h = x + residual, rounded as torch's add rounds; written out as the next residual
        r = tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(ro_ptr + row * H + offs, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)  # HF: normalized in fp32, back to the input's dtype
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(o_ptr + row * H + offs, (y * w.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotate(ptr, heads, offs, c, s, HEADS: tl.constexpr, HALF: tl.constexpr):
    ok = heads[:, None] < HEADS
    x1 = tl.load(ptr + offs, mask=ok, other=0.0)
    x2 = tl.load(ptr + offs + HALF, mask=ok, other=0.0)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # q * cos + rotate_half(q) * sin, with rotate_half(q) = [-x2, x1]: every op rounded to dt, as torch's
    o1 = (a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)
    o2 = (a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)
    tl.store(ptr + offs, o1.to(dt), mask=ok)
    tl.store(ptr + offs + HALF, o2.to(dt), mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, inv_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   HQ: tl.constexpr, HK: tl.constexpr, BH: tl.constexpr, HALF: tl.constexpr,
                   LIBDEVICE: tl.constexpr):
    t = tl.program_id(0)
    offs_d = tl.arange(0, HALF)
    ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + offs_d)
    dt = q_ptr.dtype.element_ty
    # angles reach thousands of radians: tl.cos / tl.sin are the GPU's approximations (cos.approx,
    # accurate only near [-pi, pi]); libdevice's are CUDA's cosf / sinf, which torch uses. The
    # interpreter has no libdevice; its tl.cos is numpy's.
    if LIBDEVICE:
        c, s = libdevice.cos(ang), libdevice.sin(ang)
    else:
        c, s = tl.cos(ang), tl.sin(ang)
    c = c.to(dt).to(tl.float32)[None, :]  # HF casts cos and sin to the activations' dtype
    s = s.to(dt).to(tl.float32)[None, :]
    heads = tl.arange(0, BH)
    _rotate(q_ptr + t * stride_qt, heads, heads[:, None] * stride_qh + offs_d[None, :], c, s, HQ, HALF)
    _rotate(k_ptr + t * stride_kt, heads, heads[:, None] * stride_kh + offs_d[None, :], c, s, HK, HALF)


@triton.jit
def _silu_mul_kernel(x_ptr, o_ptr, I, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # torch rounds SiLU(gate) first
    tl.store(o_ptr + row * I + offs, (act * u.to(tl.float32)).to(g.dtype), mask=ok)
