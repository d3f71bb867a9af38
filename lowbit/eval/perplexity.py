"""WikiText-2 perplexity the way quantization papers report it.

The whole test file is tokenized once (no BOS), cut into non-overlapping windows of `ctx` tokens
(the tail shorter than a window is dropped), and every next-token prediction inside a window is
scored: perplexity = exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lowbit.data import WIKITEXT2_TEST
from lowbit.errors import LowbitError

DATASETS = {"wikitext2": WIKITEXT2_TEST}


def dataset_tokens(tokenizer, name: str = "wikitext2") -> torch.Tensor:
    if name not in DATASETS:
        raise LowbitError(f"unknown perplexity dataset {name!r} (known: {', '.join(DATASETS)})")
    text = DATASETS[name].read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    if ctx < 2:
        raise LowbitError(f"--ctx must be at least 2, got {ctx}")
    n = tokens.numel() // ctx
    if max_windows is not None:
        if max_windows < 1:
            raise LowbitError(f"--max-windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise LowbitError(f"the text has {tokens.numel()} tokens, fewer than one window of {ctx}")
    return tokens[: n * ctx].view(n, ctx)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, ctx: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """-> {"ppl", "nll", "tokens", "windows", "ctx"} for `model.logits_for_batch` over the windows."""
    w = windows(tokens, ctx, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(w), batch_size), desc="perplexity", disable=not progress):
        batch = w[i: i + batch_size].to(device)
        logits = model.logits_for_batch(batch)[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(w), "ctx": ctx}
