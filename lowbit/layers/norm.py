"""RMSNorm, computed in fp32 like the Hugging Face reference (one kernel for 16-bit CUDA tensors)."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def quantized(self, x: torch.Tensor, token_dtype: torch.dtype):
        """The norm of `x [T, H]` straight to per-token codes for the next Linear's kernel, in one pass
        (the normed values stay fp32 up to the quantization, not rounded to x's dtype first)."""
        return QuantizedActivation(*rmsnorm_quant(x, self.weight, self.eps, out_dtype=token_dtype), x.dtype)
