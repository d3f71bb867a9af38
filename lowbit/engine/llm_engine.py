"""The engine loop: requests in, one scheduled forward pass per `step`, outputs back."""
from __future__ import annotations

import itertools

from lowbit.config import EngineConfig, ModelConfig
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.detokenizer import IncrementalDetokenizer
from lowbit.engine.model_runner import ModelRunner
from lowbit.engine.outputs import CompletionOutput, RequestOutput
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError
from lowbit.sampling_params import SamplingParams


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence],
                 detokenizers: list[IncrementalDetokenizer | None], stream: bool):
        self.request_id, self.prompt, self.prompt_ids, self.seqs = request_id, prompt, prompt_ids, seqs
        self.detokenizers = detokenizers  # one per sequence; None without a tokenizer (no text)
        self.stream = stream  # an output every step it moves, or only when finished

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    """`tokenizer` may be None (random-weights models without one): prompts are then token ids and
    outputs carry ids only (empty text)."""

    def __init__(self, model, tokenizer, model_cfg: ModelConfig, cfg: EngineConfig):
        self.model, self.tokenizer, self.model_cfg, self.cfg = model, tokenizer, model_cfg, cfg
        self.runner = ModelRunner(model, model_cfg, cfg)
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.requests: dict[str, _Request] = {}
        self.eos_ids = set(model_cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._ids = itertools.count()

    # --- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    stream: bool = True) -> str:
        """Queue a request; `step` returns its output every step it moves (`stream`) or only once it
        has finished (offline use: no per-step copies of every running request's tokens)."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise LowbitError(f"request id {request_id!r} is already in use")
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise LowbitError("this model has no tokenizer: send token ids, without stop strings")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise LowbitError("the prompt is empty")
        if any(not 0 <= t < self.model_cfg.vocab_size for t in ids):
            raise LowbitError(f"prompt token ids must be in [0, {self.model_cfg.vocab_size})")
        if len(ids) >= self.cfg.max_model_len:
            raise LowbitError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.cfg.max_model_len} tokens"
            )
        seqs = [
            Sequence(request_id, i, ids, params, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)
        ]
        detokenizers = [None if self.tokenizer is None else
                        IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) for _ in seqs]
        self.requests[request_id] = _Request(request_id, text, ids, seqs, detokenizers, stream)
        for s in seqs:
            self.scheduler.add(s)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for s in req.seqs:
                if not s.is_finished:
                    self.scheduler.finish(s, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return the state of every request that moved (finished ones last seen here)."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise LowbitError("the KV cache is too small to schedule any request")
            return []
        tokens, logprobs = self.runner.run(batch)
        sampled = [item.seq for item in batch if item.samples]
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
        for seq, tok, lp in zip(sampled, tokens, logprobs):
            self._append(seq, tok, lp)
        outs = []
        for rid in {s.request_id for s in sampled}:
            req = self.requests[rid]
            finished = req.finished
            if finished or req.stream:
                outs.append(self._output(req, finished))
            if finished:
                del self.requests[rid]
        return outs

    def _append(self, seq: Sequence, token: int, lp) -> None:
        p = seq.params
        seq.append_token(token)
        if lp is not None:
            seq.output_logprobs.append(lp)
        reason = None
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            reason = "stop"
        detokenizer = self.requests[seq.request_id].detokenizers[seq.index]
        if detokenizer is not None:
            searched = len(detokenizer.stable)  # final text, already searched for stop strings
            seq.output_text = detokenizer.append(token)
            for stop in p.stop:
                at = seq.output_text.find(stop, max(0, searched - len(stop) + 1))
                if at >= 0:
                    seq.output_text, reason = seq.output_text[:at], "stop"
        if reason is None and (
            (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or len(seq) >= self.cfg.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason,
                             list(s.output_logprobs) if s.params.logprobs is not None else None)
            for s in req.seqs
        ]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished)
