"""The one-pass categorical draw: the hash against a plain-integer MurmurHash3 finalizer, the
noise's distribution, the Triton kernel against its torch reference (same noise, same tokens)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.sampling import race_sample_triton  # noqa: E402

DEV = testing.triton_device()


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_fmix32_is_murmur3s_finalizer():
    assert _fmix32(1) == 0x514E28B7 and _fmix32(0) == 0  # MurmurHash3's published fmix32 values
    vals = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + torch.randint(0, 2 ** 32, (200,), generator=testing.gen()).tolist()
    got = reference.fmix32(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [_fmix32(v) for v in vals]


def test_race_noise_is_uniform_and_differs_by_stream_and_position():
    u = reference.race_noise(torch.tensor([0, 1, 0]), torch.tensor([5, 5, 6]), 200_000)
    assert 0 < u.min() and u.max() < 1
    for row in u:
        hist = torch.histc(row, bins=10, min=0, max=1) / row.numel()
        assert torch.allclose(hist, torch.full_like(hist, 0.1), atol=0.005)
    corr = torch.corrcoef(u)
    assert (corr - torch.eye(3)).abs().max() < 0.01


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_draws_the_references_tokens(dtype):
    """Ragged vocabulary (two splits, the second partial), sampled rows at several temperatures, a
    greedy row (noise 0: the argmax), a row cut to three tokens (-inf elsewhere)."""
    g = testing.gen()
    b, vocab = 7, 5003
    logits = (3 * testing.randn((b, vocab), g)).to(dtype)
    logits[5, :] = float("-inf")
    logits[5, [17, 4000, 5002]] = torch.tensor([1.0, 1.2, 0.9], dtype=dtype)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.25])
    noise = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    stream = torch.tensor([0, 1, 2, 3, 2 ** 32 - 1, 7, 7], dtype=torch.int64)
    pos = torch.tensor([10, 10, 10, 10, 3, 99, 100], dtype=torch.int64)
    want = reference.race_sample(logits, scale, noise, stream, pos)
    got = race_sample_triton(*(t.to(DEV) for t in (logits, scale, noise, stream, pos)))
    assert got.dtype == torch.int64 and got.cpu().tolist() == want.tolist()
    assert want[3] == logits[3].float().argmax() and want[5] in (17, 4000, 5002)
