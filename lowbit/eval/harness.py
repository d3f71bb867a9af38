"""Log-likelihood scoring and zero-shot accuracy, computed as lm-evaluation-harness computes them.

Tokenization follows the harness for causal models: no special tokens; trailing whitespace of the
context moves to the start of the continuation, and the continuation's tokens are those of
`context + continuation` past the tokens of `context` alone (so a merge across the boundary is
scored as part of the continuation). An empty context is replaced by the BOS token (EOS without one).

Metrics (per task): `acc` is the share of items whose right choice has the highest summed
log-likelihood; `acc_norm` divides each log-likelihood by its choice's length in characters first
(the harness's definition); for LAMBADA, `acc` is the share whose last word is the greedy
continuation and `perplexity` is exp of the mean negative log-likelihood of the last word.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.tasks import LOGLIKELIHOOD, Task, load_task


def prefix_token_id(tokenizer) -> int:
    """What an empty context is replaced by: BOS, or EOS when there is none."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) the harness's way (see the module docstring)."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not context:
        cont = encode(continuation)
        if cont and cont[0] == prefix_token_id(tokenizer):
            return cont[:1], cont[1:]
        return [prefix_token_id(tokenizer)], cont
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = encode(context)
    return ctx, encode(context + continuation)[len(ctx):]


@torch.no_grad()
def loglikelihood_tokens(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                         progress: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is the continuation the greedy one) per token pair.

    Sequences longer than the model's context lose tokens on the left. Requests that feed the model
    the same tokens (e.g. one-token answers to one question) share one forward; the rest run longest
    first in right-padded batches through `model.logits_for_batch`.
    """
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}")
    max_len = model.config.max_position_embeddings
    by_input: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise LowbitError(f"request {i}: empty {'context' if not ctx else 'continuation'} after tokenization")
        if len(cont) > max_len:
            raise LowbitError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's context "
                              f"of {max_len}")
        by_input.setdefault(tuple((ctx + cont)[-(max_len + 1):-1]), []).append(i)
    inputs = sorted(by_input, key=len, reverse=True)
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", disable=not progress)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start: start + batch_size]
        batch = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)  # padding: any id, never read
        for row, inp in enumerate(chunk):
            batch[row, : len(inp)] = torch.tensor(inp)
        logits = model.logits_for_batch(batch.to(device))
        for row, inp in enumerate(chunk):
            for i in by_input[inp]:
                cont = torch.tensor(requests[i][1], device=device)
                logprobs = torch.log_softmax(logits[row, len(inp) - len(cont): len(inp)].float(), dim=-1)
                total = logprobs.gather(-1, cont[:, None]).double().sum().item()
                results[i] = (total, bool((logprobs.argmax(-1) == cont).all()))
            bar.update(len(by_input[inp]))
    bar.close()
    return results


def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                  progress: bool = True) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context, continuation) text pair."""
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    return loglikelihood_tokens(model, pairs, batch_size, progress)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equals, like numpy


def task_metrics(task: Task, results: list[list[tuple[float, bool]]]) -> dict:
    """The task's metrics from its items' (log-likelihood, is_greedy) results, item by item."""
    n = len(task.items)
    if task.output_type == LOGLIKELIHOOD:
        lls, greedy = zip(*(r[0] for r in results))
        return {"acc": sum(greedy) / n, "perplexity": math.exp(-sum(lls) / n), "samples": n}
    lls = [[ll for ll, _ in res] for res in results]
    out = {"acc": sum(_argmax(ll) == item.gold for ll, item in zip(lls, task.items)) / n}
    if "acc_norm" in task.metrics:
        out["acc_norm"] = sum(
            _argmax([x / len(c) for x, c in zip(ll, item.choices, strict=True)]) == item.gold
            for ll, item in zip(lls, task.items)) / n
    return {**out, "samples": n}


def score_tasks(model, tokenizer, tasks: list[Task], batch_size: int = 8, progress: bool = True) -> dict:
    """-> {"tasks": {name: metrics}, "average_acc": mean of the tasks' `acc`}; one pass over all requests."""
    if not tasks:
        raise LowbitError("no tasks to evaluate")
    requests = [r for task in tasks for item in task.items for r in item.requests]
    flat = iter(loglikelihood(model, tokenizer, requests, batch_size, progress))
    report = {}
    for task in tasks:
        results = [[next(flat) for _ in item.requests] for item in task.items]
        report[task.name] = task_metrics(task, results)
    return {"tasks": report, "average_acc": sum(m["acc"] for m in report.values()) / len(report)}


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy on the named shipped tasks (see `lowbit.eval.tasks.TASKS`), first `limit` items each."""
    loaded = {}
    for name in tasks:
        task = load_task(name, limit)
        loaded.setdefault(task.name, task)
    return score_tasks(model, tokenizer, list(loaded.values()), batch_size, progress)
