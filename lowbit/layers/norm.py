"""RMSNorm, computed in fp32 like the Hugging Face reference (one kernel for 16-bit CUDA tensors).

Given a residual, it first adds it (h = x + residual, rounded to x's dtype as the model's add was)
and returns h as the next residual beside its output: vLLM's fused_add_rms_norm, which saves the
decoder its separate residual adds and a second read of the sum.
"""
import torch
from torch import nn

from lowbit.kernels.actquant import rmsnorm_quant
from lowbit.kernels.elementwise import rmsnorm
from lowbit.quant.linear_method import QuantizedActivation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """-> norm(x), or (norm(x + residual), x + residual)."""
        return rmsnorm(x, self.weight, self.eps, residual)

    def quantized(self, x: torch.Tensor, token_dtype: torch.dtype, residual: torch.Tensor | None = None):
        """The norm of `x [T, H]` straight to per-token codes for the next Linear's kernel, in one pass
        (the normed values stay fp32 up to the quantization, not rounded to x's dtype first); with a
        residual, of x + residual, returned beside the codes as `forward` does."""
        out = rmsnorm_quant(x, self.weight, self.eps, residual, out_dtype=token_dtype)
        q = QuantizedActivation(*out[:2], x.dtype)
        return q if residual is None else (q, out[2])
