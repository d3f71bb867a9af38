"""lowbit: quantize LLMs to 4 and 8 bits and serve them with a paged, quantized KV cache."""
from lowbit.api import LLM
from lowbit.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
