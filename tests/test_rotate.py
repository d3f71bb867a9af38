import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.quant.rotate import (
    apply_hadamard,
    fuse_rmsnorm_into_linears,
    hadamard_matrix,
    random_orthogonal,
    rotate_embedding,
    rotate_input,
    rotate_output,
)

MODEL_DIMS = [64, 128, 576, 896, 1536, 2048, 4096, 4864, 5632, 8192, 11008, 13824, 14336, 18944, 28672]


def test_hadamard_2_and_4_by_hand():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(hadamard_matrix(2), h2 / math.sqrt(2), rtol=0, atol=1e-15)
    h4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    torch.testing.assert_close(hadamard_matrix(4), h4 / 2, rtol=0, atol=1e-15)


def test_hadamard_12_is_paley_i_over_gf11():
    squares = {1, 3, 4, 5, 9}  # the nonzero squares mod 11, by hand
    expected = torch.empty(12, 12, dtype=torch.float64)
    expected[0, :] = 1
    expected[1:, 0] = -1
    for i in range(11):
        for j in range(11):
            expected[1 + i, 1 + j] = 1 if i == j else (1 if (i - j) % 11 in squares else -1)
    torch.testing.assert_close(hadamard_matrix(12) * math.sqrt(12), expected, rtol=0, atol=1e-12)
    assert hadamard_matrix(12)[1, 2] * math.sqrt(12) == pytest.approx(-1)  # chi(0 - 1) = chi(10) = -1


# Paley I (12, 20, 44, 108, 344 over GF(7^3)) and Paley II (28, 36, 76, 148) orders, some times 2^a.
@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 28, 36, 44, 76, 108, 148, 344, 72])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", MODEL_DIMS)
def test_model_dims_have_an_online_hadamard(n):
    # Rows of H (the transform of basis vectors) must be orthonormal with entries ±1/sqrt(n), and
    # inner products of random rows must survive.
    rows = torch.zeros(3, n, dtype=torch.float64)
    rows[torch.arange(3), torch.randint(n, (3,))] = 1
    h_rows = apply_hadamard(rows)
    torch.testing.assert_close(h_rows.abs(), torch.full_like(h_rows, 1 / math.sqrt(n)))
    x = torch.randn(4, n, dtype=torch.float64)
    hx = apply_hadamard(x)
    torch.testing.assert_close(hx @ hx.T, x @ x.T, rtol=1e-12, atol=1e-10)
    assert not torch.allclose(hx, x)


@pytest.mark.parametrize("n", [2, 12, 64, 96, 576, 896, 1536])
def test_apply_hadamard_equals_matrix_product(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    h = hadamard_matrix(n)
    torch.testing.assert_close(apply_hadamard(x), x @ h, rtol=0, atol=1e-12)
    xt = x[0].T.contiguous()  # [n, 3], transform along dim 0
    torch.testing.assert_close(apply_hadamard(xt, dim=0), (x[0] @ h).T, rtol=0, atol=1e-12)


def test_apply_hadamard_keeps_half_precision_dtype():
    x = torch.randn(5, 896, dtype=torch.float64)
    y = apply_hadamard(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), x @ hadamard_matrix(896), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("n", [3, 6, 10, 92, 172])  # 92 and 172 exist, but not by Sylvester/Paley
def test_no_construction_raises_naming_n(n):
    with pytest.raises(LowbitError, match=f"order {n} "):
        hadamard_matrix(n)
    with pytest.raises(LowbitError, match=f"order {n} "):
        apply_hadamard(torch.randn(2, n))
    with pytest.raises(LowbitError, match="order 0 "):
        hadamard_matrix(0)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(40, seed=7)
    torch.testing.assert_close(q @ q.T, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(random_orthogonal(40, seed=7), q, rtol=0, atol=0)
    assert not torch.allclose(random_orthogonal(40, seed=8), q)


D, F_DIM, VOCAB, EPS = 24, 28, 50, 1e-6  # 24 = 2 * 12 (Paley I), 28 is Paley II


def _random_net():
    def w(*shape):
        return torch.randn(*shape, dtype=torch.float64) / math.sqrt(shape[-1])

    def norm():
        return torch.rand(D, dtype=torch.float64) + 0.5

    blocks = [
        dict(g=norm(), gate=w(F_DIM, D), up=w(F_DIM, D), down=w(D, F_DIM), b_down=torch.randn(D, dtype=torch.float64))
        for _ in range(2)
    ]
    return dict(emb=torch.randn(VOCAB, D, dtype=torch.float64), blocks=blocks, g_final=norm(), head=w(VOCAB, D))


def _forward(net, tokens, online_hadamard=False):
    """Embedding -> 2 x (RMSNorm -> gated MLP -> residual add) -> RMSNorm -> head."""
    h = net["emb"][tokens]
    for b in net["blocks"]:
        n = F.rms_norm(h, (D,), b["g"], EPS)
        a = F.silu(n @ b["gate"].T) * (n @ b["up"].T)
        if online_hadamard:
            a = apply_hadamard(a)
        h = h + a @ b["down"].T + b["b_down"]
    return F.rms_norm(h, (D,), net["g_final"], EPS) @ net["head"].T


def _rotate_net(net, q, fuse=True):
    def fused(g, weights):
        return fuse_rmsnorm_into_linears(g, weights) if fuse else (weights, g)

    blocks = []
    for b in net["blocks"]:
        (gate, up), g = fused(b["g"], [b["gate"], b["up"]])
        down, b_down = rotate_output(b["down"], q, b["b_down"])
        blocks.append(
            dict(g=g, gate=rotate_input(gate, q), up=rotate_input(up, q), down=rotate_input(down, hadamard_matrix(F_DIM)), b_down=b_down)
        )
    (head,), g_final = fused(net["g_final"], [net["head"]])
    return dict(emb=rotate_embedding(net["emb"], q), blocks=blocks, g_final=g_final, head=rotate_input(head, q))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_network_computes_the_same_function(kind):
    net = _random_net()
    tokens = torch.randint(VOCAB, (3, 7))
    q = hadamard_matrix(D) if kind == "hadamard" else random_orthogonal(D, seed=int(torch.randint(1 << 30, ())))
    ref = _forward(net, tokens)
    rotated = _rotate_net(net, q)
    assert (rotated["emb"] - net["emb"]).abs().max() > 0.1
    assert (_forward(rotated, tokens, online_hadamard=True) - ref).abs().max() < 1e-5
    # The norm weights must be folded first: an RMSNorm with a scale does not commute with Q.
    unfused = _rotate_net(net, q, fuse=False)
    assert (_forward(unfused, tokens, online_hadamard=True) - ref).abs().max() > 1e-2


def test_rotate_helpers_keep_dtype_and_rotate_bias():
    w = torch.randn(6, 12, dtype=torch.bfloat16)
    bias = torch.randn(12, dtype=torch.float32)
    q = hadamard_matrix(12)
    w_out, b_out = rotate_output(w.T.contiguous(), q, bias)
    assert rotate_input(w, q).dtype == torch.bfloat16 and w_out.dtype == torch.bfloat16
    torch.testing.assert_close(b_out, (bias.double() @ q).float())
    assert rotate_output(w.T, q)[1] is None
