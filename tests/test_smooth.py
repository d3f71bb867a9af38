import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.layers.rotary import RotaryEmbedding
from lowbit.quant.smooth import (
    apply_smooth_attention,
    apply_smoothing,
    awq_search,
    smooth_attention_scales,
    smooth_scales,
)


def _outlier_inputs(t, k, n_outliers=4, factor=30.0):
    """Random `[t, k]` float64 activations whose first `n_outliers` random channels are `factor` larger."""
    x = torch.randn(t, k, dtype=torch.float64)
    x[:, torch.randperm(k)[:n_outliers]] *= factor
    return x


def _channel_ratio(x):
    """max / median of the per-channel absmax over tokens (dim 0)."""
    absmax = x.abs().amax(0)
    return float(absmax.max() / absmax.median())


def test_smooth_scales_by_hand():
    act = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    weights = [
        torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64),
        torch.tensor([[-3.0, 1.0, 0.25], [0.5, 0.5, -0.5]], dtype=torch.float64),
    ]  # column absmax over both: [3, 2, 0.5]
    expected = torch.tensor([2 / math.sqrt(3), 1 / math.sqrt(2), 3 / math.sqrt(0.5)], dtype=torch.float64)
    torch.testing.assert_close(smooth_scales(act, weights), expected)
    torch.testing.assert_close(smooth_scales(act, weights, alpha=1.0), act)
    assert smooth_scales(torch.tensor([0.0, 1.0]), [torch.randn(3, 2)]).min() > 0


def test_smoothing_a_norm_producer_keeps_the_product_and_flattens_outliers():
    k = 64
    x = _outlier_inputs(32, k, factor=100.0)
    g = torch.rand(k, dtype=torch.float64) + 0.5
    weights = [torch.randn(n, k, dtype=torch.float64) for n in (48, 16)]
    act = F.rms_norm(x, (k,), g, 1e-6)
    s = smooth_scales(act.abs().amax(0), weights, alpha=0.5)
    g_s, weights_s, bias = apply_smoothing(g, weights, s)
    assert bias is None
    act_s = F.rms_norm(x, (k,), g_s, 1e-6)
    for w, w_s in zip(weights, weights_s):
        torch.testing.assert_close(act_s @ w_s.T, act @ w.T, rtol=1e-12, atol=1e-12)
    assert _channel_ratio(act_s) < _channel_ratio(act) / 3


def test_smoothing_a_linear_producer_with_bias_keeps_the_product():
    x = torch.randn(10, 20, dtype=torch.float64)
    w1, b1 = torch.randn(32, 20, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    w2 = torch.randn(8, 32, dtype=torch.float64)
    s = torch.rand(32, dtype=torch.float64) * 10 + 0.1
    w1_s, (w2_s,), b1_s = apply_smoothing(w1, [w2], s, producer_bias=b1)
    torch.testing.assert_close((x @ w1_s.T + b1_s) @ w2_s.T, (x @ w1.T + b1) @ w2.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(w1_s, w1)


def _int4_group_rtn(w, group=32):
    """Symmetric int4 fake quantization in groups along K (the test's own quantizer)."""
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
    return (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(w.shape)


def test_awq_search_beats_plain_quantization_on_outlier_channels():
    x = _outlier_inputs(128, 128, n_outliers=6, factor=20.0)
    weights = [torch.randn(n, 128, dtype=torch.float64) for n in (64, 32)]

    def loss(s):
        return sum(float((x @ (_int4_group_rtn(w * s) / s).T - x @ w.T).pow(2).mean()) for w in weights)

    s = awq_search(x, weights, _int4_group_rtn, grid=20)
    assert s.shape == (128,) and s.min() > 0
    assert loss(s) < loss(torch.ones(128, dtype=torch.float64))


def test_awq_grid_of_one_is_plain_quantization():
    x = torch.randn(16, 64, dtype=torch.float64)
    s = awq_search(x, [torch.randn(8, 64, dtype=torch.float64)], _int4_group_rtn, grid=1)
    torch.testing.assert_close(s, torch.ones(64, dtype=torch.float64))
    with pytest.raises(LowbitError):
        awq_search(x, [torch.randn(8, 64, dtype=torch.float64)], _int4_group_rtn, grid=0)


N_HEADS, N_KV, HEAD_DIM, HIDDEN = 4, 2, 16, 32
ROPE = RotaryEmbedding(HEAD_DIM, theta=10000.0, scaling=None)  # rotate-half, as HF Llama


def _scores(x, positions, wq, wk, bq, bk):
    """Pre-softmax q.k after RoPE over all (q head, query, key) with GQA: q head h reads kv head h // group."""
    q, k = ROPE(positions, (x @ wq.T + bq).view(-1, N_HEADS, HEAD_DIM), (x @ wk.T + bk).view(-1, N_KV, HEAD_DIM))
    k = k.repeat_interleave(N_HEADS // N_KV, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


def test_smooth_attention_keeps_scores_after_rope_and_shrinks_key_outliers():
    wq = torch.randn(N_HEADS * HEAD_DIM, HIDDEN, dtype=torch.float64)
    wk = torch.randn(N_KV * HEAD_DIM, HIDDEN, dtype=torch.float64)
    wk[[3, HEAD_DIM + 12]] *= 50  # one member of a RoPE pair in each kv head is an outlier
    bq, bk = torch.randn(N_HEADS * HEAD_DIM, dtype=torch.float64), torch.randn(N_KV * HEAD_DIM, dtype=torch.float64)
    x = torch.randn(12, HIDDEN, dtype=torch.float64)
    positions = torch.randint(0, 4096, (12,))
    keys = (x @ wk.T + bk).view(-1, N_KV, HEAD_DIM)
    k_absmax = keys.abs().amax(0)

    lam = smooth_attention_scales(k_absmax, alpha=0.5)
    torch.testing.assert_close(lam[:, : HEAD_DIM // 2], lam[:, HEAD_DIM // 2 :], rtol=0, atol=0)
    wq_s, wk_s, bq_s, bk_s = apply_smooth_attention(wq, wk, lam, bq, bk)
    ref = _scores(x, positions, wq, wk, bq, bk)
    torch.testing.assert_close(_scores(x, positions, wq_s, wk_s, bq_s, bk_s), ref, rtol=1e-6, atol=1e-6)
    assert _channel_ratio((x @ wk_s.T + bk_s).view(-1, N_KV, HEAD_DIM)) < _channel_ratio(keys) / 3

    # Scales that ignore the RoPE pairing change the scores.
    unpaired = k_absmax.pow(0.5)
    moved = _scores(x, positions, *apply_smooth_attention(wq, wk, unpaired, bq, bk))
    assert (moved - ref).abs().max() > 1e-3 * ref.abs().max()


def test_smooth_attention_needs_even_head_dim():
    with pytest.raises(LowbitError, match="even head_dim"):
        smooth_attention_scales(torch.rand(2, 15) + 0.1)
