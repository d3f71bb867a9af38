"""Shared fixtures: tiny random models of each family (saved as HF directories) and the default model."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # kernels run in Triton's interpreter; set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# model_type -> config overrides; every family the decoder claims to cover, with its distinctive flags
FAMILIES = {
    "llama3": dict(model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "llama2": dict(model_type="llama", rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mistral": dict(model_type="mistral", rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen2": dict(model_type="qwen2", rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "smollm2": dict(model_type="llama", tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="default", rope_theta=1e5)),
}

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer, from its GGUF file; or, where $LOWBIT_TEST_TOKENIZER names a
    folder it was saved to (`scripts/gpu-check`: the GPU machine lacks the 98 MB file), from there."""
    saved = os.environ.get("LOWBIT_TEST_TOKENIZER")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    from lowbit.models.loader import _gguf_tokenizer
    from lowbit.models.default import default_model_path

    return _gguf_tokenizer(default_model_path())


def make_hf_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY)
    cfg.update(FAMILIES[family])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_tokenizer):
    """family -> path of a saved tiny HF model directory (made once per session)."""
    made = {}

    def get(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            make_hf_model(family).save_pretrained(path)
            default_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return get
