"""What the kernel families share: the Triton import, dispatch, the int4 layout, jit helpers.

Triton is optional: without it the kernel modules still import (their `@triton.jit` bodies are
never launched) and every op runs its torch reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    HAS_TRITON = True
except ImportError:  # CPU-only installs
    HAS_TRITON = False

    class _Stub:
        """Stands in for `triton` and `triton.language` where a kernel module is merely imported."""
        @staticmethod
        def constexpr(v=None):
            return v

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = libdevice = _Stub()

# The kernels' int4 layout: K is padded to a multiple of KBLOCK and, inside each block of KBLOCK
# elements, byte j holds element j in its low nibble and element j + KBLOCK/2 in its high nibble, so
# the two nibble planes of a tile are two contiguous K-ranges and meet two plain activation tiles.
KBLOCK = 128


@dataclass(frozen=True)
class TileConfig:
    """A GEMM launch: tile sizes, K-splits (0: `waves` programs per SM), warps, pipeline stages,
    and swap (tokens on the MMA's narrow side, the weight tile its A operand: small M)."""
    swap: bool = False
    block_m: int = 64
    block_n: int = 128
    split_k: int = 0
    waves: int = 2
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule: the Triton kernel on CUDA tensors, the torch reference everywhere else."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_k(t: torch.Tensor, k_to: int, value: int = 0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, k_to - t.shape[-1]), value=value)


def pack_halves(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], `[N, K]` -> the kernels' layout `[N, Kp/2]` (Kp = K padded to KBLOCK)."""
    n, k = codes.shape
    kp = cdiv(k, KBLOCK) * KBLOCK
    c = pad_k(codes.to(torch.uint8), kp).view(n, kp // KBLOCK, 2, KBLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def unpack_halves(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_halves`: `[N, Kp/2]` -> uint8 codes `[N, Kp]`."""
    n, kh = packed.shape
    p = packed.view(n, kh // (KBLOCK // 2), 1, KBLOCK // 2)
    return torch.cat((p & 0xF, p >> 4), dim=2).reshape(n, 2 * kh)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(fixed: int, tiles: int, k_steps: int, device: torch.device, waves: int = 2) -> int:
    """K-splits: `fixed` if given, else enough programs for `waves` per SM; at most 16, one
    K-step each at least."""
    if not fixed:
        fixed = cdiv(waves * (sm_count(device) if device.type == "cuda" else 4), tiles)
    return max(1, min(fixed, 16, k_steps))


_SPLITK_BUFFERS: dict = {}
_OUTGROWN: list = []  # replaced buffers stay allocated: a captured CUDA graph still points at them


def splitk_buffers(device: torch.device, ws_numel: int, n_tiles: int):
    """fp32 workspace for split-K partial tiles and one arrival counter per output tile.

    Kept per device and grown on demand; the counters start at zero and the last-arriving program
    of each tile resets its counter, so they are zero again after every launch (CUDA graphs too).
    Kernels that use them must run on one stream at a time.
    """
    old = ws, locks = _SPLITK_BUFFERS.get(device, (None, None))
    if ws is None or ws.numel() < ws_numel:
        ws = torch.empty(max(ws_numel, 1 << 20), dtype=torch.float32, device=device)
    if locks is None or locks.numel() < n_tiles:
        locks = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
    _OUTGROWN.extend(t for t in old if t is not None and t is not ws and t is not locks)
    _SPLITK_BUFFERS[device] = (ws, locks)
    return ws, locks


@triton.jit
def round_half_even(x):
    """torch.round for fp32 |x| < 2**22: adding 1.5 * 2**23 leaves no fraction bits (round to nearest
    even), subtracting it back is exact. Interpreter-safe, unlike libdevice's rint."""
    return (x + 12582912.0) - 12582912.0


# SWAR (four bytes per 32-bit op) int4 widening, for the GPU; the interpreter runs no inline PTX,
# so each helper also computes the same int8 values with plain ops. Four codes of a register
# share a row and a group, hence one zero point and one scale (z, s are broadcast uint8 tiles).
# Byte lanes never carry: q | 0x80 minus z <= 15 cannot borrow, and q * s, z * s <= 240 (s <= 16).
def _both_planes(prologue: str, plane: str):
    """PTX that applies `plane` to the low nibbles of the 32-bit word $2 (output $0) and to its
    high nibbles (output $1); `plane` reads the word from u and writes {out}."""
    return tl.constexpr("{\n.reg .b32 u, v, t, m, sc, w, wl;\n" + prologue + "mov.b32 u, $2;\n"
                        + plane.format(out="$0") + "shr.u32 u, $2, 4;\n" + plane.format(out="$1") + "}")


# q - z: (q | 0x80) - z, then the 0x80 back off.
_SUB_ZERO_ASM = _both_planes("", """and.b32 t, u, 0x0F0F0F0F;
or.b32 t, t, 0x80808080;
sub.u32 t, t, $3;
xor.b32 {out}, t, 0x80808080;
""")

# (q - z) * s = q*s - z*s, a bytewise subtraction mod 256 (Hacker's Delight 2-18):
# d = ((u | H) - (w & ~H)) ^ (~(u ^ w) & H), H = 0x80808080.
_DEQUANT_ASM = _both_planes("and.b32 sc, $4, 0xFF;\nmul.lo.u32 w, $3, sc;\nand.b32 wl, w, 0x7F7F7F7F;\n",
                            """and.b32 v, u, 0x0F0F0F0F;
mul.lo.u32 v, v, sc;
or.b32 t, v, 0x80808080;
sub.u32 t, t, wl;
xor.b32 m, v, w;
not.b32 m, m;
and.b32 m, m, 0x80808080;
xor.b32 {out}, t, m;
""")

# Signed (two's complement) nibbles: (n ^ 8) - 8, with the borrow-free offset of the first.
_SIGNED_ASM = _both_planes("", """and.b32 t, u, 0x0F0F0F0F;
xor.b32 t, t, 0x88888888;
sub.u32 t, t, 0x08080808;
xor.b32 {out}, t, 0x80808080;
""")


@triton.jit
def int4_signed(p, ASM: tl.constexpr):
    """uint8 tile of signed int4 pairs -> (low, high) as int8 tiles in [-8, 7]."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_SIGNED_ASM, "=r,=r,r", [p], dtype=(tl.int8, tl.int8),
                                           is_pure=True, pack=4)
    else:
        lo = (((p & 15) ^ 8).to(tl.int32) - 8).to(tl.int8)
        hi = (((p >> 4) ^ 8).to(tl.int32) - 8).to(tl.int8)
    return lo, hi


# int4 codes -> bf16 weights (c - z) * s: a code in the low mantissa bits of 0x4300 is the bf16
# 128 + c, so (128 + c) - (128 + z) is exact and one bf16 multiply rounds the product, two values per
# 32-bit op. $4: four code bytes (low and high nibble planes); then four operands of four registers
# each, of which the first is read: $5, $9: 128 + z of the low and high plane as a bf16 pair; $13,
# $17: their scales as a bf16 pair (`_bf16_pair`: one value per row, so the four are equal).
_INT4_BF16_ASM = tl.constexpr("""{
.reg .b32 t0, t1, h;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xea;
sub.rn.bf16x2 $0, $0, $5;
mul.rn.bf16x2 $0, $0, $13;
lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xea;
sub.rn.bf16x2 $1, $1, $5;
mul.rn.bf16x2 $1, $1, $13;
shr.u32 h, t0, 4;
lop3.b32 $2, h, 0x000F000F, 0x43004300, 0xea;
sub.rn.bf16x2 $2, $2, $9;
mul.rn.bf16x2 $2, $2, $17;
shr.u32 h, t1, 4;
lop3.b32 $3, h, 0x000F000F, 0x43004300, 0xea;
sub.rn.bf16x2 $3, $3, $9;
mul.rn.bf16x2 $3, $3, $17;
}""")


@triton.jit
def _bf16_pair(x, like):
    """fp32 `[BN, 1]` -> int32 holding bf16(x) in both 16-bit halves, broadcast to `like`'s shape."""
    b = x.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.broadcast_to(b | (b << 16), like.shape)


@triton.jit
def int4_bf16(p, z_lo, s_lo, z_hi, s_hi, ASM: tl.constexpr):
    """uint8 tile of code pairs -> (low, high) bf16 weight tiles `(c - z) * bf16(s)`, the product
    rounded once (z uint8 or integer-valued fp32, s fp32: one per row, `[BN, 1]`, for each plane)."""
    if ASM:  # each row's bf16 pair built once, as one 32-bit value; impure: the weight's layout
        # change for the MMA then moves bf16 values (ldmatrix), not single bytes (see paged_attention)
        zl, zh = _bf16_pair(z_lo.to(tl.float32) + 128.0, p), _bf16_pair(z_hi.to(tl.float32) + 128.0, p)
        lo, hi = tl.inline_asm_elementwise(_INT4_BF16_ASM, "=r,=r,=r,=r" + ",r" * 17,
                                           [p, zl, zh, _bf16_pair(s_lo, p), _bf16_pair(s_hi, p)],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=False, pack=4)
    else:  # the same values: (c - z) * bf16(s) is exact in fp32, then rounded once
        sl = s_lo.to(tl.bfloat16).to(tl.float32)
        sh = s_hi.to(tl.bfloat16).to(tl.float32)
        lo = (((p & 15).to(tl.float32) - z_lo.to(tl.float32)) * sl).to(tl.bfloat16)
        hi = (((p >> 4).to(tl.float32) - z_hi.to(tl.float32)) * sh).to(tl.bfloat16)
    return lo, hi


@triton.jit
def int4_widen(p, z, s, ASM: tl.constexpr):
    """uint8 tile of code pairs -> (low, high) as int8 tiles: `(c - z) * s`, or `c - z` with s None
    (z, s: uint8, broadcast per row). Exact while the result fits in int8 (QServe: |q8| <= 119)."""
    if ASM:
        if s is None:
            lo, hi = tl.inline_asm_elementwise(_SUB_ZERO_ASM, "=r,=r,r,r", [p, z],
                                               dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_DEQUANT_ASM, "=r,=r,r,r,r", [p, z, s],
                                               dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        scale = 1 if s is None else s.to(tl.int32)
        lo = (((p & 15).to(tl.int32) - z.to(tl.int32)) * scale).to(tl.int8)
        hi = (((p >> 4).to(tl.int32) - z.to(tl.int32)) * scale).to(tl.int8)
    return lo, hi


@triton.jit
def store_tile(out_ptr, ws_ptr, lock_ptr, y, offs_m, offs_n, M, N, stride_om, tile_id, pid_k,
               SPLIT_K: tl.constexpr):
    """Write an fp32 output tile as bf16; with SPLIT_K > 1 the last program to finish a tile sums
    the partial tiles (fp32 workspace `[SPLIT_K, M, N]`) so a split-K GEMM is still one launch."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, y.to(tl.bfloat16), mask=mask)
    else:
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(y)
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(tl.bfloat16), mask=mask)
            tl.atomic_xchg(lock_ptr + tile_id, 0)


@triton.jit
def acc_zeros(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, DTYPE: tl.constexpr):
    """The accumulator of a [BM tokens, BN channels] tile, transposed when SWAP."""
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=DTYPE)
    else:
        acc = tl.zeros([BM, BN], dtype=DTYPE)
    return acc


@triton.jit
def store_scaled(out_ptr, ws_ptr, lock_ptr, acc, xs_ptr, cs_ptr, offs_m, offs_n, M, N, stride_om,
                 pid, SWAP: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue: the accumulator times per-token (xs) and per-channel (cs) scales, stored."""
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    cs = tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)
    if SWAP:
        y = tl.trans(acc.to(tl.float32) * cs[:, None] * xs[None, :])
    else:
        y = acc.to(tl.float32) * xs[:, None] * cs[None, :]
    store_tile(out_ptr, ws_ptr, lock_ptr, y, offs_m, offs_n, M, N, stride_om, pid, tl.program_id(1),
               SPLIT_K)


@triton.jit
def grouped_tile(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Output tile number `tile` -> its (row, column) tile in grouped order: GROUP_M row-tiles share
    each column sweep, for L2 reuse of the weights."""
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % rows, (tile % width) // rows


@triton.jit
def tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (pid, rows, columns), in grouped order."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    return pid, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def k_range(n_steps, SPLIT_K: tl.constexpr):
    """The K-steps [first, last) of this program's split (program_id(1))."""
    per_split = tl.cdiv(n_steps, SPLIT_K)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, n_steps)


@triton.jit
def load_kblock(x_ptr, w_ptr, stride_xm, stride_wn, offs_m, offs_n, step, M, N, K):
    """One K-step (KBLOCK) of a half-split int4 GEMM: the activation's two halves `[BM, 64]` and
    the packed weight `[BN, 64]` whose low / high nibbles meet them."""
    offs_h = tl.arange(0, 64)
    k0 = step * 128
    x_rows = x_ptr + offs_m[:, None] * stride_xm + k0 + offs_h[None, :]
    m_ok = offs_m[:, None] < M
    a_lo = tl.load(x_rows, mask=m_ok & (k0 + offs_h[None, :] < K), other=0)
    a_hi = tl.load(x_rows + 64, mask=m_ok & (k0 + 64 + offs_h[None, :] < K), other=0)
    p = tl.load(w_ptr + offs_n[:, None] * stride_wn + step * 64 + offs_h[None, :],
                mask=offs_n[:, None] < N, other=0)
    return a_lo, a_hi, p
