"""Model and engine configuration: frozen dataclasses built from HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError

# model_type -> (q/k/v bias default, q/k RMSNorm)
SUPPORTED_ARCHS = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}
SUPPORTED_ROPE = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape; one class covers every supported family through flags."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise LowbitError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE:
            raise LowbitError(f"unsupported rope_scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE)})")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a checkpoint carries (parsed back by `from_hf_dict`)."""
        return {
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids), "torch_dtype": self.dtype,
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise LowbitError(
                f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            rope.update(cfg.get("rope_scaling") or {})
            theta = float(cfg.get("rope_theta", rope.pop("rope_theta", 10000.0)))
            rope.pop("rope_theta", None)
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if rope.get("rope_type", "default") == "default":
                rope = {}
            bias_default, qk_norm = SUPPORTED_ARCHS[model_type]
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope or None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", bias_default)),
                qk_norm=qk_norm,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LowbitError(f"config.json: missing or invalid field {e}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: KV-cache paging, batching limits, device and dtype."""

    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs for decode batches
    async_scheduling: bool = True  # schedule and launch step n+1 before reading back step n's tokens
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise LowbitError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise LowbitError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
