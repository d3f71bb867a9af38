import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.quant.reorder import invert_permutation, permute_input, permute_output, select_outlier_channels


def test_select_outlier_channels_by_hand():
    perm = select_outlier_channels(torch.tensor([0.1, 3.0, 0.2, 5.0, 0.3]), k=2)
    assert perm.tolist() == [0, 2, 4, 1, 3]  # both groups in channel order


def test_outliers_end_last_and_normal_channels_keep_their_order():
    stat = torch.rand(256) + 0.1
    planted = torch.randperm(256)[:16]
    stat[planted] *= 100
    perm = select_outlier_channels(stat, k=16)
    assert sorted(perm.tolist()) == list(range(256))
    assert sorted(perm[-16:].tolist()) == sorted(planted.tolist())
    assert bool((perm[:-16].diff() > 0).all())


def test_k_zero_is_identity_and_bad_k_raises():
    stat = torch.rand(10) + 0.1
    assert select_outlier_channels(stat, k=0).tolist() == list(range(10))
    for k in (10, 11, -1):
        with pytest.raises(LowbitError, match=f"k={k}"):
            select_outlier_channels(stat, k=k)
    with pytest.raises(LowbitError):
        select_outlier_channels(torch.rand(2, 5), k=1)


def test_invert_permutation():
    perm = torch.randperm(50)
    inv = invert_permutation(perm)
    t = torch.randn(50)
    torch.testing.assert_close(t[perm][inv], t, rtol=0, atol=0)
    assert perm[inv].tolist() == list(range(50))


def test_permuting_a_linear_producer_and_its_consumer_keeps_the_output():
    """gate/up (producers, with bias) -> SiLU-gated product -> down (consumer): Atom on down_proj's input."""
    x = torch.randn(9, 24, dtype=torch.float64)
    gate, up = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    b_up = torch.randn(40, dtype=torch.float64)
    down = torch.randn(24, 40, dtype=torch.float64)
    a = F.silu(x @ gate.T) * (x @ up.T + b_up)
    ref = a @ down.T
    perm = select_outlier_channels(a.pow(2).mean(0), k=8)
    gate_p, up_p, b_up_p = (permute_output(t, perm) for t in (gate, up, b_up))
    a_p = F.silu(x @ gate_p.T) * (x @ up_p.T + b_up_p)
    torch.testing.assert_close(a_p @ permute_input(down, perm).T, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a_p, a[:, perm], rtol=1e-12, atol=1e-12)  # outliers now last
    assert not torch.allclose(a_p @ down.T, ref)  # the consumer must follow


def test_permuting_after_an_rmsnorm_needs_the_gathered_input():
    x = torch.randn(7, 32, dtype=torch.float64)
    g = torch.rand(32, dtype=torch.float64) + 0.5
    w = torch.randn(12, 32, dtype=torch.float64)
    ref = F.rms_norm(x, (32,), g, 1e-6) @ w.T
    perm = select_outlier_channels(torch.rand(32), k=4)
    g_p, w_p = permute_output(g, perm), permute_input(w, perm)
    out = F.rms_norm(permute_input(x, perm), (32,), g_p, 1e-6) @ w_p.T
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # The permuted norm weight alone, on the stream in its original order, is wrong.
    assert not torch.allclose(F.rms_norm(x, (32,), g_p, 1e-6) @ w_p.T, ref)
