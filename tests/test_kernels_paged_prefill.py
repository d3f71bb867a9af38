"""Prefill attention over the paged cache (fresh prompts and chunks over a cached context), vs float64."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.paged_prefill import PrefillConfig, paged_prefill_attention_triton  # noqa: E402

DEV = testing.triton_device()
BS = 16
SMALL = PrefillConfig(block_m=32, block_n=16, num_warps=4)  # several tiles and steps at test sizes


def _case(bits, d, hq, hkv, spans, listed, g, device="cpu"):
    """spans: (cached, new) tokens per sequence; `listed`: the sequences to compute. Returns the
    kernel's arguments, the output buffer (random: rows of other sequences must survive) and the
    float64 attention of each listed sequence's new tokens over its dequantized cache."""
    seq_lens = [c + n for c, n in spans]
    n_blocks = sum(-(-n // BS) for n in seq_lens) + 3
    caches = testing.random_kv_cache(n_blocks, BS, hkv, d, bits, g)
    tables = testing.random_block_tables(seq_lens, BS, n_blocks, g)
    cu = [0]
    for _, n in spans:
        cu.append(cu[-1] + n)
    q = testing.randn((cu[-1], hq, d), g)
    out = testing.randn((cu[-1], hq, d), g)
    scale = d ** -0.5
    want = out.double().clone()
    for i in listed:
        k, v = (x.double().repeat_interleave(hq // hkv, dim=1)
                for x in reference.cached_kv(*caches, tables[i], seq_lens[i], d))
        a, e = cu[i], cu[i + 1]
        for j in range(e - a):  # query j sees positions 0 .. cached + j
            seen = spans[i][0] + j + 1
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[a + j].double(), k[:seen]) * scale, -1)
            want[a + j] = torch.einsum("hn,nhd->hd", p, v[:seen])
    ints = [tables, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32),
            torch.tensor(listed, dtype=torch.int32)]
    args = [None if a is None else a.to(device) for a in [q, *caches, *ints]]
    return args, max(spans[i][1] for i in listed), scale, out.to(device), want


CASES = {  # (cached, new) per sequence, the listed ones
    "fresh": ([(0, 17), (0, 3), (0, 40)], [0, 1, 2]),
    "chunks": ([(21, 17), (0, 1), (5, 9), (64, 33)], [0, 2, 3]),  # sequence 1 (a decode) is not listed
}


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("case", CASES)
def test_prefill_reference_matches_float64(bits, case):
    args, _, scale, out, want = _case(bits, 64, 8, 2, *CASES[case], testing.gen())
    got = reference.paged_prefill_attention(*args, scale, out.clone())
    assert testing.rel_err(got, want) < 5e-3


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads", [(8, 2), (6, 2)], ids=["gqa4", "gqa3"])  # 3 query heads per kv head: padded rows
def test_prefill_triton_matches_float64(bits, case, heads):
    spans, listed = CASES[case]
    args, max_q, scale, out, want = _case(bits, 64, *heads, spans, listed, testing.gen(), DEV)
    got = paged_prefill_attention_triton(*args, max_q, scale, out.clone(), config=SMALL)
    # fp16 query and probabilities in the MMAs: about 2e-3; int4's high plane one zero step off: 7e-3+
    assert testing.rel_err(got, want) < 3.5e-3
    unlisted = torch.ones(got.shape[0], dtype=torch.bool)
    cu = args[-2].tolist()
    for i in listed:
        unlisted[cu[i]:cu[i + 1]] = False
    assert torch.equal(got[unlisted].cpu(), out[unlisted].cpu())


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4, 16])
def test_prefill_cuda_long_prompts(bits):
    spans, listed = [(0, 1024), (1000, 512), (0, 1), (3000, 77)], [0, 1, 3]
    args, max_q, scale, out, want = _case(bits, 128, 32, 8, spans, listed, testing.gen(), "cuda")
    got = paged_prefill_attention_triton(*args, max_q, scale, out.clone())
    assert testing.rel_err(got, want) < 1e-2
