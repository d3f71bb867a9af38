"""The engine on the KV kernels: kernel-layout caches, decode through `paged_decode_attention`, and
decode batches padded into static buffers (CUDA graphs on CUDA), against the torch path."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.engine.kv_cache import (KernelKVCache, PagedKVCache, QuantizedPagedKVCache,  # noqa: E402
                                    kv_cache_class, make_kv_cache)
from lowbit.engine import model_runner  # noqa: E402
from lowbit.engine.model_runner import HostBatch, StaticDecode, decode_buckets, prepare_inputs  # noqa: E402
from lowbit.kernels import paged_attention, testing  # noqa: E402
from lowbit.kernels.reference import at_slots  # noqa: E402
from lowbit.layers.attention import causal_attention, fresh_attention  # noqa: E402
from lowbit.layers.context import (FRESH_SHAPES, MAX_VIEW_RUNS, AttentionContext, ShapeHistory,  # noqa: E402
                                   equal_length_runs, row_index)
from lowbit.quant.kv import kv_roundtrip  # noqa: E402
from lowbit.quant.recipes import KVSpec  # noqa: E402

DEV = testing.triton_device()
CUDA = torch.cuda.is_available()
BS, HKV, D = 8, 2, 32


def _kv(t, g, dtype=torch.float32):
    return testing.randn((t, HKV, D), g, dtype), testing.randn((t, HKV, D), g, dtype)


def _slots(t, n_blocks, g):
    slots = testing.run_slots(n_blocks, BS, [1, 5, 2, 8, 4], g)[:t]
    slots[[1, 5]] = -1
    return slots


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_cache_matches_the_generic_cache(bits):
    g = testing.gen()
    n_blocks, t = 8, 20
    spec = KVSpec(bits)
    kernel = make_kv_cache(n_blocks, BS, HKV, D, torch.float32, "cpu", spec)
    generic = QuantizedPagedKVCache(n_blocks, BS, HKV, D, torch.float32, "cpu", spec)
    assert isinstance(kernel, KernelKVCache)
    k, v = _kv(t, g)
    slots = _slots(t, n_blocks, g)
    for cache in (kernel, generic):
        cache.store(k, v, slots)
    table = torch.randperm(n_blocks, generator=g).to(torch.int32)
    for n in (1, 7, n_blocks * BS):
        for a, b in zip(kernel.gather(table, n), generic.gather(table, n)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [None, KVSpec(8), KVSpec(4), KVSpec(4, group_size=16), KVSpec(8, fp8=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_echoes_what_the_cache_holds(spec, dtype):
    """The fresh-prompt path attends over the write's echo instead of reading the cache back: the
    echo must be what `read` returns for the stored rows, and the same format's values for the rest."""
    g = testing.gen()
    n_blocks, t = 8, 20
    cache = make_kv_cache(n_blocks, BS, HKV, D, dtype, "cpu", spec)
    k, v = _kv(t, g, dtype)
    slots = _slots(t, n_blocks, g)
    held = cache.store(k, v, slots, echo=True)
    keep = slots >= 0
    for e, r, x in zip(held, cache.read(slots[keep]), (k, v)):
        assert e.shape == x.shape and e.dtype == dtype and torch.equal(e[keep], r.to(dtype))
        if spec is None:
            assert torch.equal(e, x)
        else:
            assert torch.equal(e, kv_roundtrip(x, spec).to(dtype))  # the cache-less path's numbers
    assert cache.store(k, v, slots) is None


@pytest.mark.parametrize("spec", [None, KVSpec(8), KVSpec(4), KVSpec(4, group_size=16), KVSpec(8, fp8=True)])
def test_bytes_per_token_is_what_the_cache_allocates(spec):
    n_blocks = 3
    cache = make_kv_cache(n_blocks, BS, HKV, D, torch.bfloat16, "cpu", spec)
    tensors = ([cache.k, cache.v, cache.k_sz, cache.v_sz] if not isinstance(cache, QuantizedPagedKVCache)
               else [t for ts in cache.parts.values() for t in ts])
    allocated = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    assert allocated == n_blocks * BS * type(cache).bytes_per_token(HKV, D, torch.bfloat16, spec)


def test_which_cache_serves_which_format():
    assert kv_cache_class(None, D, BS) is PagedKVCache
    assert kv_cache_class(KVSpec(4), D, BS) is KernelKVCache and kv_cache_class(KVSpec(8), 128, BS) is KernelKVCache
    assert kv_cache_class(KVSpec(8), D, 24) is KernelKVCache
    for spec, d, bs in ((KVSpec(4, group_size=16), D, BS), (KVSpec(8, fp8=True), D, BS), (KVSpec(4), 16, BS),
                        (KVSpec(8), 96, BS), (KVSpec(4), D, 24), (KVSpec(4), D, 4)):  # int4 V: blocks of 2^k >= 8
        assert kv_cache_class(spec, d, bs) is QuantizedPagedKVCache
    bf16, fp32 = (PagedKVCache(2, BS, HKV, D, dt, "cpu") for dt in (torch.bfloat16, torch.float32))
    assert bf16.decode_kernel and not fp32.decode_kernel  # fp32 keeps the torch path


def _host_batch(steps, tables):
    """steps: per sequence (tokens, start, n): its new tokens are tokens[start:start + n]."""
    hb = HostBatch([], [], [], [0], [], [])
    for (toks, start, n), table in zip(steps, tables):
        hb.ids += toks[start:start + n]
        hb.positions += range(start, start + n)
        hb.slots += [table[p // BS] * BS + p % BS for p in range(start, start + n)]
        hb.cu.append(hb.cu[-1] + n)
        hb.seq_lens.append(start + n)
        hb.tables.append(table)
    return hb


def _mixed_batch(spec, dtype, device, g):
    """One step of decodes, chunks over a cached context and fresh prompts, whose rows are not contiguous
    (index tensors) and whose fresh lengths are ragged, through an attention layer over a fresh cache:
    (its output, what each sequence gets from the torch path over what the cache hands back, in float64)."""
    from lowbit.layers.attention import Attention

    hq, n_blocks = 4, 32
    attn = Attention(hq, HKV, D)
    attn.kv_spec, attn.kv_cache = spec, make_kv_cache(n_blocks, BS, HKV, D, dtype, device, spec)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    tables = [perm[4 * i:4 * i + 4] for i in range(7)]
    # decode, chunk over context, fresh, fresh, decode, chunk, fresh
    cached, new = [9, 8, 0, 0, 15, 3, 0], [1, 5, 6, 2, 1, 9, 11]
    first = _host_batch([([0] * c, 0, c) for c in cached if c], [t for t, c in zip(tables, cached) if c])
    _, _, ctx = prepare_inputs(first, device)
    attn.kv_cache.store(*(x.to(device) for x in _kv(len(first.ids), g, dtype)), ctx.slot_mapping)
    hb = _host_batch([([0] * (c + n), c, n) for c, n in zip(cached, new)], tables)
    _, _, ctx = prepare_inputs(hb, device)
    assert ctx.decode_seqs == [0, 4] and ctx.fresh_seqs == [2, 3, 6] and ctx.chunk_seqs == [1, 5]
    t = len(hb.ids)
    q = testing.randn((t, hq, D), g, dtype)
    k, v = _kv(t, g, dtype)
    out = attn(*(x.to(device) for x in (q, k, v)), ctx).cpu()
    wants = []
    for i in range(len(cached)):
        s, e = hb.cu[i], hb.cu[i + 1]
        ki, vi = attn.kv_cache.gather(torch.tensor(tables[i], device=device), hb.seq_lens[i])
        wants.append((s, e, causal_attention(q[s:e].double(), ki.cpu().double(), vi.cpu().double(), attn.scale)))
    return out, wants


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
@pytest.mark.parametrize("spec,dtype", [(KVSpec(4), torch.float32), (KVSpec(8), torch.float32),
                                        (None, torch.bfloat16), (KVSpec(4), torch.bfloat16)],
                         ids=["kv4", "kv8", "bf16", "kv4-bf16"])
def test_mixed_batch_attention_matches_the_torch_path(spec, dtype, device):
    """Decodes (one kernel call), chunks over cached context (on CUDA: gathered rows and varlen flash
    attention in 16 bits, the prefill kernel in 32; one at a time elsewhere) and fresh prompts in one
    batch: each sequence as the torch path computes it over what the cache hands back, in float64. On
    CUDA the kernels and flash attention serve them (fp16/bf16 MMAs)."""
    assert make_kv_cache(2, BS, HKV, D, dtype, device, spec).prefill_kernel == (device == "cuda")
    out, wants = _mixed_batch(spec, dtype, device, testing.gen())
    exact = dtype == torch.float32 and device == "cpu"
    for s, e, want in wants:
        assert testing.rel_err(out[s:e], want) < (1e-5 if exact else 1e-2)


@pytest.mark.parametrize("spec", [KVSpec(4), KVSpec(8), None], ids=["kv4", "kv8", "bf16"])
def test_chunks_attend_over_their_gathered_contexts(spec, monkeypatch):
    """The chunk path CUDA takes in 16 bits (`attention.chunk_attention`: every chunk's context gathered
    into packed rows, one varlen call), run on the CPU with `varlen_attn` replaced by flash attention's
    documented meaning (per sequence of the packed rows, the causal mask aligned to the last key)."""
    from lowbit.engine.kv_cache import PagedKVCache
    from lowbit.layers import attention

    calls = []

    def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, **kw):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        out = torch.empty_like(q)
        for i in range(len(cu_q) - 1):
            (a, b), (c, d) = cu_q[i:i + 2].tolist(), cu_k[i:i + 2].tolist()
            out[a:b] = causal_attention(q[a:b], k[c:d], v[c:d], scale)
        return out

    monkeypatch.setattr(attention, "_varlen_serves", lambda q, kv_dtype: True)
    monkeypatch.setattr(attention, "varlen_attn", varlen_reference)
    monkeypatch.setattr(attention, "_VARLEN", {})
    monkeypatch.setattr(PagedKVCache, "prefill_kernel", property(lambda self: True))
    out, wants = _mixed_batch(spec, torch.bfloat16, "cpu", testing.gen())
    # the fresh prompts' call (6, 2 and 11 tokens), then the two chunks' (5 new over 8 cached, 9 over 3):
    # one call over both, their whole contexts
    assert calls == [([0, 6, 8, 19], [0, 6, 8, 19], 11, 11), ([0, 5, 14], [0, 13, 25], 9, 13)]
    for s, e, want in wants:
        assert testing.rel_err(out[s:e], want) < 1e-2


def test_decode_buckets():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 24] and decode_buckets(1) == [1] and decode_buckets(3) == [1, 2, 4]
    big = decode_buckets(2048)
    assert big[33:37] == [248, 256, 272, 288] and big[-3:] == [1920, 1984, 2048]
    assert all(b - a <= max(8, a // 8) for a, b in zip(big, big[1:]))  # at most 1/8 padding past 8
    assert decode_buckets(600)[-3:] == [512, 576, 640]
    assert decode_buckets(10**6)[-1] == model_runner.MAX_GRAPH_BATCH  # larger decode batches run eagerly


def _prompts(g, n, longest=29, vocab=1024):
    return [torch.randint(3, vocab, (int(torch.randint(1, longest + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _llm(device, **kw):
    return LLM(random_weights="tiny", device=device, block_size=BS, max_model_len=64, max_num_seqs=12,
               num_kv_blocks=256, **kw)


def _static_vs_eager(llm, g, device, n=5, longest=29):
    """Prefill n sequences, then one decode step through both paths: (static logits, eager logits)."""
    runner = llm.engine.runner
    static = StaticDecode(llm.model, runner.cfg, runner.device, capture=False)
    prompts = _prompts(g, n, longest)
    perm = torch.randperm(runner.num_blocks, generator=g).tolist()
    tables = [perm[8 * i:8 * i + 8] for i in range(n)]
    with torch.inference_mode():
        ids, pos, ctx = prepare_inputs(_host_batch([(p, 0, len(p)) for p in prompts], tables), device)
        llm.model(ids, pos, ctx)
        hb = _host_batch([(p + [7], len(p), 1) for p in prompts], tables)
        ids, pos, ctx = prepare_inputs(hb, device)
        assert ctx.decode_only
        eager = llm.model.compute_logits(llm.model(ids, pos, ctx))
        caches = [c.k.clone() for c in runner.caches]
        padded = llm.model.compute_logits(static.hidden(hb))  # with padding rows (n = 5: bucket 8)
    written = torch.zeros(runner.num_blocks * BS, dtype=torch.bool, device=device)
    written[torch.tensor(hb.slots, device=device)] = True
    at = at_slots(caches[0], torch.arange(runner.num_blocks * BS, device=device)[~written])
    for before, c in zip(caches, runner.caches):  # the padding rows wrote nothing
        assert torch.equal(before[at], c.k[at])
    return padded, eager


@pytest.mark.parametrize("kw", [dict(recipe="w4a8kv4"), dict(dtype="bfloat16")], ids=["kv4", "bf16"])
def test_padded_static_decode_matches_eager(kw):
    padded, eager = _static_vs_eager(_llm("cpu", **kw), testing.gen(), "cpu")
    assert padded.shape == eager.shape
    assert testing.rel_err(padded, eager) < (1e-5 if "recipe" in kw else 1e-2)


def _generate(llm, prompts, n=8):
    """Greedy outputs with the two best logprobs of every step."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def _tokens(outputs):
    return [o.token_ids for o in outputs]


NEAR_TIE = 1e-3  # logprob gap under which paths that round differently may pick either token


def _assert_same_greedy(got, want):
    """The same greedy tokens from two paths whose numbers differ by rounding: a sequence may part
    only where `want`'s two best tokens were within NEAR_TIE and `got` took the second; after that
    the contexts differ and the rest is not compared."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g.token_ids) == len(w.token_ids)
        for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            if a != b:
                (best, lp0), (second, lp1) = w.logprobs[i].top[:2]
                assert b == best and a == second and lp0 - lp1 < NEAR_TIE, (i, a, b, w.logprobs[i].top)
                break


def test_engine_on_kernel_caches_matches_the_torch_path():
    """kv4 kernel caches with decode batches padded into the static buffers, against the generic
    cache (same numbers, torch attention for every sequence); a small token budget mixes decodes
    with prefill chunks."""
    prompts = _prompts(testing.gen(), 10)
    llm = _llm("cpu", recipe="w4a8kv4", max_num_batched_tokens=16, enable_prefix_caching=False)
    runner = llm.engine.runner
    runner.static_decode = StaticDecode(llm.model, runner.cfg, runner.device, capture=False)
    fast = _generate(llm, prompts)
    _set_caches(llm, QuantizedPagedKVCache, KVSpec(4))  # the same numbers without the kernel layout
    _assert_same_greedy(fast, _generate(llm, prompts))


def test_decode_batches_above_the_graph_cap_run_eagerly(monkeypatch):
    monkeypatch.setattr(model_runner, "MAX_GRAPH_BATCH", 4)
    prompts = _prompts(testing.gen(), 10)
    llm = _llm("cpu", recipe="w4a8kv4")
    runner = llm.engine.runner
    runner.static_decode = StaticDecode(llm.model, runner.cfg, runner.device, capture=False)
    assert runner.static_decode.max_batch == 4
    got = _generate(llm, prompts)  # decode batches of 10: eager (no bucket holds them)
    runner.static_decode = None
    _assert_same_greedy(got, _generate(llm, prompts))


def _set_caches(llm, cls, spec):
    """Every layer on a fresh fp32-model `cls` cache of format `spec`; no static decode."""
    runner = llm.engine.runner
    runner.static_decode = None
    runner.caches = [cls(runner.num_blocks, BS, HKV, D, torch.float32, runner.device, spec)
                     for _ in llm.model.attention_layers()]
    for attn, cache in zip(llm.model.attention_layers(), runner.caches):
        attn.kv_spec, attn.kv_cache = spec, cache


@pytest.mark.skipif(DEV is None, reason="needs Triton (TRITON_INTERPRET=1 on the CPU) or CUDA")
def test_engine_runs_the_triton_kernels(monkeypatch):
    """The engine's calls of the Triton write and decode kernels (layouts, strides, slot dtype):
    their logits against the reference kernels' at one padded decode step (fp32 weights, kv4)."""
    seed, llm = testing.gen().initial_seed(), _llm(DEV, dtype="float32")
    _set_caches(llm, KernelKVCache, KVSpec(4))
    monkeypatch.setattr(paged_attention, "use_triton", lambda *t: False)
    want, _ = _static_vs_eager(llm, testing.gen(seed), DEV, 3, 8)
    monkeypatch.setattr(paged_attention, "use_triton", lambda *t: True)
    got, eager = _static_vs_eager(llm, testing.gen(seed), DEV, 3, 8)
    assert testing.rel_err(got, want) < 1e-2 and testing.rel_err(eager, want) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(), dict(recipe="w4a8kv4")], ids=["bf16", "kv4"])
def test_cuda_graphs_replay_the_padded_decode(kw):
    """Graph replays give the tokens of the same padded forward run eagerly (same kernels, same shapes)."""
    prompts = _prompts(testing.gen(), 11)
    graphs = _llm("cuda", **kw)
    static = graphs.engine.runner.static_decode
    assert static is not None and static.pool is not None
    eager = _llm("cuda", enforce_eager=True, **kw)
    assert eager.engine.runner.static_decode is None
    runner = eager.engine.runner
    runner.static_decode = StaticDecode(eager.model, runner.cfg, runner.device, capture=False)
    assert _tokens(_generate(graphs, prompts, 16)) == _tokens(_generate(eager, prompts, 16))
    assert set(static.graphs) == set(static.buckets)  # all captured at start-up


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graphs_match_the_eager_engine():
    """fp32 activations over the kv4 kernel cache (graphs on): greedy tokens as the eager engine's
    (unpadded, context-sized split). (Against the torch path, whose attention differs by rounding,
    test_engine_runs_the_triton_kernels compares logits.)"""
    prompts = _prompts(testing.gen(), 11)
    kw = dict(recipe="w4a8kv4", dtype="float32")
    graphs, eager = _llm("cuda", **kw), _llm("cuda", enforce_eager=True, **kw)
    out = _generate(graphs, prompts, 16)
    assert graphs.engine.runner.static_decode.graphs
    _assert_same_greedy(out, _generate(eager, prompts, 16))


@pytest.mark.parametrize("lq,lk", [(1, 9), (5, 5), (4, 11)])
def test_causal_attention_aligns_queries_to_the_end_of_the_keys(lq, lk):
    """Query i sits at key position lk - lq + i (a chunk after cached context), GQA 4:2 heads;
    against softmax written out in float64."""
    g = testing.gen()
    q, k, v = (testing.randn((n, h, D), g, torch.float32) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    got = causal_attention(q, k, v, 0.3)
    want = torch.empty(lq, 4, D, dtype=torch.float64)
    for i in range(lq):
        for h in range(4):
            keys, vals = k[: lk - lq + i + 1, h // 2].double(), v[: lk - lq + i + 1, h // 2].double()
            want[i, h] = torch.softmax(0.3 * keys @ q[i, h].double(), 0) @ vals
    assert testing.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
@pytest.mark.parametrize("shape", ["ragged", "runs"])
def test_fresh_attention_matches_float64(device, shape):
    """Fresh prompts (GQA 4:2), each attending causally to itself, against softmax written out in
    float64: ragged ones (the padded SDPA path on the CPU in fp32, varlen flash attention on CUDA in
    bf16), and a run of equal-length prompts then a chunk (SDPA over views of the rows; on CUDA in
    steps enough for the run's shape to become `planned`, cuDNN allowed, while the chunk's is not)."""
    g = testing.gen()
    if shape == "ragged":
        lens = [int(n) for n in torch.randint(1, 70, (5,), generator=g)] + [1, 64]
        assert len(equal_length_runs(lens)) > MAX_VIEW_RUNS
    else:
        lens = [37] * 4 + [20]
        assert len(equal_length_runs(lens)) <= MAX_VIEW_RUNS
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = sum(lens)
    q, k, v = (testing.randn((t, h, D), g, torch.float32) for h in (4, 2, 2))
    want = torch.empty(t, 4, D, dtype=torch.float64)
    start = 0
    for n in lens:
        for i in range(n):
            for h in range(4):
                keys, vals = k[start:start + i + 1, h // 2].double(), v[start:start + i + 1, h // 2].double()
                want[start + i, h] = torch.softmax(0.3 * keys @ q[start + i, h].double(), 0) @ vals
        start += n
    steps = FRESH_SHAPES.recur + 2 if device == "cuda" and shape == "runs" else 1
    for step in range(steps):
        if step == steps - 1 and steps > 1:  # a new chunk length: its run unplanned, the batch's planned
            lens[-1] -= 1  # (a causal prefix: the same reference rows)
            want, q, k, v = (x[:sum(lens)] for x in (want, q, k, v))
        ctx = AttentionContext.cacheless(lens, device)
        plans = [True] if shape == "ragged" or device == "cuda" else [True, False]
        for planned in plans:  # on the CPU, also the unplanned runs' backends
            if not planned:
                ctx.fresh_runs = [run[:3] + (False,) for run in ctx.fresh_runs]
            got = fresh_attention(*(x.to(device, dtype) for x in (q, k, v)), ctx, 0.3).cpu()
            assert testing.rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_shape_history_plans_shapes_that_recur():
    """A shape is planned once it has come in `recur` earlier steps, counted once a step (the context's
    runs are cached); others stay unplanned; past `most` shapes the history starts over."""
    h = ShapeHistory(recur=2, most=3)
    assert [h.planned((16, 1024)) for _ in range(4)] == [False, False, True, True]
    assert h.planned((1, 300)) is False and h.planned((1, 301)) is False
    assert h.planned((1, 302)) is False and h.steps == {(1, 302): 1}  # the fourth shape: started over
    ctx = AttentionContext.cacheless([5, 5, 3], "cpu")
    assert ctx.fresh_runs == [(0, 2, 5, True), (10, 1, 3, True)]  # on the CPU no plan is built: all planned
    assert AttentionContext.cacheless([5, 4, 3], "cpu").fresh_runs is None


def test_row_index_is_a_slice_for_one_run():
    assert row_index([(3, 5), (5, 9)], "cpu") == slice(3, 9)
    assert row_index([(0, 1)], "cpu") == slice(0, 1) and row_index([], "cpu") == slice(0, 0)
    assert torch.equal(row_index([(0, 2), (4, 5), (5, 6)], "cpu"), torch.tensor([0, 1, 4, 5]))


def test_equal_length_runs():
    assert equal_length_runs([4, 4, 4, 2]) == [(0, 3, 4), (12, 1, 2)]
    assert equal_length_runs([3, 5, 5, 3]) == [(0, 1, 3), (3, 2, 5), (13, 1, 3)]
    assert equal_length_runs([7]) == [(0, 1, 7)] and equal_length_runs([]) == []
