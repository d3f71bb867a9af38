"""The engine loop: requests in, one scheduled forward pass per `step`, outputs back."""
from __future__ import annotations

import itertools

from lowbit.config import EngineConfig, ModelConfig
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.detokenizer import IncrementalDetokenizer
from lowbit.engine.model_runner import ModelRunner
from lowbit.engine.outputs import CompletionOutput, RequestOutput
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import PENDING, Sequence
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
        """Every sequence has finished and its last token has been read back."""
        return all(s.is_finished and not s.num_pending for s in self.seqs)


class LLMEngine:
    """`tokenizer` may be None (random-weights models without one): prompts are then token ids and
    outputs carry ids only (empty text).

    With `async_scheduling` a step schedules and launches the next forward before it reads back the
    tokens of the one in flight, so the host's work (scheduling, batch building, outputs) overlaps
    the device's. Each sampled token enters its sequence as PENDING and the next launch takes it
    from the device; a sequence found to have stopped when its token is read back has computed
    one token too many, which is dropped. Finishing by length is known on the host at once."""

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
        self._inflight = None  # the launched step whose tokens are not read back yet (InFlight, positions)

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
        """Run one forward pass; return the state of every request that moved (finished ones last seen
        here). Asynchronously scheduled, what moved is the step launched by the previous call."""
        batch = self.scheduler.schedule()
        if not batch and self._inflight is None:
            if self.scheduler.has_work():
                raise LowbitError("the KV cache is too small to schedule any request")
            return []
        outs = []
        if self._inflight is not None and (not self.cfg.async_scheduling or any(
                item.seq.params.repetition_penalty != 1.0 for item in batch)):  # the penalty reads past tokens
            outs = self._resolve()
        launched = None
        if batch:
            inflight = self.runner.launch(batch)
            for item in batch:
                item.seq.num_computed_tokens += item.num_tokens
            launched = (inflight, [self._place(seq) for seq in inflight.seqs])
        if self._inflight is not None:
            outs = self._resolve()
        self._inflight = launched
        if launched is not None and not self.cfg.async_scheduling:
            outs = self._resolve()
        return outs

    def _place(self, seq: Sequence) -> int:
        """Give `seq` its drawn token as PENDING; finish it now if that reaches its length. -> its index."""
        seq.append_token(PENDING)
        seq.num_pending += 1
        p = seq.params
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or len(seq) >= self.cfg.max_model_len:
            self.scheduler.finish(seq, "length")
        return len(seq) - 1

    def _resolve(self) -> list[RequestOutput]:
        """Read back the in-flight step's tokens, apply them, and return the outputs of what moved."""
        (inflight, positions), self._inflight = self._inflight, None
        tokens, logprobs = inflight.result()
        touched = {}
        for seq, pos, tok, lp in zip(inflight.seqs, positions, tokens, logprobs):
            req = self.requests.get(seq.request_id)
            if req is None or pos >= len(seq.token_ids):  # aborted, or stopped before this token
                continue
            seq.token_ids[pos] = tok
            seq.num_pending -= 1
            self._accept(seq, pos, tok, lp)
            touched[req.request_id] = req
        outs = []
        for rid, req in touched.items():
            finished = req.finished
            if finished or req.stream:
                outs.append(self._output(req, finished))
            if finished:
                del self.requests[rid]
        return outs

    def _accept(self, seq: Sequence, pos: int, token: int, lp) -> None:
        """A read-back token: logprobs, text, stop conditions (a stop drops any later PENDING token)."""
        p = seq.params
        if lp is not None:
            seq.output_logprobs.append(lp)
        stopped = (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids
        detokenizer = self.requests[seq.request_id].detokenizers[seq.index]
        if detokenizer is not None:
            searched = len(detokenizer.stable)  # final text, already searched for stop strings
            seq.output_text = detokenizer.append(token)
            for stop in p.stop:
                at = seq.output_text.find(stop, max(0, searched - len(stop) + 1))
                if at >= 0:
                    seq.output_text, stopped = seq.output_text[:at], True
        if stopped:
            del seq.token_ids[pos + 1:]
            seq.num_pending = 0
            if seq.is_finished:  # by length, with this very token
                seq.finish_reason = "stop"
            else:
                self.scheduler.finish(seq, "stop")

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, s.output_text, s.output_token_ids, None if s.num_pending else s.finish_reason,
                             list(s.output_logprobs) if s.params.logprobs is not None else None)
            for s in req.seqs
        ]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished)
