"""Paged KV cache (int8 / int4 codes, or 16-bit values): write and decode attention, vs float64 and each other."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit.kernels import reference, testing  # noqa: E402
from lowbit.kernels.paged_attention import (DecodeConfig, kv_cache_write_triton,  # noqa: E402
                                            paged_decode_attention_triton)
from lowbit.quant.formats import unpack_int4  # noqa: E402
from lowbit.quant.kv import kv_roundtrip, quantize_kv  # noqa: E402
from lowbit.quant.recipes import KVSpec  # noqa: E402

DEV = testing.triton_device()
BS, HKV, HQ = 16, 2, 8
QBOUND = {8: 1.5e-2, 4: 0.2}  # asymmetric per (token, head) quantization error, relative


def _empty_cache(n_blocks, d, bits, g):
    return testing.random_kv_cache(n_blocks, BS, HKV, d, bits, g)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sign", [0, 1, -1])  # mixed signs, all positive, all negative rows
def test_cache_write(bits, d, sign):
    _check_cache_write(bits, d, sign)


@pytest.mark.parametrize("d", [64, 128])
def test_cache_write_16bit(d):
    _check_cache_write(16, d, 0)


def _check_cache_write(bits, d, sign):
    g = testing.gen()
    t, n_blocks = 21, 5
    key, value = testing.randn((t, HKV, d), g), testing.randn((t, HKV, d), g)
    if sign:  # one-signed rows: the quantization range must still hold 0 (quant/kv.py's contract)
        key, value = sign * (key.abs() + 0.5), sign * (value.abs() + 0.5)
    slots = testing.run_slots(n_blocks, BS, [1, 5, 2, 9, 4], g)
    slots[[3, 11]] = -1
    caches = _empty_cache(n_blocks, d, bits, g)
    ref = [None if c is None else c.clone() for c in caches]
    echo = reference.kv_cache_write(key, value, *ref, slots, echo=True)
    keep = slots >= 0
    packed = (False, bits == 4)
    for x, cache, sz, e, tp in ((key, ref[0], ref[2], echo[0], packed[0]), (value, ref[1], ref[3], echo[1], packed[1])):
        got = reference.kv_values(cache, sz, slots[keep], d, tp)
        assert e.dtype == x.dtype and torch.equal(e[keep], got.to(x.dtype))  # the echo: what the cache holds
        if bits == 16:
            assert torch.equal(got, x[keep].float())
            continue
        assert testing.rel_err(got, x[keep].double()) < QBOUND[bits]
        assert torch.equal(got, kv_roundtrip(x[keep].float(), KVSpec(bits)))  # the model's KV format
        assert torch.equal(e, kv_roundtrip(x.float(), KVSpec(bits)).to(x.dtype))  # unstored rows echo too
    untouched = torch.ones(n_blocks * BS, dtype=torch.bool)
    untouched[slots[keep]] = False
    for c, r, tp in zip(caches, ref, packed + (False, False)):
        if c is not None:
            rest = torch.arange(n_blocks * BS)[untouched]
            assert torch.equal(reference.codes_at(c, rest, tp), reference.codes_at(r, rest, tp))
    if DEV is None:
        return
    out = [None if c is None else c.to(DEV) for c in caches]
    echo_dev = kv_cache_write_triton(key.to(DEV), value.to(DEV), *out, slots.to(DEV), echo=True)
    for e, cache, sz, tp in zip(echo_dev, out[:2], out[2:], packed):  # exactly what this cache now holds
        held = reference.kv_values(cache, sz, slots[keep].to(DEV), d, tp)
        assert torch.equal(e[keep.to(DEV)], held.to(e.dtype))
    for e, r in zip(echo_dev, echo):  # unstored rows too: the reference's, but for a rare tie's one step
        assert testing.rel_err(e.cpu(), r.double()) < (1e-6 if bits == 16 else QBOUND[bits] / 4)
    if bits == 16:
        assert all(torch.equal(o.cpu(), r) for o, r in zip(out[:2], ref[:2]))
        return
    for o, r in zip(out[2:], ref[2:]):  # scales and zeros
        assert torch.allclose(o.cpu(), r, rtol=1e-6, atol=0)
    for o, r in zip(out[:2], ref[:2]):  # codes: a rounding tie may break the other way
        nib = (lambda c: torch.stack((c & 15, c >> 4), -1)) if bits == 4 else (lambda c: c)
        diff = (nib(o.cpu()).int() - nib(r).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("write_first", [[0, 2], [1], [0, 1, 2, 3]], ids=["evens", "odd", "both"])
def test_int4_v_pairs_share_a_byte(write_first):
    """Tokens 2j and 2j + 1 share a V byte: a write of one keeps the other's nibble, whether the
    other came in an earlier call or comes beside it in the same call (the Triton write quantizes the
    neighbour row too and stores the same byte); rows of one byte that are not neighbours are refused."""
    g, d = testing.gen(), 64
    caches = _empty_cache(2, d, 4, g)
    x = [testing.randn((6, HKV, d), g) for _ in range(2)]
    first = torch.tensor(write_first) + BS  # block 1, offsets 0..3
    second = torch.tensor([i for i in range(4) if i not in write_first] + [4, 5]) + BS
    writers = [(reference.kv_cache_write, "cpu")] + ([(kv_cache_write_triton, DEV)] if DEV is not None else [])
    results = []
    for write, dev in writers:
        c = [t.clone().to(dev) for t in caches]
        write(x[0][:len(first)].to(dev), x[1][:len(first)].to(dev), *c, first.to(dev))
        write(x[0][len(first):].to(dev), x[1][len(first):].to(dev), *c, second.to(dev))
        results.append([t.cpu() for t in c])
    allslots = torch.cat((first, second))
    want = kv_roundtrip(torch.cat((x[1][:len(first)], x[1][len(first):])).float(), KVSpec(4))
    for c in results:
        assert torch.equal(reference.kv_values(c[1], c[3], allslots, d, True), want)
        untouched = torch.arange(BS)  # block 0 as it was
        assert torch.equal(reference.codes_at(c[1], untouched, True), reference.codes_at(caches[1], untouched, True))
    with pytest.raises(ValueError, match="neighbours"):
        reference.kv_cache_write(x[0][:3], x[1][:3], *[t.clone() for t in caches], torch.tensor([20, 7, 21]))


def _decode_case(bits, d, seq_lens, g, device="cpu", hq=HQ, hkv=HKV, bs=BS):
    """A cache of random codes, block tables of shuffled blocks with -1 holes past each end."""
    b = len(seq_lens)
    n_blocks = sum(-(-n // bs) for n in seq_lens) + 2
    caches = testing.random_kv_cache(n_blocks, bs, hkv, d, bits, g)
    tables = testing.random_block_tables(seq_lens, bs, n_blocks, g)
    q = testing.randn((b, hq, d), g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = d ** -0.5
    want = torch.empty(b, hq, d, dtype=torch.float64)
    for i, n in enumerate(seq_lens):
        k, v = (x.double().repeat_interleave(hq // hkv, dim=1) for x in reference.cached_kv(*caches, tables[i], n, d))
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * scale, -1)
        want[i] = torch.einsum("hn,nhd->hd", p, v)
    args = [q, *caches, tables, lens]
    return [None if a is None else a.to(device) for a in args], scale, want


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("seq_lens", [[1], [17, 3, 100]], ids=["one", "ragged"])
def test_decode_reference_matches_float64(bits, seq_lens):
    args, scale, want = _decode_case(bits, 64, seq_lens, testing.gen())
    assert testing.rel_err(reference.paged_decode_attention(*args, scale), want) < 5e-3


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("seq_lens", [[1], [17, 3, 100]], ids=["one", "ragged"])
def test_decode_triton_matches_reference(bits, seq_lens, splits):
    args, scale, want = _decode_case(bits, 64, seq_lens, testing.gen(), DEV)
    out = paged_decode_attention_triton(*args, scale, splits=splits)
    assert testing.rel_err(out, reference.paged_decode_attention(*args, scale)) < 5e-3
    # fp16 query and probabilities in the MMAs: about 2e-3; int4's high plane one zero step off: 5e-3+
    assert testing.rel_err(out, want) < 3.5e-3


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("hq,hkv", [(3, 3), (9, 3), (16, 2), (32, 1)], ids=["gq1", "gq3", "gq8", "gq32"])
@pytest.mark.parametrize("bits", [4, 16])
def test_decode_group_sizes_match_float64(bits, hq, hkv):
    """Group sizes from 1 (15 padding rows) to 32 (two MMA row tiles), ragged ends and a split of
    two steps (300 tokens, BN 64); a 16-bit cache holds inf in every slot that is no sequence's token
    (past each end, and the blocks no table lists, block 0 among them), which must not reach the
    output (0 * inf is no 0 in the MMA)."""
    args, scale, want = _decode_case(bits, 64, [3, 17, 300], testing.gen(), DEV, hq, hkv)
    if bits == 16:
        k_cache, v_cache, tables, lens = args[1], args[2], args[5], args[6]
        listed = set(tables[tables >= 0].tolist())
        spare = min(set(range(k_cache.shape[0])) - listed)
        if 0 in listed:  # block 0 unlisted: move its tokens to a spare block
            tables[tables == 0] = spare
            for c in (k_cache, v_cache):
                c[spare] = c[0]
        valid = torch.zeros(k_cache.shape[0], BS, dtype=torch.bool, device=k_cache.device)
        for i, n in enumerate(lens.tolist()):
            for t in range(n):
                valid[int(tables[i, t // BS]), t % BS] = True
        for c in (k_cache, v_cache):
            c.masked_fill_(~valid[:, None, :, None], float("inf"))
    out = paged_decode_attention_triton(*args, scale, splits=2, config=DecodeConfig(block_n=64))
    assert testing.rel_err(out, want) < 3.5e-3


def test_cache_layout_is_head_major():
    """A (block, kv head)'s tokens are one contiguous run: slot 37 (block 2, offset 5), head 1 of a
    16-bit cache lands at [2, 1, 5], and its neighbours in memory are the same head's next tokens."""
    g = testing.gen()
    caches = _empty_cache(4, 64, 16, g)
    key, value = testing.randn((2, HKV, 64), g), testing.randn((2, HKV, 64), g)
    reference.kv_cache_write(key, value, *caches, torch.tensor([37, 38]))
    k = caches[0]
    assert torch.equal(k[2, 1, 5], key[0, 1]) and torch.equal(k[2, 0, 6], key[1, 0])
    assert torch.equal(k.reshape(-1)[((2 * HKV + 1) * BS + 6) * 64:][:64], key[1, 1])


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_write_kernel_codes_use_the_fp16_scale(bits):
    """Rows of range [0, 1], by hand: the scale the kernel stores is fp16(1 / qmax), and the codes are
    taken with it (0.9665 in 4 bits: code 15 with fp16(1/15) = 0.066650390625, 14 with fp32's 1/15;
    0.99803 in 8 bits: 254.5015 with fp16(1/255), 254.4976 with fp32's: 255 against 254)."""
    g = testing.gen()
    d = 64
    caches = [c.to(DEV) if c is not None else None for c in _empty_cache(2, d, bits, g)]
    x = torch.zeros(2, HKV, d)
    x[..., 1] = 1.0
    x[..., 2] = 0.9665 if bits == 4 else 0.99803
    kv_cache_write_triton(x.to(DEV), x.to(DEV), *caches, torch.tensor([3, 4], device=DEV))
    qmax = (1 << bits) - 1
    s16 = torch.tensor(1.0 / qmax).half().float()
    for cache, sz, packed in ((caches[0], caches[2], False), (caches[1], caches[3], bits == 4)):
        slots = torch.tensor([3, 4], device=DEV)
        got = reference.codes_at(cache, slots, packed, int4=bits == 4).cpu()
        got = unpack_int4(got, d, signed=False) if got.shape[-1] != d else got
        assert torch.equal(got[..., :3].long(), torch.tensor([0, qmax, qmax]).expand(2, HKV, 3))
        pairs = sz[reference.at_slots(sz, slots)].cpu()
        assert pairs.dtype == torch.float16 and torch.equal(pairs.float(), torch.stack(
            (s16.expand(2, HKV), torch.zeros(2, HKV)), -1))


def test_int4_layout_by_hand():
    """int4, by hand. V: slots 36, 37 (block 2, offsets 4, 5) are the low and high nibbles of pair 2 of each
    dim's run, which lies at byte 1 (swizzled: a word holds pairs 0, 2, 1, 3); a dim's 8 bytes are the
    block's 16 tokens, the next dim's follow. K: a token's row of 32 bytes (dims 2j, 2j + 1 in byte j)
    holds bytes 0, 2, 1, 3, 4, 6, 5, 7, ... of `pack_int4`'s order."""
    g = testing.gen()
    k, v, ksz, vsz = _empty_cache(4, 64, 4, g)
    value = testing.randn((2, HKV, 64), g)
    reference.kv_cache_write(value, value, k, v, ksz, vsz, torch.tensor([36, 37]))
    packed = quantize_kv(value.float(), 4)[0]  # [2, HKV, 32]: pack_int4's order
    codes = unpack_int4(packed, 64, signed=False)  # [2, HKV, 64]
    assert v.shape == (4, HKV, 64, BS // 2)
    assert torch.equal(v[2, 1, :, 1], codes[0, 1] | (codes[1, 1] << 4))
    flat = v.reshape(-1)
    assert torch.equal(flat[((2 * HKV + 1) * 64 + 3) * (BS // 2) + 1], v[2, 1, 3, 1])
    order = [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(k[2, 0, 4, :8], packed[0, 0, order]) and torch.equal(k[2, 1, 5, 8:16], packed[1, 1, 8:16][order])


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("config", [DecodeConfig(block_n=64, num_stages=2), DecodeConfig(maxnreg=128, waves=8),
                                    DecodeConfig(block_n=64, num_warps=2, waves=8), DecodeConfig(),
                                    DecodeConfig(block_n=32, num_warps=1), DecodeConfig(block_n=16, num_warps=1)],
                         ids=["bn64", "maxnreg128", "two_warps", "four_warps", "bn32", "bn16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_configs_the_sweep_times_match_float64(bits, config):
    args, scale, want = _decode_case(bits, 64, [17, 3, 300], testing.gen(), DEV)
    assert testing.rel_err(paged_decode_attention_triton(*args, scale, config=config), want) < 1e-2


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
@pytest.mark.parametrize("bs,config", [(32, DecodeConfig(block_n=16, num_warps=1)), (8, DecodeConfig(block_n=32, num_warps=1)),
                                       (128, DecodeConfig(block_n=64, num_warps=1)), (8, DecodeConfig(block_n=16, num_warps=1))],
                         ids=["bs32-bn16", "bs8-bn32", "bs128-bn64", "bs8-bn16"])
def test_kv4_decode_block_sizes(bs, config):
    """int4 steps read whole runs of a block: steps inside a block (block 32 or 128 tokens, steps of 16 or 64
    from an offset that is a multiple of the step) and steps over several blocks (blocks of 8 tokens: one
    swizzled 4-byte word of V^T a dim)."""
    args, scale, want = _decode_case(4, 64, [17, 3, 300], testing.gen(), DEV, bs=bs)
    assert testing.rel_err(paged_decode_attention_triton(*args, scale, splits=3, config=config), want) < 3.5e-3


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4, 16])
def test_decode_cuda_long_context(bits):
    args, scale, want = _decode_case(bits, 128, [4000, 1, 777, 2048], testing.gen(), "cuda")
    assert testing.rel_err(paged_decode_attention_triton(*args, scale), want) < 1e-2
