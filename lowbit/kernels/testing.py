"""Helpers shared by the kernel tests and the kernel benchmark: random canonical tensors, errors."""
from __future__ import annotations

import os

import torch

from lowbit.kernels import common


def _interpreter_fixes() -> None:
    """Bugs of Triton 3.6's interpreter that the kernels' tests would trip over:
    - loop bounds become ints through `int(array of shape (1,))`, which NumPy >= 2.4 refuses;
    - `tl.dot` multiplies bf16 operands as their raw uint16 bits (it widens only fp8);
    - fp32 -> bf16 truncates, where the GPU rounds to nearest even.
    (It has no fp8 loads and stores at all: fp8 kernels are tested on CUDA only.)"""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    if getattr(interpreter, "lowbit_fixed", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    cast = interpreter.InterpreterBuilder.cast_impl

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
            return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.cast_impl = patched_cast
    interpreter.InterpreterBuilder.create_dot = patched_dot
    interpreter.lowbit_fixed = True


def triton_device() -> str | None:
    """Where the Triton kernels can run in this process: "cuda", "cpu" (TRITON_INTERPRET=1, set
    before `lowbit.kernels` was first imported), or None (no Triton, or compiled for a GPU that
    is not here)."""
    if not common.HAS_TRITON:
        return None
    if torch.cuda.is_available():
        return "cuda"
    from triton.runtime.interpreter import InterpretedFunction
    interpreted = isinstance(common.round_half_even, InterpretedFunction)
    if interpreted:
        _interpreter_fixes()
    return "cpu" if interpreted and os.environ.get("TRITON_INTERPRET") == "1" else None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails any bound."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int | None = None, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(4), "little") if seed is None else seed)
    return g


def randint(lo: int, hi: int, shape, g: torch.Generator, dtype=torch.int8, device="cpu") -> torch.Tensor:
    """Uniform integers in [lo, hi] (inclusive)."""
    return torch.randint(lo, hi + 1, shape, generator=g, device=g.device).to(dtype).to(device)


def randscale(shape, g: torch.Generator, base: float = 1e-2, device="cpu") -> torch.Tensor:
    """Positive fp32 scales in [0.5, 1.5) * base."""
    return ((torch.rand(shape, generator=g, device=g.device) + 0.5) * base).to(device)


def randn(shape, g: torch.Generator, dtype=torch.bfloat16, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(dtype).to(device)


def random_kv_cache(n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, bits: int, g: torch.Generator,
                    device="cpu"):
    """[k, v, k_sz, v_sz] of `paged_attention`'s layout filled with random bytes (so a slot that is
    not written is noticed): codes and fp16 (scale, zero) pairs as the write makes them (the zero an
    integer code), or bf16 values and None (16 bits)."""
    shape = (n_blocks, n_kv_heads, block_size)
    if bits == 16:
        return [randn((*shape, head_dim), g, device=device) for _ in range(2)] + [None, None]
    width = head_dim // 2 if bits == 4 else head_dim
    v_shape = (n_blocks, n_kv_heads, head_dim, block_size // 2) if bits == 4 else (*shape, width)  # token-packed V
    codes = [randint(0, 255, s, g, torch.uint8, device) for s in ((*shape, width), v_shape)]
    sz = [torch.stack((randscale(shape, g, 1.0, device), randint(0, (1 << bits) - 1, shape, g, torch.float32, device)),
                      -1).half() for _ in range(2)]
    return codes + sz


def run_slots(n_blocks: int, block_size: int, lengths: list[int], g: torch.Generator) -> torch.Tensor:
    """int64 slots as the engine maps a step's tokens: run i (one sequence's new tokens) is positions
    i % 4 .. i % 4 + n - 1 of a sequence whose blocks are drawn at random, runs in shuffled order (so
    the two slots of an int4 V byte are neighbours when both are written, as the write wants)."""
    free = torch.randperm(n_blocks, generator=g).tolist()
    runs = []
    for i, n in enumerate(lengths):
        pos = torch.arange(i % 4, i % 4 + n)
        table = torch.tensor([free.pop() for _ in range(common.cdiv(i % 4 + n, block_size))])
        runs.append(table[pos // block_size] * block_size + pos % block_size)
    return torch.cat([runs[i] for i in torch.randperm(len(runs), generator=g).tolist()])


def random_block_tables(seq_lens: list[int], block_size: int, n_blocks: int, g: torch.Generator) -> torch.Tensor:
    """int32 `[B, max blocks + 1]`: distinct shuffled blocks for each sequence, -1 past its end."""
    width = max(common.cdiv(n, block_size) for n in seq_lens) + 1
    perm = torch.randperm(n_blocks, generator=g).to(torch.int32)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    taken = 0
    for i, n in enumerate(seq_lens):
        used = common.cdiv(n, block_size)
        tables[i, :used] = perm[taken:taken + used]
        taken += used
    return tables


def progressive_weight(n: int, k: int, g: torch.Generator, group: int = 128, device="cpu"):
    """Random canonical QServe progressive weight: (q4 uint8 [n, k], s1, s2, z2 uint8 [n, groups]);
    s2 <= 8 keeps |(q4 - z2) * s2| <= 120."""
    ng = common.cdiv(k, group)
    return (randint(0, 15, (n, k), g, torch.uint8, device), randscale(n, g, device=device),
            randint(1, 8, (n, ng), g, torch.uint8, device), randint(0, 15, (n, ng), g, torch.uint8, device))
