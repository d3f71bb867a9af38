"""`kernels/kv_gather.py`: a batch of sequences' cached K/V as packed rows, against the reference's
per-sequence read (`reference.cached_kv`) in float64 terms, for every cache layout."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.kv_gather import gather_kv_triton  # noqa: E402

DEV = testing.triton_device()
HKV = 2


def _case(bits, d, bs, lens, g, device="cpu"):
    """A random cache; the listed sequences (every other one of the batch) and their offsets."""
    n_blocks = sum(-(-n // bs) for n in lens) + 2
    caches = testing.random_kv_cache(n_blocks, bs, HKV, d, bits, g)
    tables = testing.random_block_tables(lens, bs, n_blocks, g)
    seqs = torch.arange(0, len(lens), 2, dtype=torch.int32)
    listed = [lens[i] for i in seqs.tolist()]
    cu = torch.tensor([0, *torch.tensor(listed).cumsum(0).tolist()], dtype=torch.int32)
    args = [None if a is None else a.to(device) for a in (*caches, tables, seqs, cu)]
    return args, max(listed), sum(listed), caches, tables, seqs


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("bs", [16, 8])
def test_reference_is_each_sequence_read_in_turn(bits, bs):
    g = testing.gen()
    args, max_k, total, caches, tables, seqs = _case(bits, 64, bs, [17, 5, 33, 1, 64], g)
    k, v = reference.gather_kv(*args, max_k, total, 64, torch.float32)
    rows = 0
    for s in seqs.tolist():
        n = [17, 5, 33, 1, 64][s]
        want = reference.cached_kv(*caches, tables[s], n, 64)
        assert torch.equal(k[rows:rows + n], want[0]) and torch.equal(v[rows:rows + n], want[1])
        rows += n
    assert rows == total == k.shape[0]


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("bs,lens", [(16, [17, 5, 33, 1, 64]), (8, [3, 9, 70]), (32, [1])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_the_reference(bits, bs, lens, dtype):
    """Ragged sequences over shuffled blocks (a table's -1 past its end), block sizes 4 to 32, int4's two
    nibble orders (K along head_dim, V along the tokens): the same values, rounded once to `dtype`."""
    g = testing.gen()
    args, max_k, total, *_ = _case(bits, 64, bs, lens, g, DEV)
    got = gather_kv_triton(*args, max_k, total, 64, dtype)
    want = reference.gather_kv(*[None if a is None else a.cpu() for a in args], max_k, total, 64, torch.float64)
    for x, w in zip(got, want):
        assert x.dtype == dtype and x.shape == w.shape
        assert torch.equal(x.cpu(), w.to(dtype))  # (c - z) * s in fp32 is exact at these scales and codes

