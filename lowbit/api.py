"""`LLM`: the vLLM-style Python entry point (load, generate, chat)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lowbit.config import EngineConfig
from lowbit.engine.llm_engine import LLMEngine
from lowbit.engine.outputs import RequestOutput
from lowbit.errors import LowbitError
from lowbit.models.loader import load_model
from lowbit.quant.recipes import get_recipe
from lowbit.sampling_params import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} asked for, but no CUDA GPU is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise LowbitError(f"unknown device {device!r} (use cpu, cuda or cuda:N)")
    return device


class LLM:
    """Load a model (HF directory, GGUF file, quantized checkpoint or `smollm2-135m`) and generate.

    >>> llm = LLM(model="smollm2-135m", device="cpu")
    >>> llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_model_len: int | None = None, recipe: str | None = None, calib: str | None = None,
                 calib_samples: int = 128, calib_len: int = 2048, random_weights: str | None = None,
                 **engine_kwargs):
        """`recipe` quantizes an unquantized model in memory first (calibrating on `calib` text).
        `random_weights` (an architecture of `lowbit.models.random_weights.ARCHS`, instead of `model`)
        builds a model at real shapes with random weights, for throughput; with it, `recipe` applies
        only its formats (round-to-nearest, no calibration)."""
        device = resolve_device(device)
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        if dtype not in DTYPES:
            raise LowbitError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
        if random_weights is not None:
            from lowbit.models.random_weights import load_random_model

            if model is not None:
                raise LowbitError(f"give a model or random weights, not both (model {model!r}, "
                                  f"random weights {random_weights!r})")
            module, self.tokenizer, self.model_config = load_random_model(
                random_weights, DTYPES[dtype], device, None if recipe is None else get_recipe(recipe))
        else:
            module, self.tokenizer, self.model_config = load_model(model, DTYPES[dtype], device)
        if recipe is not None and random_weights is None:
            from lowbit.quant.quantize import quantize_loaded

            if any(m.quant_method is not None for m in module.modules() if hasattr(m, "quant_method")):
                raise LowbitError(f"{model} is already quantized; --recipe applies to unquantized models")
            quantize_loaded(module, self.tokenizer, get_recipe(recipe), calib, calib_samples, calib_len)
            self.model_config = module.config
        max_len = min(max_model_len or self.model_config.max_position_embeddings, self.model_config.max_position_embeddings)
        cfg = EngineConfig(device=device, dtype=dtype, max_model_len=max_len, **engine_kwargs)
        self.model = module
        self.engine = LLMEngine(module, self.tokenizer, self.model_config, cfg)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, or a list of token-id lists. Outputs keep prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise LowbitError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp, stream=False) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False):
        """One conversation (a list of {role, content}) or a list of them, through the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        return apply_chat_template(self.tokenizer, conversation)


def apply_chat_template(tokenizer, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
