"""Token sampling for a batch of sequences with per-request parameters.

Sampling uses the exponential-race form of a categorical draw (argmax of p / E, E ~ Exp(1);
`kernels.sampling`, one pass over the logits on CUDA): it needs no host sync, and a row's noise is
a hash of its sequence's stream (its seed, if it has one) and the drawn token's position, so a seeded
request's tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.engine.sequence import Sequence
from lowbit.kernels.sampling import race_sample
from lowbit.layers.transfer import to_device


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, best first


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """HF/vLLM rule: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    for i, seq in enumerate(seqs):
        rp = seq.params.repetition_penalty
        if rp == 1.0:
            continue
        ids = to_device(sorted(set(seq.token_ids)), torch.long, logits.device)
        seen = logits[i, ids]
        logits[i, ids] = torch.where(seen > 0, seen / rp, seen * rp)


def _cuts(seqs: list[Sequence], vocab: int) -> bool:
    """Whether any row's top-k, top-p or min-p can drop a token (the sort `_filter` needs)."""
    return not all((s.params.top_k <= 0 or s.params.top_k >= vocab) and s.params.top_p >= 1.0
                   and s.params.min_p <= 0.0 for s in seqs)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature (1 for greedy rows, whose argmax every cut keeps), top-k, top-p and min-p, each
    with a per-row value; returns the scaled logits, -inf where cut."""
    dev = logits.device
    temp = to_device([1.0 if s.params.greedy else s.params.temperature for s in seqs], torch.float32, dev)
    logits = logits / temp[:, None]
    vocab = logits.shape[-1]
    top_k = to_device([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], torch.long, dev)
    top_p = to_device([s.params.top_p for s in seqs], torch.float32, dev)
    min_p = to_device([s.params.min_p for s in seqs], torch.float32, dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev)[None, :]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep the smallest prefix reaching top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class Sampled:
    """A batch's draws, still on the device; `host()` waits for them (the one sync of a step)."""
    tokens: torch.Tensor
    want: list[int | None]
    chosen: torch.Tensor | None = None
    top_i: torch.Tensor | None = None
    top_v: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list["Sampled"]) -> "Sampled":
        """One batch's draws from its row chunks (each drawn with the same top width)."""
        cat = [None if t[0] is None else torch.cat(t) for t in
               zip(*((p.tokens, p.chosen, p.top_i, p.top_v) for p in parts))]
        return Sampled(cat[0], [w for p in parts for w in p.want], *cat[1:])

    def host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        logprobs: list[TokenLogprob | None] = [None] * len(self.want)
        if self.chosen is None:
            return self.tokens.tolist(), logprobs
        # each tensor comes to the host once for the whole batch, not once per sequence
        token_list, chosen, top_i, top_v = (t.tolist() for t in (self.tokens, self.chosen, self.top_i, self.top_v))
        for i, w in enumerate(self.want):
            if w is not None:
                logprobs[i] = TokenLogprob(token_list[i], chosen[i], list(zip(top_i[i][:w], top_v[i][:w])))
        return token_list, logprobs


# rows per pass over the vocabulary: the logits and the sampler's vocab-sized temporaries keep one
# size whatever the batch, so the caching allocator reuses its blocks instead of asking the driver
# for larger ones as the batch grows (a cudaFree synchronizes the device); it also bounds the
# sampler's share of the memory the KV cache is sized around
SAMPLE_ROWS = 256


def sample(hidden: torch.Tensor, compute_logits, seqs: list[Sequence]) -> Sampled:
    """hidden `[B, hidden_size]`, one row per sequence -> their draws, SAMPLE_ROWS rows at a time."""
    top = _top_width([s.params.logprobs for s in seqs])
    parts = [draw(compute_logits(hidden[i:i + SAMPLE_ROWS]), seqs[i:i + SAMPLE_ROWS], top)
             for i in range(0, len(seqs), SAMPLE_ROWS)]
    return parts[0] if len(parts) == 1 else Sampled.concat(parts)


def _top_width(want: list[int | None]) -> int:
    """How many top logprobs a batch whose rows ask `want` reports per row (0: no logprobs at all)."""
    return 0 if all(w is None for w in want) else max(1, *(w or 0 for w in want))


def draw(logits: torch.Tensor, seqs: list[Sequence], top: int | None = None) -> Sampled:
    """logits `[B, vocab]` (fp32 or the model's dtype), one row per sequence -> the tokens (and asked
    logprobs), on the device. `top`: the top-logprob width (default: what these sequences ask; 0: none)."""
    if any(s.params.repetition_penalty != 1.0 for s in seqs):
        logits = logits.float().clone()  # the penalty edits in place: never the caller's tensor
        apply_repetition_penalty(logits, seqs)
    greedy = [s.params.greedy for s in seqs]  # decided on the host: no device sync
    dev = logits.device
    if all(greedy):
        tokens = logits.argmax(-1)
    else:
        if _cuts(seqs, logits.shape[-1]):
            z, scale = _filter(logits.float(), seqs), [1.0] * len(seqs)  # the temperature is in z
        else:
            z, scale = logits, [1.0 if g else 1.0 / s.params.temperature for g, s in zip(greedy, seqs)]
        noise = [0.0 if g else 1.0 for g in greedy]  # greedy rows: the argmax, in the same pass
        streams, positions = [s.stream for s in seqs], [len(s.token_ids) for s in seqs]  # the drawn token's
        tokens = race_sample(z, to_device(scale, torch.float32, dev), to_device(noise, torch.float32, dev),
                             to_device(streams, torch.int64, dev), to_device(positions, torch.int64, dev))
    want = [s.params.logprobs for s in seqs]
    top = _top_width(want) if top is None else top
    if not top:
        return Sampled(tokens, want)
    lp = logits.float().log_softmax(-1)
    top_v, top_i = lp.topk(top, dim=-1)
    return Sampled(tokens, want, lp.gather(1, tokens[:, None])[:, 0], top_i, top_v)
