"""Load a model: Hugging Face directory, GGUF file or the built-in default -> config, weights, tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.config import SUPPORTED_ARCHS, ModelConfig
from lowbit.errors import LowbitError
from lowbit.layers.rotary import rope_inv_freq
from lowbit.models.default import DEFAULT_MODEL, default_model_path

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class ModelFiles:
    """What a model source provides, before the module is built."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    source: Path
    quant_config: dict | None = None  # set for a lowbit quantized checkpoint


def resolve_source(model: str | os.PathLike | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise LowbitError(f"{path}: no such file or directory (give a Hugging Face model directory, a .gguf file or {DEFAULT_MODEL})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise LowbitError(f"{path}: directory has no config.json (not a Hugging Face model directory)")
    if path.is_file() and path.suffix != ".gguf":
        raise LowbitError(f"{path}: not a .gguf file; give a model directory or a GGUF file")
    return path


def load_model_files(model: str | os.PathLike | None) -> ModelFiles:
    path = resolve_source(model)
    if path.is_dir():
        return _load_hf_dir(path)
    return _load_gguf(path)


def _load_hf_dir(path: Path) -> ModelFiles:
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{cfg_path}: cannot read: {e}") from None
    from lowbit.quant.checkpoint import is_quantized_checkpoint, load_quant_config

    config = ModelConfig.from_hf_dict(raw)
    qcfg = load_quant_config(path) if is_quantized_checkpoint(path) else None
    state = read_safetensors_dir(path)
    return ModelFiles(config, state, load_hf_tokenizer(path), path, qcfg)


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise LowbitError(f"{index}: invalid index: {e}") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise LowbitError(f"{f}: listed in the index but missing")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise LowbitError(f"{f}: corrupt or truncated safetensors file ({_one_line(e)})") from None
    return state


def load_hf_tokenizer(path: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise LowbitError(f"{path}: cannot load the tokenizer ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


# --- GGUF -----------------------------------------------------------------------------------------

def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LowbitError(f"unsupported architecture {arch!r} in GGUF (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LowbitError("GGUF files with a rope_freqs tensor (llama3 rope scaling) are not supported; use the HF directory")
    g = lambda k, d=None: _gguf_value(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig.from_hf_dict(
        {
            "model_type": arch,
            "vocab_size": int(g("vocab_size", vocab)),
            "hidden_size": hidden,
            "intermediate_size": int(g("feed_forward_length")),
            "num_hidden_layers": int(g("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(g("attention.head_count_kv", heads)),
            "head_dim": int(g("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(g("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(g("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
        }
    )


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k weights (pairs interleaved -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensor_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], parts[3]
        if base not in GGUF_NAMES:
            raise LowbitError(f"unknown GGUF tensor {name}")
        return f"model.layers.{layer}.{GGUF_NAMES[base]}.{suffix}"
    if parts[0] not in GGUF_NAMES:
        raise LowbitError(f"unknown GGUF tensor {name}")
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


def _load_gguf(path: Path) -> ModelFiles:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError... on a damaged file
        raise LowbitError(f"{path}: corrupt or truncated GGUF file ({_one_line(e)})") from None
    config = gguf_config(reader)
    state = {}
    for t in reader.tensors:
        name = _gguf_tensor_name(t.name)
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LowbitError(f"{path}: cannot read tensor {t.name} ({_one_line(e)})") from None
        w = torch.from_numpy(np.array(data, dtype=np.float32))
        if config.model_type in ("llama", "mistral"):
            if name.endswith("q_proj.weight"):
                w = _unpermute_rope(w, config.num_heads)
            elif name.endswith("k_proj.weight"):
                w = _unpermute_rope(w, config.num_kv_heads)
        state[name] = w
    return ModelFiles(config, state, _gguf_tokenizer(path), path)


def _gguf_tokenizer(path: Path):
    """Build the tokenizer from GGUF metadata once (seconds), then reuse a saved copy."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "tokenizers" / key
    if (cache / "tokenizer_config.json").is_file():
        return load_hf_tokenizer(cache)
    tok = load_hf_tokenizer(path.parent, gguf_file=path.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(str(tmp))
        tmp.rename(cache)
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return tok


# --- module ---------------------------------------------------------------------------------------

def build_model(files: ModelFiles, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Instantiate the decoder and fill it from the state dict, checking every name and shape."""
    from lowbit.models.llama import LlamaForCausalLM

    cfg = files.config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {k: v for k, v in files.state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    quantized = {}
    if files.quant_config is not None:
        from lowbit.quant.checkpoint import split_quantized_state

        quantized = split_quantized_state(files.quant_config, state)
        for name in files.quant_config["layers"]:
            expected.pop(f"{name}.weight", None)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise LowbitError(f"{files.source}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise LowbitError(f"{files.source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LowbitError(
                f"{files.source}: tensor {name} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}"
            )
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=False)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    for layer in model.model.layers:  # buffers are not in the checkpoint: recompute them on the device
        layer.self_attn.rotary.inv_freq = inv_freq
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if files.quant_config is not None:
        from lowbit.quant.checkpoint import install_quantized

        install_quantized(model, files.quant_config, {k: v.to(device) for k, v in quantized.items()}, files.source)
    return model.eval()


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """-> (module, tokenizer, ModelConfig)."""
    files = load_model_files(model)
    return build_model(files, dtype, device), files.tokenizer, files.config
