"""Hadamard rotations of the residual stream (QuaRot): orthogonal changes of basis that leave the
model's function unchanged while spreading outlier channels over all channels.

`hadamard_matrix(n)` is `kron(S, P) / sqrt(n)` with `S` the Sylvester matrix of the largest power of
two it needs and `P` a Paley matrix of order `m` (or `[[1]]`); `apply_hadamard` computes `x @ H`
without forming `H`. Weights are folded in float64 and returned in their own dtype.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from lowbit.errors import LowbitError

_H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def _prime_power(q: int) -> tuple[int, int] | None:
    """`(p, k)` with `q == p**k`, p prime, k >= 1; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0 or d * d > q)
    p = p if q % p == 0 else q
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley_field(m: int) -> tuple[int, int] | None:
    """`(p, k)` of the field GF(p^k) whose Paley construction has order m, or None.

    Paley I: q = m - 1 ≡ 3 mod 4; Paley II: q = m/2 - 1 ≡ 1 mod 4."""
    if (m - 1) % 4 == 3 and (field := _prime_power(m - 1)):
        return field
    if m % 2 == 0 and (m // 2 - 1) % 4 == 1:
        return _prime_power(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, int]:
    """`(2^a, m)` with `n == 2^a * m` and m = 1 or the smallest Paley order that fits."""
    if n >= 1:
        odd = n // (n & -n)
        if odd == 1:
            return n, 1
        m = odd
        while n % m == 0:
            if _paley_field(m):
                return n // m, m
            m *= 2
    raise LowbitError(
        f"no Hadamard matrix of order {n} can be built (need 2^a, or 2^a times a Paley order); "
        f"use random_orthogonal({n}, seed) instead"
    )


def _quadratic_character(p: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over GF(p^k), elements numbered by their base-p digits (polynomial coefficients):
    `chi[a]` (0, +1 for a nonzero square, -1 otherwise) and `sub[a, b]`, the number of a - b."""
    q = p**k
    place = p ** torch.arange(k)
    digits = torch.arange(q)[:, None] // place % p
    sub = ((digits[:, None] - digits[None, :]) % p * place).sum(-1)
    # Find a primitive polynomial x^k + c_{k-1} x^{k-1} + ... + c_0 by walking the powers of x:
    # x has order q - 1 only in a field, and then its even powers are exactly the nonzero squares.
    one = (1,) + (0,) * (k - 1)
    for coeffs in itertools.product(range(p), repeat=k):
        if coeffs[0] == 0:
            continue
        power, powers = one, []
        for _ in range(q - 1):
            powers.append(sum(d * p**i for i, d in enumerate(power)))
            top = power[-1]  # x * power, with x^k = -(c_0 + ... + c_{k-1} x^{k-1})
            power = tuple((lo - top * c) % p for lo, c in zip((0,) + power[:-1], coeffs))
            if power == one:
                break
        if len(powers) == q - 1:
            chi = -torch.ones(q, dtype=torch.long)
            chi[0] = 0
            chi[powers[0::2]] = 1
            return chi, sub
    raise AssertionError(f"GF({p}^{k}) has no primitive polynomial")  # unreachable: one always exists


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    """An unnormalized ±1 float64 Hadamard matrix of order m (1 or a Paley order); cached, never modify."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    p, k = _paley_field(m)
    q = p**k
    chi, sub = _quadratic_character(p, k)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 1:] = chi[sub]  # the Jacobsthal matrix J[i, j] = chi(a_i - a_j)
    eye = torch.eye(q + 1, dtype=torch.float64)
    if q % 4 == 3:  # Paley I: core is a skew conference matrix S, and I + S is Hadamard
        core[1:, 0] = -1
        return eye + core
    core[1:, 0] = 1  # Paley II: core is a symmetric conference matrix C
    twin = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, _H2) + torch.kron(eye, twin)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal `[n, n]` Hadamard matrix (`H @ H.T == I`, entries ±1/sqrt(n)); dense, so for large n
    prefer `apply_hadamard`. Raises LowbitError when no construction covers n."""
    pow2, m = _factor(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(pow2.bit_length() - 1):
        sylvester = torch.kron(sylvester, _H2)
    return (torch.kron(sylvester, _paley(m)) / math.sqrt(n)).to(dtype)


@functools.lru_cache(maxsize=None)
def _paley_on(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_paley(m)` copied to the device once: no host-to-device copy per call (CUDA-graph capture forbids it)."""
    return _paley(m).to(device=device, dtype=dtype)


def apply_hadamard(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`x @ hadamard_matrix(n)` along `dim` without forming the matrix: a Walsh-Hadamard butterfly over
    the power-of-two factor and a small matmul over the Paley factor. Half-precision inputs are
    transformed in float32 and returned in their dtype."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    pow2, m = _factor(n)
    # Viewed as [..., 2^a, m], x @ kron(S, P) is S^T X P, and S is symmetric.
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, pow2, m)
    if m > 1:
        y = y @ _paley_on(m, y.device, y.dtype)
    h = 1
    while h < pow2:
        y = y.view(-1, pow2 // (2 * h), 2, h, m)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype).movedim(-1, dim)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal `[n, n]` matrix, reproducible from `seed`: the fallback for dims that no
    Hadamard construction covers (it must be stored or re-derived; it has no fast online transform)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _matmul64(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`a @ b` in float64 on `like`'s device, returned in `like`'s dtype."""
    return (a.to(like.device, torch.float64) @ b.to(like.device, torch.float64)).to(like.dtype)


def fuse_rmsnorm_into_linears(
    norm_weight: torch.Tensor, weights: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Absorb an RMSNorm's scale into the columns of the linears that read it: `(W * g, ...)` and a ones
    norm weight. Only a scale-free RMSNorm commutes with a rotation of its input, so fuse first."""
    fused = [(w * norm_weight.to(w.device)).to(w.dtype) for w in weights]
    return fused, torch.ones_like(norm_weight)


def rotate_input(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`W @ Q` for a linear `[N, K]` that reads the rotated stream `x @ Q`: `(x Q)(W Q)^T = x W^T`."""
    return _matmul64(w, q, w)


def rotate_output(
    w: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(Q^T @ W, bias @ Q)` for a linear `[K, M]` that writes into the rotated stream (`y Q`)."""
    return _matmul64(q.T, w, w), None if bias is None else _matmul64(bias, q, bias)


def rotate_embedding(emb: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`E @ Q`: an embedding's rows are stream vectors, so they rotate like activations."""
    return rotate_input(emb, q)
