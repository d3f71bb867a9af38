"""lm-evaluation-harness model `lowbit`: any harness task on a lowbit model (lm-eval is optional).

Importing this module registers the model with the harness:

    import lm_eval, lowbit.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="lowbit", model_args="model=DIR,device=cpu,batch_size=8", tasks=["arc_easy"])

Log-likelihoods come from `lowbit.eval.harness` (the same numbers `lowbit eval` reports), generation
from `lowbit.LLM`'s engine.
"""
from __future__ import annotations

from lowbit.api import LLM
from lowbit.errors import LowbitError
from lowbit.eval.harness import loglikelihood, loglikelihood_tokens, prefix_token_id
from lowbit.sampling_params import SamplingParams

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LowbitError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lowbit[lm-eval]'") from None

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs that score every token of a document exactly once.

    The first window conditions on `prefix` alone; each later one predicts the next `max_len`
    tokens (fewer at the end) with as much preceding text as the model's context still holds.
    """
    seq = [prefix] + tokens  # seq[j + 1] is tokens[j]
    pairs, start = [], 0
    while start < len(tokens):
        end = min(start + max_len, len(tokens))  # predict tokens[start:end]
        first = max(0, end - max_len)
        pairs.append((seq[first: start + 1], tokens[start:end]))
        start = end
    return pairs


def _sampling_params(gen_kwargs: dict, max_model_len: int) -> SamplingParams:
    """The harness's generation kwargs (`until`, `max_gen_toks`, `do_sample`, `temperature`, ...): greedy
    unless `do_sample`, as the harness reads them."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    max_tokens = kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if max_tokens >= max_model_len:
        raise LowbitError(f"max_gen_toks={max_tokens} leaves no room for a prompt in a context of {max_model_len}")
    do_sample, temperature = kw.pop("do_sample", False), kw.pop("temperature", 1.0)
    params = SamplingParams(
        temperature=temperature if do_sample else 0.0, max_tokens=max_tokens,
        stop=[until] if isinstance(until, str) else until,
        top_p=kw.pop("top_p", 1.0), top_k=kw.pop("top_k", -1), seed=kw.pop("seed", None))
    if kw:
        raise LowbitError(f"unsupported generation arguments for lowbit: {', '.join(sorted(kw))}")
    return params


@register_model("lowbit")
class LowbitLM(LM):
    """model_args: `model` (HF dir, GGUF, checkpoint or smollm2-135m), `device`, `dtype`, `batch_size`
    (a number; lm_eval's `auto` is not supported), `max_batch_size` (caps it), `recipe` (a named
    recipe or recipe file, applied to the loaded model in memory as `lowbit eval --recipe` does)."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, recipe: str | None = None):
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise LowbitError(f"batch_size must be a number for lowbit, got {batch_size!r}") from None
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.llm = LLM(model=model, device=device, dtype=dtype, recipe=recipe)  # recipe: quantized in memory
        self.max_length = self.llm.model_config.max_position_embeddings

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return loglikelihood(self.llm.model, self.llm.tokenizer, [r.args for r in requests], self.batch_size,
                             progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood, in windows of the model's context (the harness's scheme)."""
        tok = self.llm.tokenizer
        docs = [rolling_windows(tok(r.args[0], add_special_tokens=False)["input_ids"], prefix_token_id(tok),
                                self.max_length) for r in requests]
        flat = iter(loglikelihood_tokens(self.llm.model, [p for doc in docs for p in doc], self.batch_size,
                                         progress=not disable_tqdm))
        return [sum(next(flat)[0] for _ in doc) for doc in docs]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) text until a stop string, the context cut on the left to leave room."""
        prompts, params = [], []
        for context, gen_kwargs in (r.args for r in requests):
            p = _sampling_params(gen_kwargs, self.llm.engine.cfg.max_model_len)
            ids = self.llm.tokenizer(context, add_special_tokens=False)["input_ids"]
            prompts.append(ids[-(self.llm.engine.cfg.max_model_len - p.max_tokens):])
            params.append(p)
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm) if prompts else []
        return [out.outputs[0].text for out in outputs]
