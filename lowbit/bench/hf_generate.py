"""The Hugging Face peer for offline throughput: transformers' `LlamaForCausalLM` at the shapes of a
random-weights architecture (`ARCHS`), in bf16 on CUDA, with batched `generate` over static batches
of equal-length prompts.

Every sequence generates exactly its output length (`min_new_tokens = max_new_tokens`), sampling at
temperature 1 with top-k and top-p off, as `throughput.run` does with our engine.
"""
from __future__ import annotations

import time

import torch

from lowbit.bench.throughput import summary
from lowbit.errors import LowbitError


def load_hf_model(arch: str, device: str, dtype: torch.dtype):
    """transformers' model at `arch`'s shapes, its default random init drawn on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.models.random_weights import ARCHS, random_config

    random_config(arch)  # the one error for an unknown architecture
    config = LlamaConfig(**{k: v for k, v in ARCHS[arch].items() if k not in ("model_type", "torch_dtype")})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def run(model, requests: list[tuple[list[int], int]], batch_size: int, time_limit_s: float | None = None,
        desc: str = "hf generate") -> dict:
    """Generate `requests` in order, `batch_size` at a time; once `time_limit_s` has passed no further
    batch starts (`capped`). The same metrics as `throughput.run`."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise LowbitError(f"the HF batch size must be >= 1, got {batch_size}")
    if len({len(p) for p, _ in requests}) > 1 or len({n for _, n in requests}) > 1:
        raise LowbitError("the hf backend needs one prompt and one output length (--range-ratio 0)")
    device = next(model.parameters()).device
    num_requests = prompt_tokens = output_tokens = 0
    start = time.perf_counter()
    with tqdm(total=len(requests), desc=desc) as bar:
        for i in range(0, len(requests), batch_size):
            if num_requests and time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                break
            batch = requests[i:i + batch_size]
            ids = torch.tensor([p for p, _ in batch], device=device)
            n = batch[0][1]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
            num_requests += len(batch)
            prompt_tokens += ids.numel()
            output_tokens += out[:, ids.shape[1]:].numel()
            bar.update(len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return summary(time.perf_counter() - start, num_requests, prompt_tokens, output_tokens,
                   capped=num_requests < len(requests))
