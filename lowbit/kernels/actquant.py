"""Fused per-token activation quantization: one program per token row, one read of its input.

- `rmsnorm_quant`: [residual add ->] RMSNorm [-> channel permutation] -> int8 or fp8 per token;
- `silu_mul_quant`: SiLU(gate) * up -> int8 or fp8 per token;
- `quant_per_token`: x -> int8 or fp8 per token;
- `group_quant`: x [-> channel permutation] -> symmetric int4 groups of 128 (W4A4's activations, a
  clip ratio), and the last k channels int8 per token (Atom's outliers).

int8: `s = absmax / 127`, `q = clamp(round(y / s), -128, 127)`; fp8 e4m3: `s = absmax / 448`,
`q = fp8(y / s)` (the references; the per-token kernels multiply by `qmax / absmax`, within an ulp of
the quotient: `_quantize_store`). An all-zero row gets `s = 0` and zero codes. With a residual, the sum is rounded
to the residual's dtype (it is written back as the next residual) before the norm reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import round_half_even, tl, triton, use_triton


def _launch_rows(n_cols: int, **kw):
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK=block, num_warps=min(32, max(4, block // 1024)), **kw)


def rmsnorm_quant_triton(x, weight, eps, residual=None, perm=None, out_dtype=torch.int8):
    t, h = x.shape
    q = torch.empty(t, h, dtype=out_dtype, device=x.device)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else None
    _rownorm_quant_kernel[(t,)](
        x, residual if residual is not None else x, res_out if residual is not None else x,
        weight, perm if perm is not None else weight, q, scale, h, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0,
        **_launch_rows(h, NORM=True, RESID=residual is not None,
                       PERM=perm is not None, FP8=out_dtype == torch.float8_e4m3fn))
    return (q, scale) if residual is None else (q, scale, res_out)


def quant_per_token_triton(x, out_dtype=torch.int8):
    t, h = x.shape
    q = torch.empty(t, h, dtype=out_dtype, device=x.device)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    _rownorm_quant_kernel[(t,)](
        x, x, x, x, x, q, scale, h, 0.0, x.stride(0), 0,
        **_launch_rows(h, NORM=False, RESID=False, PERM=False,
                       FP8=out_dtype == torch.float8_e4m3fn))
    return q, scale


@dataclass(frozen=True)
class RowConfig:
    """How `silu_mul_quant`'s program covers its token's row; the defaults are `_launch_rows`'.
    A whole row in one pass is held in registers, which bounds the rows in flight per SM; `chunk`
    columns at a time read it twice instead (its absmax, then its codes; the second read mostly
    from L2) in smaller programs, so that more rows fit an SM. Which is faster is the sweep's to
    say (`lowbit bench actquant --sweep`; not timed yet)."""
    chunk: int | None = None  # columns per pass (None: the whole row, one pass)
    num_warps: int | None = None  # (None: by the pass's width)


def silu_mul_quant_triton(x, out_dtype=torch.int8, config: RowConfig | None = None):
    t, two_i = x.shape
    i = two_i // 2
    cfg = config or RowConfig()
    two_pass = cfg.chunk is not None and cfg.chunk < i
    launch = _launch_rows(cfg.chunk if two_pass else i, FP8=out_dtype == torch.float8_e4m3fn, TWO_PASS=two_pass)
    if cfg.num_warps:
        launch["num_warps"] = cfg.num_warps
    q = torch.empty(t, i, dtype=out_dtype, device=x.device)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    _silu_mul_quant_kernel[(t,)](x, q, scale, i, x.stride(0), **launch)
    return q, scale


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                  perm: torch.Tensor | None = None, out_dtype: torch.dtype = torch.int8):
    """x `[T, H]`, weight `[H]`; perm (int `[H]`): output channel j is normalized channel perm[j].
    Returns `(q [T, H], scale fp32 [T])`, plus the new residual `x + residual` when given one."""
    if use_triton(x):
        return rmsnorm_quant_triton(x, weight, eps, residual, perm, out_dtype)
    return reference.rmsnorm_quant(x, weight, eps, residual, perm, out_dtype)


def silu_mul_quant(x: torch.Tensor, out_dtype: torch.dtype = torch.int8):
    """x `[T, 2I]` = [gate | up] -> `(q [T, I], scale fp32 [T])` of SiLU(gate) * up."""
    if use_triton(x):
        return silu_mul_quant_triton(x, out_dtype)
    return reference.silu_mul_quant(x, out_dtype)


def quant_per_token(x: torch.Tensor, out_dtype: torch.dtype = torch.int8):
    """x `[T, H]` -> `(q [T, H], scale fp32 [T])`."""
    if use_triton(x):
        return quant_per_token_triton(x, out_dtype)
    return reference.quant_per_token(x, out_dtype)


def group_quant_triton(x, perm, k4: int, clip: float, k_out: int):
    x = x if x.stride(1) == 1 else x.contiguous()
    t, h = x.shape
    groups = -(-k4 // 128)
    x4 = torch.empty(t, -(-k4 // 2), dtype=torch.uint8, device=x.device)
    xs4 = torch.empty(t, groups, dtype=torch.float32, device=x.device)
    x8 = torch.empty(t, k_out, dtype=torch.int8, device=x.device)
    xs8 = torch.empty(t, dtype=torch.float32, device=x.device) if k_out else torch.ones(t, device=x.device)
    _group_quant_kernel[(t,)](x, perm if perm is not None else x, x4, xs4, x8, xs8, k4, k_out, x.stride(0), groups,
                              clip, PERM=perm is not None, BKO=max(16, triton.next_power_of_2(k_out)), num_warps=4)
    return x4, xs4, x8, xs8


def group_quant(x: torch.Tensor, perm: torch.Tensor | None, k4: int, clip: float, k_out: int):
    """x `[T, H]` (its channels gathered by perm: channel j is x's perm[j]) -> W4A4's inputs: the first
    k4 channels as symmetric int4 in groups of 128 (`s = absmax * clip / 7`; `pack_int4` codes `[T, ceil(k4/2)]`,
    scales fp32 `[T, groups]`), the last k_out (= H - k4) int8 per token (`s = absmax / 127`; codes `[T, k_out]`,
    scales `[T]`, ones when k_out is 0): `formats.quantize` of each part, in one pass over the row."""
    if use_triton(x):
        return group_quant_triton(x, perm, k4, clip, k_out)
    return reference.group_quant(x, perm, k4, clip, k_out)


@triton.jit
def _qscale(amax, QMAX: tl.constexpr, CLIP):
    """`formats.compute_qparams`' symmetric scale: absmax * clip / qmax, 1 for an all-zero block."""
    s = tl.math.div_rn(amax * CLIP, QMAX)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _group_quant_kernel(x_ptr, perm_ptr, x4_ptr, xs4_ptr, x8_ptr, xs8_ptr, K4, KO, stride_x, G, clip,
                        PERM: tl.constexpr, BKO: tl.constexpr):
    """One token: each group of 128 channels as even and odd halves (a byte's low and high nibbles),
    then the outlier channels."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, 64)
    for g in range(0, G):
        cols = g * 128 + 2 * offs
        ok_e, ok_o = cols < K4, cols + 1 < K4
        if PERM:
            cols_e = tl.load(perm_ptr + cols, mask=ok_e, other=0)
            cols_o = tl.load(perm_ptr + cols + 1, mask=ok_o, other=0)
        else:
            cols_e, cols_o = cols, cols + 1
        x_e = tl.load(x_row + cols_e, mask=ok_e, other=0.0).to(tl.float32)
        x_o = tl.load(x_row + cols_o, mask=ok_o, other=0.0).to(tl.float32)
        s = _qscale(tl.maximum(tl.max(tl.abs(x_e), 0), tl.max(tl.abs(x_o), 0)), 7.0, clip)
        c_e = tl.clamp(round_half_even(tl.math.div_rn(x_e, s)), -8.0, 7.0).to(tl.int32)
        c_o = tl.clamp(round_half_even(tl.math.div_rn(x_o, s)), -8.0, 7.0).to(tl.int32)
        tl.store(x4_ptr + row * ((K4 + 1) // 2) + g * 64 + offs, ((c_e & 15) | ((c_o & 15) << 4)).to(tl.uint8),
                 mask=ok_e)
        tl.store(xs4_ptr + row * G + g, s)
    if KO > 0:
        o = tl.arange(0, BKO)
        ok = o < KO
        cols = K4 + o
        if PERM:
            cols = tl.load(perm_ptr + cols, mask=ok, other=0)
        y = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        s = _qscale(tl.max(tl.abs(y), 0), 127.0, 1.0)
        tl.store(x8_ptr + row * KO + o, tl.clamp(round_half_even(tl.math.div_rn(y, s)), -128.0, 127.0).to(tl.int8),
                 mask=ok)
        tl.store(xs8_ptr + row, s)


@triton.jit
def _quantize_store(q_ptrs, s_ptr, y, amax, mask, FP8: tl.constexpr):
    """`q = y / s` rounded as the format rounds, by one multiply with `qmax / amax` per element: a
    division per element (`div_rn`: a dozen instructions and a branch) made the kernels issue-bound.
    The product is within an ulp of the quotient, so a code differs from the reference's only where
    the quotient lies that close to a rounding tie."""
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    scale = amax / QMAX
    v = y * tl.where(amax > 0, QMAX / tl.where(amax > 0, amax, 1.0), 0.0)
    if FP8:
        q = tl.clamp(v, -448.0, 448.0).to(tl.float8e4nv)
    else:  # no clamp: |v| <= 127 within an ulp, which rounds to 127 at most
        q = round_half_even(v).to(tl.int8)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def _rownorm_quant_kernel(x_ptr, r_ptr, rout_ptr, w_ptr, perm_ptr, q_ptr, s_ptr, H, eps,
                          stride_x, stride_r, NORM: tl.constexpr, RESID: tl.constexpr,
                          PERM: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if RESID:
        h = x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        h = h.to(x.dtype)
        tl.store(rout_ptr + row * stride_r + offs, h, mask=ok)
        x = h
    y = x.to(tl.float32)
    rstd = 1.0
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, 0) / H + eps)
        y = y * rstd * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(y), 0)
    if PERM:  # the same values again, gathered in the output's channel order
        idx = tl.load(perm_ptr + offs, mask=ok, other=0)
        xp = tl.load(x_ptr + row * stride_x + idx, mask=ok, other=0.0)
        if RESID:
            xp = (xp.to(tl.float32) + tl.load(r_ptr + row * stride_r + idx, mask=ok, other=0.0).to(tl.float32)).to(xp.dtype)
        y = xp.to(tl.float32) * rstd * tl.load(w_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    _quantize_store(q_ptr + row * H + offs, s_ptr + row, y, amax, ok, FP8)


@triton.jit
def _silu_mul_cols(x_ptr, offs, ok, I):
    """SiLU(gate) * up at the columns `offs` of a row of `[gate | up]`, in fp32."""
    g = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + I + offs, mask=ok, other=0.0).to(tl.float32)
    return tl.math.fdiv(g, 1.0 + tl.exp(-g)) * u  # a fast (2 ulp) division: see _quantize_store


@triton.jit
def _silu_mul_quant_kernel(x_ptr, q_ptr, s_ptr, I, stride_x, FP8: tl.constexpr, BLOCK: tl.constexpr,
                           TWO_PASS: tl.constexpr):
    """One token: its row at once (BLOCK >= I), or BLOCK columns at a time, twice (`RowConfig`)."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    if TWO_PASS:
        amax = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, I, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul_cols(x_row, c0 + offs, c0 + offs < I, I)))
        top = tl.max(amax, 0)
        for c0 in range(0, I, BLOCK):  # the same values again: the same absmax, the one-pass codes
            ok = c0 + offs < I
            _quantize_store(q_ptr + row * I + c0 + offs, s_ptr + row, _silu_mul_cols(x_row, c0 + offs, ok, I),
                            top, ok, FP8)
    else:
        ok = offs < I
        y = _silu_mul_cols(x_row, offs, ok, I)
        _quantize_store(q_ptr + row * I + offs, s_ptr + row, y, tl.max(tl.abs(y), 0), ok, FP8)
