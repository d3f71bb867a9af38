"""Triton kernels for Hopper, one module per family, each with a torch reference in `reference.py`.

| module | ops (dispatch: Triton on CUDA tensors, the reference elsewhere) | load-time layout |
| --- | --- | --- |
| `w4a8` | `w4a8_gemm`: int4 (QServe g128 or per channel) x int8 per token | `prepare_w4a8` |
| `w8a8` | `w8a8_gemm`: int8 or fp8 (cuBLAS `_scaled_mm` where faster) | `prepare_w8a8` |
| `w4a16` | `w4a16_gemm`: int4 groups x bf16 (from 128 tokens: `w4a16_dequantize`, then cuBLAS) | `prepare_w4a16` |
| `w4a4` | `w4a4_gemm`: int4 groups x int4 groups + int8 outliers (Atom) | `prepare_w4a4` |
| `actquant` | `rmsnorm_quant`, `silu_mul_quant`, `quant_per_token` -> int8 / fp8 per token; `group_quant` -> W4A4's int4 groups and int8 outliers | - |
| `elementwise` | `rmsnorm` (optionally after the residual add), `rotary` (in place), `silu_mul` for 16-bit activations, rounded as Hugging Face's ops | - |
| `paged_attention` | `kv_cache_write` (with its echo), `paged_decode_attention` over int8 / int4 KV blocks (int4: V packed along the tokens, a transposed kernel) | - |
| `sampling` | `race_sample`: a batch's categorical draws (exponential race, hashed noise) in one pass over the logits | - |
| `kv_gather` | `gather_kv`: several sequences' cached K/V (any layout above) as packed rows of values, for flash attention over a cached context | - |
| `paged_prefill` | `paged_prefill_attention_triton` (CUDA only; reference: `reference.paged_prefill_attention`): new tokens of several sequences over the same blocks, causal (the engine's path in 32 bits) | - |

`common` holds what they share (int4 layout and SWAR widening, split-K, tile order); `testing`
the helpers of their tests and benchmark. Timings: docs/benchmarks.md.
"""
