"""Log-likelihood scoring and zero-shot accuracy, computed as lm-evaluation-harness computes them.

Tokenization follows the harness for causal models: no special tokens; trailing whitespace of the
context moves to the start of the continuation, and the continuation's tokens are those of
`context + continuation` past the tokens of `context` alone (so a merge across the boundary is
scored as part of the continuation). An empty context is replaced by the BOS token (EOS without one).

Metrics (per task): `acc` is the share of items whose right choice has the highest summed
log-likelihood; `acc_norm` divides each log-likelihood by its choice's length in characters first
(the harness's definition); for LAMBADA, `acc` is the share whose last word is the greedy
continuation and `perplexity` is exp of the mean negative log-likelihood of the last word.
`acc_stderr` (and `acc_norm_stderr`) is the harness's standard error of a mean of 0/1 outcomes, the
sample standard deviation over sqrt(n): sqrt(acc * (1 - acc) / (n - 1)); `average_acc_stderr` that of
the unweighted mean of the tasks' accuracies, sqrt(sum of their squared stderrs) / number of tasks.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.tasks import LOGLIKELIHOOD, Task, load_task
from lowbit.layers.context import AttentionContext


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


def _packs(inputs: list[tuple[int, ...]], max_tokens: int):
    """Consecutive runs of `inputs` holding at most `max_tokens` tokens in all (a longer input runs alone)."""
    batch, used = [], 0
    for inp in inputs:
        if batch and used + len(inp) > max_tokens:
            yield batch
            batch, used = [], 0
        batch.append(inp)
        used += len(inp)
    if batch:
        yield batch


@torch.no_grad()
def loglikelihood_tokens(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                         progress: bool = True, max_tokens_per_batch: int = 16384) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is the continuation the greedy one) per token pair.

    Sequences longer than the model's context lose tokens on the left. Requests that feed the model
    the same tokens (e.g. one-token answers to one question) share one forward; the rest run longest
    first, packed without padding into flat batches of at most `max_tokens_per_batch` tokens. Only the
    continuations' positions get logits (full-vocabulary logits at every padded position took most of
    the time before), and each batch comes back to the host in one transfer.

    `batch_size` (sequences per padded batch, before packing) no longer bounds a batch; it is kept,
    and checked, so that callers passing it positionally (the CLI, the lm-eval adapter) still work.
    """
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens_per_batch < 1:
        raise LowbitError(f"max_tokens_per_batch must be at least 1, got {max_tokens_per_batch}")
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
    for batch in _packs(inputs, max_tokens_per_batch):
        ids = [t for inp in batch for t in inp]
        positions = [p for inp in batch for p in range(len(inp))]
        hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                       AttentionContext.cacheless([len(inp) for inp in batch], device))
        # owners: the requests scored here; rows, targets: their continuation tokens' places in `hidden`, ids
        owners, rows, targets, end = [], [], [], 0
        for inp in batch:
            end += len(inp)
            for i in by_input[inp]:
                cont = requests[i][1]
                rows.extend(range(end - len(cont), end))
                targets.extend(cont)
                owners.append(i)
        seg = torch.repeat_interleave(torch.tensor([len(requests[i][1]) for i in owners], device=device))
        targets = torch.tensor(targets, device=device)
        logprobs = torch.log_softmax(model.compute_logits(hidden[torch.tensor(rows, device=device)]), dim=-1)
        totals = torch.zeros(len(owners), dtype=torch.float64, device=device).index_add_(
            0, seg, logprobs.gather(-1, targets[:, None])[:, 0].double())
        misses = torch.zeros(len(owners), dtype=torch.float64, device=device).index_add_(
            0, seg, (logprobs.argmax(-1) != targets).double())
        for i, (total, miss) in zip(owners, torch.stack([totals, misses], dim=1).tolist()):
            results[i] = (total, miss == 0)
        bar.update(len(owners))
    bar.close()
    return results


def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                  progress: bool = True) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context, continuation) text pair."""
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    return loglikelihood_tokens(model, pairs, batch_size, progress)


def acc_stderr(acc: float, n: int) -> float | None:
    """Standard error of a mean of n 0/1 outcomes whose mean is `acc`, as lm-evaluation-harness computes
    `acc_stderr` (sample stddev / sqrt(n) = sqrt(acc * (1 - acc) / (n - 1))); None below 2 items."""
    if not 0 <= acc <= 1:
        raise ValueError(f"accuracy must be in [0, 1], got {acc}")
    return None if n < 2 else math.sqrt(acc * (1 - acc) / (n - 1))


def mean_of_means_stderr(stderrs: list[float | None]) -> float | None:
    """Standard error of the unweighted mean of independent estimates: sqrt(sum se_i^2) / len."""
    if not stderrs:
        raise ValueError("no standard errors to combine")
    if any(se is None for se in stderrs):
        return None
    return math.sqrt(sum(se * se for se in stderrs)) / len(stderrs)


def difference_in_stderrs(a: float, se_a: float | None, b: float, se_b: float | None) -> float | None:
    """(a - b) / sqrt(se_a^2 + se_b^2): how many combined standard errors apart two estimates are
    (treated as independent; None without both errors, or when both are 0)."""
    if se_a is None or se_b is None or se_a == se_b == 0:
        return None
    return (a - b) / math.hypot(se_a, se_b)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equals, like numpy


def task_metrics(task: Task, results: list[list[tuple[float, bool]]]) -> dict:
    """The task's metrics from its items' (log-likelihood, is_greedy) results, item by item.
    `outcomes`: each item's `acc` as "1" (right) or "0", in item order, for paired comparisons."""
    n = len(task.items)
    if task.output_type == LOGLIKELIHOOD:
        lls, greedy = zip(*(r[0] for r in results))
        acc = sum(greedy) / n
        return {"acc": acc, "acc_stderr": acc_stderr(acc, n), "perplexity": math.exp(-sum(lls) / n), "samples": n,
                "outcomes": _outcomes(greedy)}
    lls = [[ll for ll, _ in res] for res in results]
    right = [_argmax(ll) == item.gold for ll, item in zip(lls, task.items)]
    acc = sum(right) / n
    out = {"acc": acc, "acc_stderr": acc_stderr(acc, n)}
    if "acc_norm" in task.metrics:
        norm = sum(_argmax([x / len(c) for x, c in zip(ll, item.choices, strict=True)]) == item.gold
                   for ll, item in zip(lls, task.items)) / n
        out.update(acc_norm=norm, acc_norm_stderr=acc_stderr(norm, n))
    return {**out, "samples": n, "outcomes": _outcomes(right)}


def _outcomes(right) -> str:
    return "".join("1" if r else "0" for r in right)


def paired_difference(a: str, b: str) -> tuple[float, float | None]:
    """Accuracy of `a` minus that of `b`, scored on the same items (`outcomes` strings), and the standard
    error of that difference from the per-item differences (sample stddev / sqrt(n)): items both get
    right or both get wrong add no noise, so it is tighter than combining the two accuracies' errors."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes must cover the same items, got {len(a)} and {len(b)}")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def score_tasks(model, tokenizer, tasks: list[Task], batch_size: int = 8, progress: bool = True) -> dict:
    """-> {"tasks": {name: metrics}, "average_acc": mean of the tasks' `acc`, "average_acc_stderr": its
    standard error}; one pass over all requests."""
    if not tasks:
        raise LowbitError("no tasks to evaluate")
    requests = [r for task in tasks for item in task.items for r in item.requests]
    flat = iter(loglikelihood(model, tokenizer, requests, batch_size, progress))
    report = {}
    for task in tasks:
        results = [[next(flat) for _ in item.requests] for item in task.items]
        report[task.name] = task_metrics(task, results)
    return {"tasks": report, "average_acc": sum(m["acc"] for m in report.values()) / len(report),
            "average_acc_stderr": mean_of_means_stderr([m["acc_stderr"] for m in report.values()])}


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy on the named shipped tasks (see `lowbit.eval.tasks.TASKS`), first `limit` items each."""
    loaded = {}
    for name in tasks:
        task = load_task(name, limit)
        loaded.setdefault(task.name, task)
    return score_tasks(model, tokenizer, list(loaded.values()), batch_size, progress)
