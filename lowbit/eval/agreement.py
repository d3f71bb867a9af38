"""How closely a (quantized) model follows its reference, token by token, like llama.cpp's
`perplexity --kl-divergence` report.

Perplexity averages away where two models disagree; the KL divergence of the next-token
distributions, KL(ref || model), does not, and top-1 agreement says how often greedy decoding would
pick the same token. Both run over the same non-overlapping windows as `perplexity` (every
next-token prediction in each window), so the two perplexities reported here are the ones
`lowbit.eval.perplexity.perplexity` gives for each model.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lowbit.eval.perplexity import windows


POSITIONS_PER_CHUNK = 256  # float64 log-softmax over the vocabulary, this many positions at a time


def _logits(model, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Next-token logits `[B, L-1, V]` of each window, on `device` in the model's precision."""
    own = next(model.parameters()).device
    return model.logits_for_batch(batch.to(own))[:, :-1].to(device)


@torch.no_grad()
def kl_agreement(model, ref_model, tokens: torch.Tensor, ctx: int = 512, max_windows: int | None = None,
                 batch_size: int = 1, progress: bool = True) -> dict:
    """-> {"kl_mean", "kl_p99", "kl_max", "top1_agreement", "ppl", "ref_ppl", "tokens", "windows", "ctx"}.

    KL values are in nats per predicted token; `ppl` is the model's perplexity, `ref_ppl` the reference's.
    The float64 log-probabilities are formed a chunk of positions at a time: for a whole batch they
    would take 8 bytes x windows x ctx x vocabulary (6 GB for 8 windows of 2048 over 49k tokens).
    """
    w = windows(tokens, ctx, max_windows)
    device = next(model.parameters()).device
    kls, agree, nll, ref_nll = [], 0, 0.0, 0.0
    for i in tqdm(range(0, len(w), batch_size), desc="kl-divergence", disable=not progress):
        batch = w[i: i + batch_size]
        logits, ref_logits = _logits(model, batch, device), _logits(ref_model, batch, device)
        targets = batch[:, 1:].to(device)
        for b in range(batch.shape[0]):
            for s in range(0, logits.shape[1], POSITIONS_PER_CHUNK):
                e = s + POSITIONS_PER_CHUNK
                logp = torch.log_softmax(logits[b, s:e].double(), dim=-1)
                ref = torch.log_softmax(ref_logits[b, s:e].double(), dim=-1)
                kls.append((ref.exp() * (ref - logp)).sum(-1).cpu())
                agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                target = targets[b, s:e, None]
                nll -= logp.gather(-1, target).sum().item()
                ref_nll -= ref.gather(-1, target).sum().item()
    kl = torch.cat(kls)
    n = kl.numel()
    return {
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "top1_agreement": agree / n,
        "ppl": math.exp(nll / n),
        "ref_ppl": math.exp(ref_nll / n),
        "tokens": n,
        "windows": len(w),
        "ctx": ctx,
    }
