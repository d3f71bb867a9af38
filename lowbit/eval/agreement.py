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


def _log_probs(model, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float64 log-probabilities `[B, L-1, V]` of each window's next tokens, on `device`."""
    own = next(model.parameters()).device
    logits = model.logits_for_batch(batch.to(own))[:, :-1]
    return torch.log_softmax(logits.to(device, torch.float64), dim=-1)


@torch.no_grad()
def kl_agreement(model, ref_model, tokens: torch.Tensor, ctx: int = 512, max_windows: int | None = None,
                 batch_size: int = 1, progress: bool = True) -> dict:
    """-> {"kl_mean", "kl_p99", "kl_max", "top1_agreement", "ppl", "ref_ppl", "tokens", "windows", "ctx"}.

    KL values are in nats per predicted token; `ppl` is the model's perplexity, `ref_ppl` the reference's.
    """
    w = windows(tokens, ctx, max_windows)
    device = next(model.parameters()).device
    kls, agree, nll, ref_nll = [], 0, 0.0, 0.0
    for i in tqdm(range(0, len(w), batch_size), desc="kl-divergence", disable=not progress):
        batch = w[i: i + batch_size]
        logp = _log_probs(model, batch, device)
        ref = _log_probs(ref_model, batch, device)
        kls.append((ref.exp() * (ref - logp)).sum(-1).flatten().cpu())
        agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        target = batch[:, 1:, None].to(device)
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
