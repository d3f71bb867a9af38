"""The categorical draw of a batch in one pass over its logits (an exponential race with hashed noise).

Each row's token is `argmax_v(a z_v + b g_v)`: z the logits, a the row's inverse temperature, b 1
to sample (0: greedy, the argmax), g_v = -log(-log u_v) Gumbel noise, i.e. `argmax p_v / E_v` with
E_v = -log u_v ~ Exp(1). The uniform u_v is a counter-based hash of (the row's stream, the
position of the token being drawn, v), `race_noise`: no generator state, so a seeded request draws
the same tokens in any batch, after a preemption's recompute too, and the kernel and its torch
reference draw the same noise. One read of the logits against the torch path's eight passes over
fp32 copies (conversion, softmax, noise, division, two argmaxes): at batch 2048 and a 128k vocabulary,
the logits are 0.5 GB in bf16.
"""
from __future__ import annotations

import torch

from lowbit.kernels import reference
from lowbit.kernels.common import cdiv, sm_count, tl, triton, use_triton

BLOCK = 4096  # vocabulary entries per step of a program


def race_sample_triton(logits, scale, noise, stream, pos):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, vocab = logits.shape
    # enough (row, split) programs for two waves; the interpreter (tests) always splits, to merge
    splits = max(1, min(cdiv(vocab, BLOCK), cdiv(2 * sm_count(logits.device), b))) if logits.is_cuda else 2
    per_split = cdiv(cdiv(vocab, splits), BLOCK) * BLOCK
    best = torch.empty(b, splits, dtype=torch.float32, device=logits.device)
    arg = torch.empty(b, splits, dtype=torch.int64, device=logits.device)
    _race_kernel[(b, splits)](logits, scale, noise, stream, pos, best, arg, vocab, logits.stride(0), per_split,
                              SPLITS=splits, BLOCK=BLOCK, num_warps=8)
    if splits == 1:
        return arg[:, 0]
    return arg.gather(1, best.argmax(1, keepdim=True))[:, 0]  # the first split of the row's max: its first index


def race_sample(logits: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor, stream: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
    """logits `[B, V]` (any float dtype; -inf: excluded), scale / noise fp32 `[B]` (a, b above),
    stream / pos int64 `[B]` (the row's noise stream, its low 32 bits; the drawn token's position)
    -> int64 `[B]`."""
    if use_triton(logits):
        return race_sample_triton(logits, scale, noise, stream, pos)
    return reference.race_sample(logits, scale, noise, stream, pos)


@triton.jit
def _fmix32(h):
    """MurmurHash3's finalizer on uint32 (a bijection with full avalanche); `reference.fmix32`."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _race_kernel(z_ptr, a_ptr, b_ptr, stream_ptr, pos_ptr, best_ptr, arg_ptr, V, stride_z, per_split,
                 SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """One (row, split of the vocabulary): its max key and the first index reaching it."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    key = _fmix32(tl.load(stream_ptr + row).to(tl.uint32) ^ _fmix32(tl.load(pos_ptr + row).to(tl.uint32)))
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    start = sp * per_split
    for v0 in range(start, tl.minimum(start + per_split, V), BLOCK):
        idx = v0 + tl.arange(0, BLOCK)
        ok = idx < V
        z = tl.load(z_ptr + row.to(tl.int64) * stride_z + idx, mask=ok, other=float("-inf")).to(tl.float32)
        x = _fmix32(_fmix32(idx.to(tl.uint32)) ^ key)
        u = ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # odd / 2^24: in (0, 1), exact
        k = tl.where(ok, a * z + b * -tl.log(-tl.log(u)), float("-inf"))
        take = k > best  # per lane: the first index of its max
        best = tl.where(take, k, best)
        arg = tl.where(take, idx, arg)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, arg, 2147483647), 0)
    tl.store(best_ptr + row * SPLITS + sp, top)
    tl.store(arg_ptr + row * SPLITS + sp, tl.where(top > float("-inf"), first, start).to(tl.int64))
