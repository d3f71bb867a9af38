"""The one decoder: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm), SmolLM2.

Parameter names follow Hugging Face's, so checkpoints load by name. The forward pass works on a
flat batch of tokens; `AttentionContext` says how they split into sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ModelConfig
from lowbit.kernels.actquant import silu_mul_quant
from lowbit.kernels.elementwise import silu_mul
from lowbit.layers.attention import Attention
from lowbit.layers.context import AttentionContext
from lowbit.layers.linear import Linear, fuse_linears
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding
from lowbit.quant.linear_method import QuantizedActivation


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, d)
        self.qkv = None  # q/k/v as one Linear (`LlamaForCausalLM.fuse_projections`)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v, ctx)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gate_up = None  # gate/up as one Linear (`LlamaForCausalLM.fuse_projections`)
        self.down_input = None  # set with gate_up: the codes down_proj's kernel reads (SiLU-mul-quantize fused)

    def forward(self, x) -> torch.Tensor:
        if self.down_input is not None:
            h = self.gate_up(x)
            return self.down_proj(QuantizedActivation(*silu_mul_quant(h, self.down_input), h.dtype))
        if self.gate_up is not None:
            return self.down_proj(silu_mul(self.gate_up(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        # per-token codes the fused qkv / gate_up kernels read: the norms quantize in one pass (fuse_projections)
        self.attn_input = self.mlp_input = None

    @staticmethod
    def _norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, token_dtype):
        """-> (the norm of x + residual, x + residual); no residual: (norm(x), x)."""
        out = norm(x, residual) if token_dtype is None else norm.quantized(x, token_dtype, residual)
        return (out, x) if residual is None else out

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The layer on its own, x -> its output (calibration runs layers one at a time)."""
        out, residual = self.forward_residual(positions, x, None, ctx)
        return residual + out

    def forward_residual(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                         ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's chaining: x is the previous layer's MLP output, not yet added to the residual stream
        `residual` (None: x is the stream, the embeddings); -> (this MLP's output, the stream before it).
        Each residual add runs inside the norm that reads the sum (one kernel, one read)."""
        h, residual = self._norm(self.input_layernorm, x, residual, self.attn_input)
        h, residual = self._norm(self.post_attention_layernorm, self.self_attn(positions, h, ctx), residual,
                                 self.mlp_input)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer.forward_residual(positions, x, residual, ctx)
        return self.norm(x, residual)[0]


def _token_dtype(linear: Linear | None) -> torch.dtype | None:
    """The per-token codes `linear`'s kernel reads, when its producer may hand them over quantized."""
    if linear is None or linear.quant_method is None or linear.online_hadamard:
        return None
    return linear.quant_method.token_dtype()


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Hidden states `[T, hidden]` for a flat batch of tokens."""
        return self.model(input_ids, positions, ctx)

    def fuse_projections(self) -> None:
        """Serve q/k/v and gate/up as one Linear each where their formats allow (`fuse_linears`).
        The fused Linears are kept out of the module tree: the parts stay the parameters of record
        (state dict, checkpoints, quantization) and now view the fused weights."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            object.__setattr__(attn, "qkv", fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
            object.__setattr__(mlp, "gate_up", fuse_linears([mlp.gate_proj, mlp.up_proj]))
            layer.attn_input, layer.mlp_input = _token_dtype(attn.qkv), _token_dtype(mlp.gate_up)
            mlp.down_input = _token_dtype(mlp.down_proj) if mlp.gate_up is not None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    @torch.no_grad()
    def logits_for_batch(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cache-less convenience for evaluation: `[B, L]` token ids -> `[B, L, vocab]` fp32 logits."""
        b, n = input_ids.shape
        ctx = AttentionContext.cacheless([n] * b, input_ids.device)
        positions = torch.arange(n, device=input_ids.device).repeat(b)
        hidden = self.forward(input_ids.reshape(-1), positions, ctx)
        return self.compute_logits(hidden).view(b, n, -1)
