"""Kernel benchmark: our Triton kernels beside cuBLAS / SDPA peers from the same run, on CUDA.

Linear: one Llama-3 layer's four GEMMs (qkv, o, gate_up, down) at M tokens, summed; decode
attention over a paged cache. GPU time under CUDA graphs (`do_bench_cudagraph`, median) on random
data, with enough weight / cache copies in rotation that L2 (50-60 MB) cannot hold them. Each row
gives the achieved TFLOP/s and GB/s and the share of the roof measured in the same run: the
larger of bytes / copy bandwidth and FLOPs / matmul rate (bf16 for bf16 operands, fp8 for 8-bit
MMAs: int8 and fp8 tensor cores have one rate on Hopper).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from lowbit.bench.env import environment
from lowbit.errors import LowbitError

MODELS = {"llama3-8b": dict(hidden=4096, q=4096, kv=1024, mlp=14336, heads=32, kv_heads=8, head_dim=128),
          "llama3-70b": dict(hidden=8192, q=8192, kv=1024, mlp=28672, heads=64, kv_heads=8, head_dim=128)}
MS = [1, 16, 64, 256, 1024, 4096]
BATCHES, CONTEXTS = [1, 32, 64, 128], [1024, 4096, 16384]
QUICK = dict(models=["llama3-8b"], ms=[1, 16, 64, 4096], batches=[1, 64], contexts=[1024, 4096])
PREFILLS = [(16, 1024), (4, 4096)]  # (prompts, tokens each): one batched prefill step's attention
ROTATE_BYTES = 256 << 20  # weights / caches in rotation per timed call, a few times L2
PAGE = 16


def layer_gemms(cfg: dict) -> list[tuple[str, int, int]]:
    h = cfg["hidden"]
    return [("qkv", cfg["q"] + 2 * cfg["kv"], h), ("o", h, cfg["q"]), ("gate_up", 2 * cfg["mlp"], h),
            ("down", h, cfg["mlp"])]


def bench_ms(fn) -> float:
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def bandwidth(ms: float, nbytes: int, roofs: dict) -> dict:
    """A memory-bound row's figures: microseconds, the bytes it must move per second, and that
    against the copy roof."""
    return dict(us=ms * 1e3, GBps=nbytes / ms / 1e6, roof_pct=100 * nbytes / roofs["copy_GBps"] / 1e6 / ms,
                bytes=nbytes)


# --- roofs --------------------------------------------------------------------------------------

def measure_roofs() -> dict:
    dev = torch.device("cuda")
    src = torch.randn(1 << 28, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    # a copy_ is a memcpy node in a CUDA graph (copy engine); an elementwise kernel reads and
    # writes as fast as an SM kernel can: the roof is the faster of the two
    copy_ms = min(bench_ms(lambda: dst.copy_(src)), bench_ms(lambda: torch.neg(src, out=dst)))
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    bf16_ms = bench_ms(lambda: a @ b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones(n, 1, device=dev)
    fp8_ms = bench_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.bfloat16))
    i8 = torch.randint(-127, 127, (n, n), device=dev, dtype=torch.int8)
    int8_ms = bench_ms(lambda: torch._int_mm(i8, i8.t()))
    flop = 2 * n ** 3
    return dict(copy_GBps=2 * src.numel() * 4 / copy_ms / 1e6, bf16_TFLOPs=flop / bf16_ms / 1e9,
                fp8_TFLOPs=flop / fp8_ms / 1e9, int8_mm_TOPs=flop / int8_ms / 1e9)


# --- linear ---------------------------------------------------------------------------------------

def _gemm_methods(m: int):
    """(name -> (builder(n, k, dev, g) -> run(), MMA precision, weight bits, activation bytes),
    name -> (config -> builder)) for this M; methods that do not apply at this M are left out."""
    from lowbit.kernels import testing
    from lowbit.kernels.w4a4 import prepare_w4a4, w4a4_gemm_triton
    from lowbit.kernels.w4a8 import prepare_w4a8, w4a8_gemm_triton
    from lowbit.kernels.w4a16 import prepare_w4a16, w4a16_gemm_triton
    from lowbit.kernels.w8a8 import FP8_TMA_MIN_M, prepare_w8a8, w8a8_gemm_triton
    from lowbit.quant.formats import pack_int4
    fp8 = torch.float8_e4m3fn

    def acts_i8(k, dev, g):
        return testing.randint(-127, 127, (m, k), g, device=dev), testing.randscale(m, g, device=dev)

    def acts_fp8(k, dev, g):
        return (torch.randn(m, k, device=dev) * 50).to(fp8), testing.randscale(m, g, device=dev)

    def bf16(n, k, dev, g):
        x, w = torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        return lambda: torch.matmul(x, w.t())

    def cublas_fp8(n, k, dev, g):
        (x, xs), w = acts_fp8(k, dev, g), (torch.randn(n, k, device=dev) * 50).to(fp8)
        ws = testing.randscale((1, n), g, device=dev)
        return lambda: torch._scaled_mm(x, w.t(), scale_a=xs[:, None], scale_b=ws, out_dtype=torch.bfloat16)

    def int_mm(n, k, dev, g):
        x, w = acts_i8(k, dev, g)[0], testing.randint(-127, 127, (n, k), g, device=dev)
        return lambda: torch._int_mm(x, w.t())

    def w8a8(dtype, cfg=None):
        def build(n, k, dev, g):
            x, xs = acts_i8(k, dev, g) if dtype == torch.int8 else acts_fp8(k, dev, g)
            wq = testing.randint(-127, 127, (n, k), g, device=dev) if dtype == torch.int8 else \
                (torch.randn(n, k, device=dev) * 50).to(fp8)
            w = prepare_w8a8(wq, testing.randscale(n, g, device=dev))
            return lambda: w8a8_gemm_triton(x, xs, w, cfg)
        return build

    def w4a8(grouped, cfg=None):
        def build(n, k, dev, g):
            x, xs = acts_i8(k, dev, g)
            if grouped:
                q4, s1, s2, z2 = testing.progressive_weight(n, k, g, device=dev)
                w = prepare_w4a8(pack_int4(q4), k, s1, s2, z2)
            else:
                w = prepare_w4a8(pack_int4(testing.randint(-8, 7, (n, k), g, device=dev)), k,
                                 testing.randscale(n, g, device=dev))
            return lambda: w4a8_gemm_triton(x, xs, w, cfg)
        return build

    def w4a16(cfg=None):
        def build(n, k, dev, g):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            codes = testing.randint(-8, 7, (n, k), g, device=dev)
            w = prepare_w4a16(pack_int4(codes), k, testing.randscale((n, k // 128), g, device=dev))
            return lambda: w4a16_gemm_triton(x, w, cfg)
        return build

    def w4a4(cfg=None):
        def build(n, k, dev, g):
            k4, ng = k - 128, math.ceil((k - 128) / 128)
            x4 = pack_int4(testing.randint(-8, 7, (m, k4), g, device=dev))
            xs4 = testing.randscale((m, ng), g, device=dev)
            x8, xs8 = acts_i8(128, dev, g)
            w = prepare_w4a4(pack_int4(testing.randint(-8, 7, (n, k4), g, device=dev)), k4,
                             testing.randscale((n, ng), g, device=dev),
                             testing.randint(-127, 127, (n, 128), g, device=dev), testing.randscale(n, g, device=dev))
            return lambda: w4a4_gemm_triton(x4, xs4, x8, xs8, w, cfg)
        return build

    methods = {
        "bf16 cuBLAS": (bf16, "bf16", 16, 2),
        "fp8 cuBLAS": (cublas_fp8, "fp8", 8, 1),
        "int8 _int_mm": (int_mm if m > 16 else None, "int8", 8, 1),
        "W8A8 int8": (w8a8(torch.int8), "int8", 8, 1),
        "W8A8 fp8": (w8a8(fp8) if m <= 64 or m >= FP8_TMA_MIN_M else None, "fp8", 8, 1),
        "W4A8 g128": (w4a8(True), "int8", 4, 1),
        "W4A8 chan": (w4a8(False), "int8", 4, 1),
        "W4A16 g128": (w4a16() if m <= 256 else None, "bf16", 4, 2),
        "W4A4 Atom": (w4a4(), "int8", 4, 0.5),
    }
    configured = {"W4A8 g128": lambda cfg: w4a8(True, cfg), "W8A8 int8": lambda cfg: w8a8(torch.int8, cfg),
                  "W8A8 fp8": lambda cfg: w8a8(fp8, cfg), "W4A16 g128": w4a16, "W4A4 Atom": w4a4}
    return {k: v for k, v in methods.items() if v[0] is not None}, configured


def _sweeps(m: int) -> dict:
    """Tile configs to time beside the defaults (`--sweep`): name -> (kernel, configs)."""
    from lowbit.kernels.common import TileConfig
    from lowbit.kernels.w4a8 import W4A8Config
    from lowbit.kernels.w8a8 import W8A8Config
    from lowbit.kernels.w8a8_tma import TmaConfig
    bm = max(16, 1 << (m - 1).bit_length())
    w4a16 = [TileConfig(swap=True, block_m=bm, block_n=bn, num_stages=stages, waves=waves)
             for bn, stages, waves in ((128, 2, 2), (128, 3, 2), (64, 4, 2), (64, 2, 4))] if m <= 64 else []
    if m <= 64:
        # scale_acc=False needs the group word in one layout only, so it is the config whose every load
        # the pipeliner copies ahead (`bench sass`); 128-channel tiles and deeper pipelines were slower at
        # every M, before and after the group words were pipelined (2026-12-04, docs/benchmarks.md)
        w4 = [W4A8Config(swap=True, scale_acc=acc, block_m=bm, block_n=64, waves=waves)
              for acc in (True, False) for waves in (2, 4, 8)]
        w4 += [W4A8Config(swap=True, scale_acc=False, block_m=bm, block_n=128, waves=waves) for waves in (2, 4)]
        w4 += [W4A8Config(swap=True, scale_acc=False, block_m=bm, block_n=64, waves=4, num_stages=stages)
               for stages in (3, 6)]
        w4 += [W4A8Config(swap=True, scale_acc=acc, block_m=bm, block_n=64, waves=4, tma=True) for acc in (True, False)]
        if m == 64:
            w4 += [W4A8Config(swap=False, scale_acc=acc, block_m=64, block_n=128) for acc in (True, False)]
        w8 = [W8A8Config(True, bm, 128, waves=waves) for waves in (4, 8)]
    else:
        w4 = [W4A8Config(swap=False, block_m=128, block_n=128, num_warps=8),
              W4A8Config(swap=False, block_m=128, block_n=256, num_warps=8, num_stages=3),
              W4A8Config(swap=True, block_m=128, block_n=128, num_warps=8),
              W4A8Config(swap=True, block_m=128, block_n=256, num_warps=8, num_stages=3),
              W4A8Config(widen=True)]
        w8 = [W8A8Config(False, 128, 128, num_warps=8), W8A8Config(False, 256, 128, num_warps=8, num_stages=3),
              W8A8Config(False, 64, 128, num_warps=4, num_stages=4), W8A8Config(False, 128, 256, num_warps=8, num_stages=3)]
        w8 += [TmaConfig(), TmaConfig(warp_specialize=True), TmaConfig(block_m=64, num_warps=4, num_stages=4),
               TmaConfig(block_n=256, persistent=True), TmaConfig(block_n=256, persistent=True, warp_specialize=True),
               TmaConfig(persistent=True, num_stages=4), TmaConfig(block_m=256, persistent=True),
               TmaConfig(block_m=64, num_warps=4, num_stages=4, persistent=True)]
    # W4A4 at small M: the weight tile as the MMAs' A operand (swap) or not (`bench sass --kernel w4a4-m1`:
    # 213 against 250 instructions a group step), wider tiles, more splits
    w4a4 = [TileConfig(swap=swap, block_m=16, block_n=bn, waves=waves, num_stages=3)
            for swap in (True, False) for bn in (64, 128) for waves in (2, 4)] if m <= 16 else []
    return {"W4A8 g128": w4, "W8A8 int8": w8, "W8A8 fp8": w8 if m > 64 else [], "W4A16 g128": w4a16,
            "W4A4 Atom": w4a4}


def _label(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(cfg).items())


def _short(label: str) -> str:
    """A W4A8 config label without the fields at W4A8Config's defaults."""
    from lowbit.kernels.w4a8 import W4A8Config
    base = W4A8Config()
    pairs = [kv.split("=") for kv in label.split()]
    return " ".join(f"{k}={v}" for k, v in pairs if str(getattr(base, k, None)) != v) or "W4A8Config()"


def bench_layer(model: str, m: int, roofs: dict, sweep: bool) -> list[dict]:
    cfg = MODELS[model]
    dev = torch.device("cuda")
    from lowbit.kernels import testing
    g = testing.gen(0, "cuda")
    gemms = layer_gemms(cfg)
    flop = sum(2 * m * n * k for _, n, k in gemms)
    methods, configured = _gemm_methods(m)
    runs = [(name, build, prec, wbits, abytes, None) for name, (build, prec, wbits, abytes) in methods.items()]
    if sweep:
        for name, cfgs in _sweeps(m).items():
            if not cfgs or name not in methods:  # a kernel that does not apply at this M
                continue
            _, prec, wbits, abytes = methods[name]
            runs += [(f"{name} [{_label(c)}]", configured[name](c), prec, wbits, abytes, c) for c in cfgs]
    rows = []
    for name, build, prec, wbits, abytes, cand in runs:
        nbytes = sum(n * k * wbits / 8 + m * k * abytes + m * n * 2 for _, n, k in gemms)
        weight_bytes = sum(n * k * wbits / 8 for _, n, k in gemms)
        copies = max(1, math.ceil(ROTATE_BYTES / weight_bytes))
        try:
            fns = [build(n, k, dev, g) for _ in range(copies) for _, n, k in gemms]
            ms = bench_ms(lambda: [f() for f in fns]) / copies
        except Exception as e:  # a peer that this torch build or shape does not support
            rows.append(dict(model=model, m=m, method=name, error=f"{type(e).__name__}: {e}"[:200]))
            continue
        finally:
            fns = None
            torch.cuda.empty_cache()
        peak = roofs["bf16_TFLOPs"] if prec == "bf16" else roofs["fp8_TFLOPs"]
        roof_ms = max(nbytes / roofs["copy_GBps"] / 1e6, flop / peak / 1e9)
        rows.append(dict(model=model, m=m, method=name, us=ms * 1e3, TFLOPs=flop / ms / 1e9,
                         GBps=nbytes / ms / 1e6, roof_pct=100 * roof_ms / ms, bytes=nbytes,
                         config=None if cand is None else vars(cand)))
    return rows


# --- attention ------------------------------------------------------------------------------------

def random_paged_cache(model: str, seqs: int, tokens: int, bits: int):
    """`model`'s heads, a random `bits`-bit paged cache of `tokens` positions for each of `seqs`
    sequences, and int32 block tables over its pages in random order -> (hq, hkv, d, [k, v, k_sz, v_sz], tables)."""
    from lowbit.kernels import testing
    m = MODELS[model]
    blocks = seqs * tokens // PAGE
    cache = testing.random_kv_cache(blocks, PAGE, m["kv_heads"], m["head_dim"], bits, testing.gen(0, "cuda"), "cuda")
    tables = torch.randperm(blocks, device="cuda").to(torch.int32).view(seqs, tokens // PAGE)
    return m["heads"], m["kv_heads"], m["head_dim"], cache, tables


def paged_decode_case(model: str, batch: int, ctx: int, bits: int, cfg=None):
    """A run() of our decode attention over a random `bits`-bit paged cache, pages in random order."""
    from lowbit.kernels.paged_attention import paged_decode_attention_triton
    hq, hkv, d, cache, tables = random_paged_cache(model, batch, ctx, bits)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    return lambda: paged_decode_attention_triton(q, *cache, tables, lens, scale=d ** -0.5, max_seq_len=ctx,
                                                 config=cfg)


def sdpa_case(model: str, batch: int, ctx: int):
    """A run() of torch SDPA in bf16 for one decode token per sequence (GQA: the group as queries)."""
    m = MODELS[model]
    hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    dev = torch.device("cuda")
    q = torch.randn(batch, hkv, hq // hkv, d, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)


def bench_attention(model: str, batch: int, ctx: int, roofs: dict, sweep: bool) -> list[dict]:
    from lowbit.kernels.paged_attention import DecodeConfig
    m = MODELS[model]
    hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    rows = []
    per_token = {"KV8 paged": 2 * hkv * (d + 4), "KV4 paged": 2 * hkv * (d // 2 + 4), "SDPA bf16": 2 * hkv * d * 2,
                 "bf16 paged": 2 * hkv * d * 2}
    # bf16 paged: our kernel over a 16-bit cache, the decode path of the bf16 and fp8 recipes
    builders = {"bf16 paged": lambda: paged_decode_case(model, batch, ctx, 16),
                "KV8 paged": lambda: paged_decode_case(model, batch, ctx, 8),
                "KV4 paged": lambda: paged_decode_case(model, batch, ctx, 4),
                "SDPA bf16": lambda: sdpa_case(model, batch, ctx)}
    if sweep:
        # the defaults differ per width (default_decode_config); DecodeConfig(): 4 warps, 128-token steps, no cap
        # (2026-12-04 on the H200: 64-token steps, 8 warps, 2 stages and 16 waves of four-warp programs
        # were slower everywhere for KV8; docs/benchmarks.md)
        configs = {8: (DecodeConfig(), DecodeConfig(waves=8), DecodeConfig(num_stages=4), DecodeConfig(maxnreg=128),
                       DecodeConfig(maxnreg=128, waves=8),
                       # one or two warps a program: row reductions within a warp, no barrier across warps
                       DecodeConfig(block_n=32, num_warps=1, waves=16),
                       DecodeConfig(block_n=32, num_warps=1, maxnreg=168, waves=16),
                       DecodeConfig(block_n=64, num_warps=2, waves=8)),
                   # KV4's transposed kernel (`bench sass`, docs/benchmarks.md: 64-token steps 8.5 bytes per warp
                   # instruction at one warp, 167 registers, 5.6 at two; 32-token steps 6.3; 128-token steps 9.2 at
                   # one warp (255 registers, spills), 7.6 at two)
                   4: (DecodeConfig(), DecodeConfig(block_n=64, num_warps=1, waves=8),
                       DecodeConfig(block_n=64, num_warps=1, waves=32), DecodeConfig(block_n=64, num_warps=1, num_stages=4),
                       DecodeConfig(block_n=64, num_warps=1, num_stages=2), DecodeConfig(block_n=32, num_warps=1, waves=16),
                       DecodeConfig(block_n=128, num_warps=1, waves=16), DecodeConfig(block_n=128, num_warps=2, waves=8),
                       DecodeConfig(block_n=64, num_warps=2, waves=8))}
        for bits, cfgs in configs.items():
            for cfg in cfgs:
                builders[f"KV{bits} paged [{_label(cfg)}]"] = \
                    lambda bits=bits, cfg=cfg: paged_decode_case(model, batch, ctx, bits, cfg)
    for name, build in builders.items():
        nbytes = batch * ctx * per_token[name.split(" [")[0]] + 2 * batch * hq * d * 2
        copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
        try:
            fns = [build() for _ in range(copies)]
            ms = bench_ms(lambda: [f() for f in fns]) / copies
        finally:
            fns = None
            torch.cuda.empty_cache()
        rows.append(dict(model=model, batch=batch, ctx=ctx, method=name, **bandwidth(ms, nbytes, roofs)))
    return rows


def paged_prefill_case(model: str, seqs: int, q_len: int, bits: int, cfg=None):
    """A run() of our prefill attention: `seqs` fresh prompts of `q_len` tokens over a random paged cache."""
    from lowbit.kernels.paged_prefill import paged_prefill_attention_triton
    hq, hkv, d, cache, tables = random_paged_cache(model, seqs, q_len, bits)
    dev = torch.device("cuda")
    lens = torch.full((seqs,), q_len, dtype=torch.int32, device=dev)
    cu = torch.arange(0, (seqs + 1) * q_len, q_len, dtype=torch.int32, device=dev)
    listed = torch.arange(seqs, dtype=torch.int32, device=dev)
    q = torch.randn(seqs * q_len, hq, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return lambda: paged_prefill_attention_triton(q, *cache, tables, lens, cu, listed, q_len, d ** -0.5, out,
                                                  config=cfg)


def gathered_prefill_case(model: str, seqs: int, q_len: int, bits: int):
    """A run() of the engine's path for chunks over a cached context (`attention.chunk_attention`), here
    over prompts whose every position is cached: each sequence's K/V gathered from a random `bits`-bit
    paged cache into packed bf16 rows (`kernels/kv_gather.py`), then one varlen flash-attention call."""
    from lowbit.kernels.kv_gather import gather_kv
    from lowbit.layers.attention import _VARLEN, varlen_attn
    hq, hkv, d, cache, tables = random_paged_cache(model, seqs, q_len, bits)
    dev = torch.device("cuda")
    cu = torch.arange(0, (seqs + 1) * q_len, q_len, dtype=torch.int32, device=dev)
    listed = torch.arange(seqs, dtype=torch.int32, device=dev)
    q = torch.randn(seqs * q_len, hq, d, device=dev, dtype=torch.bfloat16)
    if _VARLEN is None:
        raise RuntimeError("this torch has no varlen flash attention")

    def run():
        k, v = gather_kv(*cache, tables, listed, cu, q_len, seqs * q_len, d, torch.bfloat16)
        return varlen_attn(q, k, v, cu, cu, q_len, q_len, scale=d ** -0.5, **_VARLEN)
    return run


def sdpa_prefill_case(model: str, seqs: int, q_len: int):
    """A run() of torch SDPA in bf16, causal, over contiguous K/V (its flash / cuDNN kernels; GQA native)."""
    m = MODELS[model]
    hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    dev = torch.device("cuda")
    q = torch.randn(seqs, hq, q_len, d, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(seqs, hkv, q_len, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5,
                                                                    enable_gqa=True)


def _packed_qkv(model: str, tokens: int):
    """`model`'s heads and random bf16 q `[tokens, heads, head_dim]`, k, v `[tokens, kv_heads, head_dim]`
    on CUDA: the engine's flat rows."""
    m = MODELS[model]
    hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    q = torch.randn(tokens, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return hq, hkv, d, q, k, v


def sdpa_packed_prefill_case(model: str, seqs: int, q_len: int):
    """A run() of torch SDPA over the engine's packed `[T, heads, head_dim]` rows of prompts of one
    length, viewed as `[B, heads, L, head_dim]` (no copy in, one out): the candidate for fresh
    prompts of equal length."""
    hq, hkv, d, q, k, v = _packed_qkv(model, seqs * q_len)

    def run():
        qv, kv, vv = (x.view(seqs, q_len, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qv, kv, vv, is_causal=True, scale=d ** -0.5,
                                                               enable_gqa=True)
        return out.transpose(1, 2).reshape(seqs * q_len, hq, d)
    return run


def engine_prefill_case(model: str, seqs: int, q_len: int, bits: int):
    """A run() of the engine's prefill attention (`layers/attention.py`'s fresh-prompt path): the
    prompts' K/V written into the paged cache with the write's echo (what the cache now holds, no
    read-back), then `fresh_attention` over the echo (prompts of one length: SDPA over views of the
    rows; ragged ones: varlen flash attention on CUDA). The write is
    in the time: every path pays it, the paged kernel's rows leave it out."""
    from lowbit.engine.kv_cache import make_kv_cache
    from lowbit.layers.attention import fresh_attention
    from lowbit.layers.context import FRESH_SHAPES, AttentionContext
    from lowbit.quant.recipes import KVSpec
    hq, hkv, d, q, k, v = _packed_qkv(model, seqs * q_len)
    dev = q.device
    blocks = seqs * q_len // PAGE
    cache = make_kv_cache(blocks, PAGE, hkv, d, torch.bfloat16, dev, None if bits == 16 else KVSpec(bits))
    slots = (torch.randperm(blocks, device=dev)[:, None] * PAGE + torch.arange(PAGE, device=dev)).reshape(-1)
    for _ in range(FRESH_SHAPES.recur):  # the steady state of prompts of one length: their shape has recurred
        AttentionContext.cacheless([q_len] * seqs, dev).fresh_runs
    ctx = AttentionContext.cacheless([q_len] * seqs, dev)

    def run():
        held = cache.store(k, v, slots, echo=True)
        return fresh_attention(q, *held, ctx, d ** -0.5)
    return run


def bench_prefill(model: str, seqs: int, q_len: int, roofs: dict, sweep: bool = False) -> list[dict]:
    """Causal attention of a prefill step: TFLOP/s of the causal half, over the bf16 MMA peak."""
    from lowbit.kernels.paged_prefill import PrefillConfig
    m = MODELS[model]
    flop = 4 * seqs * m["heads"] * m["head_dim"] * q_len * (q_len + 1) / 2
    builders = {"SDPA bf16": lambda: sdpa_prefill_case(model, seqs, q_len),
                "SDPA packed": lambda: sdpa_packed_prefill_case(model, seqs, q_len),
                **{f"{'bf16' if b == 16 else f'KV{b}'} paged": lambda b=b: paged_prefill_case(model, seqs, q_len, b)
                   for b in (16, 8, 4)},
                **{f"{'bf16' if b == 16 else f'KV{b}'} engine": lambda b=b: engine_prefill_case(model, seqs, q_len, b)
                   for b in (16, 4)},
                **{f"{'bf16' if b == 16 else f'KV{b}'} gathered": lambda b=b: gathered_prefill_case(model, seqs, q_len, b)
                   for b in (16, 4)}}
    if sweep:  # fewer rows per program spill less over codes (lowbit bench sass); more warps, stages
        for cfg in (PrefillConfig(block_m=64), PrefillConfig(block_m=64, num_warps=4), PrefillConfig(block_n=32),
                    PrefillConfig(num_stages=3), PrefillConfig(block_m=64, block_n=128, num_warps=4)):
            for bits in (16, 4):
                builders[f"{'bf16' if bits == 16 else f'KV{bits}'} paged [{_label(cfg)}]"] = \
                    lambda bits=bits, cfg=cfg: paged_prefill_case(model, seqs, q_len, bits, cfg)
    rows = []
    for name, build in builders.items():
        try:
            fn = build()
            ms = bench_ms(fn)
        except Exception as e:  # a peer this torch build does not run
            rows.append(dict(model=model, seqs=seqs, q_len=q_len, method=name, error=f"{type(e).__name__}: {e}"[:200]))
            continue
        finally:
            fn = None
            torch.cuda.empty_cache()
        rows.append(dict(model=model, seqs=seqs, q_len=q_len, method=name, us=ms * 1e3, TFLOPs=flop / ms / 1e9,
                         roof_pct=100 * flop / ms / 1e9 / roofs["bf16_TFLOPs"]))
    return rows


# --- instructions ----------------------------------------------------------------------------------

def mma_instructions() -> list[dict]:
    """The MMA instructions of every compiled variant of our GEMM kernels: wgmma (sm_90a) or not."""
    import re

    from lowbit.kernels import w4a4, w4a8, w4a16, w8a8, w8a8_tma
    found = []
    for kernel in (w4a8._w4a8_kernel, w8a8._w8a8_kernel, w8a8_tma._w8a8_tma_kernel, w4a16._w4a16_kernel,
                   w4a4._w4a4_kernel):
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                names = compiled.src.fn.arg_names
                consts = {names[k[0]]: str(v) for k, v in compiled.src.constants.items() if len(k) == 1}
                try:
                    sass = compiled.asm["sass"]
                except Exception as e:  # no cuobjdump
                    sass = f"unavailable: {e}"
                found.append(dict(
                    kernel=kernel.__name__, constants=consts,
                    ptx=sorted(set(re.findall(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", compiled.asm["ptx"]))),
                    sass=sorted(set(re.findall(r"\b([IHQ]GMMA\.[\w.]+|[IH]MMA\.[\w.]+)", sass))) or sass[:80]))
    return found


# --- report ----------------------------------------------------------------------------------------

def _ratio(rows, key, num, den):
    a = next((r for r in rows if r.get("method") == num and all(r.get(k) == v for k, v in key.items()) and "us" in r), None)
    b = next((r for r in rows if r.get("method") == den and all(r.get(k) == v for k, v in key.items()) and "us" in r), None)
    return None if a is None or b is None else b["us"] / a["us"]


def _best(rows, base: str, **key):
    """The fastest row of `base` or its swept configs (`base [config]`) matching key."""
    rows = [r for r in rows if "us" in r and r["method"].split(" [")[0] == base
            and all(r.get(k) == v for k, v in key.items())]
    return min(rows, key=lambda r: r["us"], default=None)


def targets(result: dict) -> list[dict]:
    """The issue's targets from this run's rows (speedup = peer time / our time), for our default
    config and, where configs were swept, for the fastest one."""
    lin, att = result["linear"], result["attention"]
    out = []

    def add(target, want, got, ok, row):
        cfg = row["method"].split(" [")[1].rstrip("]") if row is not None and " [" in row["method"] else "default"
        if row is not None and row["method"].startswith("W4A8 g128 ["):
            cfg = _short(cfg)
        out.append(dict(target=target, config=cfg, want=want, got=None if got is None else round(got, 2),
                        met=got is not None and ok(got)))

    for m in [mm for mm in result["ms"] if mm == 4096 or mm <= 64]:
        key = dict(model="llama3-8b", m=m)
        ours = {"default": next((r for r in lin if r["method"] == "W4A8 g128" and r["m"] == m
                                 and r["model"] == "llama3-8b" and "us" in r), None),
                "swept": _best(lin, "W4A8 g128", **key)}
        need = (0.9, 1.6) if m == 4096 else (1.3, 2.5)
        for kind, row in ours.items():
            if row is None or (kind == "swept" and " [" not in row["method"]):
                continue
            for peer, want in zip(("fp8 cuBLAS", "bf16 cuBLAS"), need):
                p = _best(lin, peer, **key)
                got = None if p is None else p["us"] / row["us"]
                add(f"W4A8 g128 vs {peer}, 8B layer, M={m}", f">= {want}x", got, lambda g, w=want: g >= w, row)
    sdpa = _best(att, "SDPA bf16", batch=64, ctx=4096)
    for kind in ("default", "swept"):
        kv4 = (next((r for r in att if r["method"] == "KV4 paged" and r["batch"] == 64 and r["ctx"] == 4096), None)
               if kind == "default" else _best(att, "KV4 paged", batch=64, ctx=4096))
        if kv4 is None or (kind == "swept" and " [" not in kv4["method"]):
            continue
        add("KV4 decode vs SDPA bf16, batch 64, ctx 4k", ">= 3x", None if sdpa is None else sdpa["us"] / kv4["us"],
            lambda g: g >= 3, kv4)
        add("KV4 decode share of copy bandwidth, batch 64, ctx 4k", ">= 60%", kv4["roof_pct"], lambda g: g >= 60, kv4)
    return out


def _fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def tables(result: dict, markdown: bool) -> str:
    """The short summary tables (and, for markdown, every row)."""
    def table(head, body):
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in body]
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *body)]
            lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [head] + body]
        return "\n".join(lines)

    lin = result["linear"]
    names = ["bf16 cuBLAS", "fp8 cuBLAS", "int8 _int_mm", "W8A8 int8", "W8A8 fp8", "W4A8 g128", "W4A8 chan",
             "W4A16 g128", "W4A4 Atom"]
    body = []
    for model in result["models"]:
        for m in result["ms"]:
            rs = {r["method"]: r for r in lin if r["model"] == model and r["m"] == m and "us" in r}
            w4 = rs.get("W4A8 g128")
            body.append([model, str(m)] + [_fmt(rs[n]["us"]) if n in rs else "-" for n in names] +
                        [_fmt(_ratio(lin, dict(model=model, m=m), "W4A8 g128", "fp8 cuBLAS"), 2),
                         _fmt(_ratio(lin, dict(model=model, m=m), "W4A8 g128", "bf16 cuBLAS"), 2),
                         _fmt(w4 and w4["roof_pct"], 0)])
    out = []
    if lin:
        out += ["Linear: one layer's 4 GEMMs, us (GPU time under CUDA graphs, median)",
                table(["model", "M"] + names + ["W4A8/fp8", "W4A8/bf16", "W4A8 %roof"], body)]
    att = result["attention"]
    body = []
    for r in att:
        if r["method"] != "SDPA bf16":
            continue
        rs = {x["method"]: x for x in att if x["batch"] == r["batch"] and x["ctx"] == r["ctx"]}
        body.append([str(r["batch"]), str(r["ctx"])] +
                    [f"{_fmt(rs[n]['us'])} ({_fmt(rs[n]['GBps'] / 1e3, 2)} TB/s)" if n in rs else "-"
                     for n in ("SDPA bf16", "bf16 paged", "KV8 paged", "KV4 paged")] +
                    [_fmt(r["us"] / rs["KV8 paged"]["us"], 2), _fmt(r["us"] / rs["KV4 paged"]["us"], 2),
                     _fmt(rs["KV4 paged"]["roof_pct"], 0)])
    if body:
        out += ["", "Decode attention, Llama-3-8B heads (32 q / 8 kv x 128), us (achieved bandwidth)",
                table(["batch", "ctx", "SDPA bf16", "bf16 paged", "KV8 paged", "KV4 paged", "KV8/SDPA", "KV4/SDPA",
                       "KV4 %copy BW"], body)]
    pre = result.get("prefill", [])
    body = []
    names = ("SDPA bf16", "SDPA packed", "bf16 paged", "KV8 paged", "KV4 paged", "bf16 engine", "KV4 engine",
             "bf16 gathered", "KV4 gathered")
    for seqs, q_len in sorted({(r["seqs"], r["q_len"]) for r in pre}):
        rs = {r["method"]: r for r in pre if (r["seqs"], r["q_len"]) == (seqs, q_len) and "us" in r}
        body.append([str(seqs), str(q_len)] +
                    [f"{_fmt(rs[n]['us'])} ({_fmt(rs[n]['roof_pct'], 0)}%)" if n in rs else "-" for n in names] +
                    [_fmt(_ratio(pre, dict(seqs=seqs, q_len=q_len), f"{w} paged", f"{w} {o}"), 2)
                     for o in ("engine", "gathered") for w in ("bf16", "KV4")])
    if body:
        out += ["", "Prefill attention (causal, fresh prompts), Llama-3-8B heads, us (% of the bf16 MMA peak); "
                "SDPA packed: over the engine's [T, H, D] rows viewed per prompt; "
                "engine: the layer's path for fresh prompts (cache write with its echo, then `fresh_attention` over "
                "the echo); gathered: its path for chunks over a cached context (the cache gathered into bf16 rows, "
                "then varlen flash attention), here over wholly cached prompts",
                table(["prompts", "tokens", *names, "bf16 paged/engine", "KV4 paged/engine", "bf16 paged/gathered",
                       "KV4 paged/gathered"], body)]
    def shape(r):
        return r["m"] if "m" in r else (r["batch"], r["ctx"]) if "batch" in r else (r["seqs"], r["q_len"])

    timed = [r for r in lin + att + pre if "us" in r]
    swept = [r for r in timed if " [" in r["method"]]
    if swept:
        best = {}
        for r in swept:
            key = (r["method"].split(" [")[0], shape(r))
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        defaults = {(r["method"], shape(r)): r["us"] for r in timed if " [" not in r["method"]}
        out += ["", "Sweep: fastest config per method and M (or batch, ctx; or prompts, tokens), beside the default's time",
                table(["method", "M / (batch, ctx) / (prompts, tokens)", "default us", "us", "config"],
                      [[k[0], str(k[1]), _fmt(defaults.get(k)), _fmt(r["us"]),
                        (_short if k[0] == "W4A8 g128" else str)(r["method"].split(" [")[1].rstrip("]"))]
                       for k, r in sorted(best.items(), key=str)])]
    mma = sorted({(k["kernel"], ", ".join(f"{n}={k['constants'][n]}" for n in ("SWAP", "SCALE_ACC", "BM", "BN", "FP8")
                                           if n in k["constants"]), " ".join(k["sass"]) if isinstance(k["sass"], list) else k["sass"])
                  for k in result.get("mma_instructions", [])})
    if mma:
        out += ["", "MMA instructions in the SASS of each compiled GEMM variant",
                table(["kernel", "constexprs", "SASS MMA"], [list(r) for r in mma])]
    out += ["", "Targets", table(["target", "config", "want", "got", "met"],
                                 [[t["target"], t["config"], t["want"], _fmt(t["got"], 2), "yes" if t["met"] else "no"]
                                  for t in result["targets"]])]
    if markdown and lin:
        rows = [[r["model"], str(r["m"]), r["method"], _fmt(r.get("us")), _fmt(r.get("TFLOPs")),
                 _fmt(r.get("GBps")), _fmt(r.get("roof_pct"), 0), r.get("error", "")] for r in lin]
        out += ["", "All linear rows", table(["model", "M", "method", "us", "TFLOP/s", "GB/s", "% roof", "error"], rows)]
    if markdown and any(" [" in r["method"] for r in att):
        rows = [[str(r["batch"]), str(r["ctx"]), r["method"], _fmt(r.get("us")), _fmt(r.get("GBps") and r["GBps"] / 1e3, 2),
                 _fmt(r.get("roof_pct"), 0)] for r in att]
        out += ["", "All decode attention rows", table(["batch", "ctx", "method", "us", "TB/s", "% copy BW"], rows)]
    return "\n".join(out)


def read_result(path: str) -> dict:
    """An earlier run's kernels.json, or the JSON lines it printed (the log of a run stopped by a time
    limit before it wrote kernels.json: the environment, the roofs, then one line per row)."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    env = next((d for d in lines if "device" in d), None)
    roofs = next((d for d in lines if "copy_GBps" in d), None)
    if env is None or roofs is None:
        raise LowbitError(f"{path}: neither kernels.json nor the log of a kernels run")
    rows = [d for d in lines if "method" in d]
    part = {"linear": [r for r in rows if "m" in r], "attention": [r for r in rows if "ctx" in r],
            "prefill": [r for r in rows if "q_len" in r]}
    unique = lambda rs, key: list(dict.fromkeys(r[key] for r in rs))  # noqa: E731
    return dict(env=env, roofs=roofs, quick=None, models=unique(rows, "model"), ms=unique(part["linear"], "m"),
                batches=unique(part["attention"], "batch"), contexts=unique(part["attention"], "ctx"),
                prefills=list(dict.fromkeys((r["seqs"], r["q_len"]) for r in part["prefill"])), **part)


def _save(result: dict, out: str) -> None:
    """kernels.json as it stands (after each part: a run stopped by a time limit keeps what it measured)."""
    result["targets"] = targets(result)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.bench kernels")
    p.add_argument("--quick", action="store_true", help="the 8B model, fewer M, batches and contexts")
    p.add_argument("--out", default="out/bench", help="directory for kernels.json")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--sweep", action="store_true",
                   help="also time other tile configs (8B model; attention: at 64 x 4k and 1 x 4k, or every --batches shape; "
                        "prefill: every shape)")
    p.add_argument("--only", choices=["linear", "attention", "prefill"], help="time one of the parts")
    p.add_argument("--ms", type=int, nargs="+", metavar="M", help="the linear part's token counts (default: by --quick)")
    p.add_argument("--batches", type=int, nargs="+", metavar="B",
                   help="the decode attention part's batch sizes (default: by --quick)")
    p.add_argument("--contexts", type=int, nargs="+", metavar="T",
                   help="the decode attention part's context lengths (default: by --quick)")
    p.add_argument("--from-json", metavar="PATH",
                   help="print the tables of an earlier run's kernels.json (or of the JSON lines it printed)")
    args = p.parse_args(argv)
    if args.from_json:
        result = read_result(args.from_json)
        result["targets"] = targets(result)
        print(f"{result['env']['device']}, {result['env']['date']}, commit {result['env']['commit']}, "
              f"torch {result['env']['torch']}, triton {result['env']['triton']}; roofs: "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["roofs"].items()))
        print(tables(result, args.markdown))
        return 0
    if not torch.cuda.is_available():
        print("lowbit.bench kernels needs a CUDA GPU")
        return 2
    sel = dict(QUICK if args.quick else dict(models=list(MODELS), ms=MS, batches=BATCHES, contexts=CONTEXTS))
    sel["ms"] = [] if args.only == "attention" else args.ms or sel["ms"]
    sel["batches"] = [] if args.only == "linear" else args.batches or sel["batches"]
    sel["contexts"] = args.contexts or sel["contexts"]
    sel["prefills"] = PREFILLS if args.only in (None, "prefill") else []
    if args.only == "prefill":
        sel["ms"] = sel["batches"] = []
    result = dict(env=environment(), quick=args.quick, **sel)
    print(json.dumps(result["env"]), flush=True)
    result["roofs"] = measure_roofs()
    print(json.dumps(result["roofs"]), flush=True)
    result.update(linear=[], attention=[], prefill=[])
    for model in sel["models"]:
        for m in sel["ms"]:
            rows = bench_layer(model, m, result["roofs"], sweep=args.sweep and model == "llama3-8b")
            for r in rows:
                print(json.dumps(r), flush=True)
            result["linear"] += rows
            _save(result, args.out)
    for batch in sel["batches"]:
        for ctx in sel["contexts"]:
            rows = bench_attention("llama3-8b", batch, ctx, result["roofs"],
                                   sweep=args.sweep and (args.batches is not None or (batch, ctx) in ((64, 4096), (1, 4096))))
            for r in rows:
                print(json.dumps(r), flush=True)
            result["attention"] += rows
            _save(result, args.out)
    for seqs, q_len in sel["prefills"]:
        rows = bench_prefill("llama3-8b", seqs, q_len, result["roofs"], sweep=args.sweep)
        for r in rows:
            print(json.dumps(r), flush=True)
        result["prefill"] += rows
        _save(result, args.out)
    result["mma_instructions"] = mma_instructions()
    _save(result, args.out)
    print()
    print(tables(result, args.markdown))
    return 0
