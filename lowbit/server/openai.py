"""The OpenAI-compatible HTTP API in front of an `AsyncLLMEngine`.

/v1/completions and /v1/chat/completions (with SSE streaming), /v1/models, /health and /metrics.
A bad request gets a 4xx with OpenAI's error body and touches nothing else: each HTTP request
owns its engine requests, and they are aborted as soon as its client goes away.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from lowbit.api import apply_chat_template
from lowbit.engine.async_engine import AsyncLLMEngine, StepStats
from lowbit.engine.outputs import CompletionOutput, RequestOutput
from lowbit.errors import LowbitError
from lowbit.layers.sampler import TokenLogprob
from lowbit.sampling_params import SamplingParams

# OpenAI parameters the engine does not implement: refused unless left at their neutral value
UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "echo": False,
               "suffix": None, "best_of": 1, "tools": None}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


# --- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the body is not valid JSON")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", param=loc[0] if loc else None)


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LowbitError):
        return APIError(400, str(exc))
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail))
    return APIError(500, f"internal error: {exc}", kind="server_error")


async def _error_response(_: Request, exc: Exception) -> JSONResponse:
    return _as_api_error(exc).response()


# --- request bodies -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields both endpoints share: OpenAI's names, plus vLLM's sampling extras (`extra_body`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Check the options only the server knows, then let SamplingParams check the values (its
        LowbitError becomes a 400); fields left unset keep SamplingParams' defaults."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, UNSUPPORTED[name]):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        names = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                 "stop_token_ids", "ignore_eos", "skip_special_tokens")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default; null: until the context is full
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# --- response formats ------------------------------------------------------------------------------
@dataclass
class _Choice:
    """Streaming progress of one choice."""

    chars: int = 0  # text sent
    tokens: int = 0  # logprobs sent
    offset: int = 0  # characters of the token strings sent (completions' text_offset)
    done: bool = False


class _Format:
    """How one endpoint spells its choices; token strings come from the tokenizer."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def first_delta(self, index: int) -> dict | None:
        return None


class _CompletionFormat(_Format):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None,
               state: _Choice | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs, state or _Choice()),
                "finish_reason": finish}

    delta = choice

    def _logprobs(self, logprobs: list[TokenLogprob] | None, state: _Choice) -> dict | None:
        """OpenAI's legacy format: parallel lists, top_logprobs as {token: logprob}."""
        if logprobs is None:
            return None
        tokens, offsets = [self.token(lp.token_id) for lp in logprobs], []
        for t in tokens:
            offsets.append(state.offset)
            state.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.token(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}


class _ChatFormat(_Format):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None,
              state: _Choice) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": self._logprobs(logprobs),
                "finish_reason": finish}

    def first_delta(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self.token(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]}


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _settled(out: CompletionOutput, holdback: int) -> str:
    """The part of a running choice's text that later tokens cannot change: a possible start of a
    stop string and a trailing partial UTF-8 character (decoded as U+FFFD) wait for more tokens."""
    if out.finish_reason is not None:
        return out.text
    text = out.text[:len(out.text) - holdback] if holdback else out.text
    return text.rstrip("\ufffd")


# --- running requests -----------------------------------------------------------------------------
async def _outputs(engine: AsyncLLMEngine, prompts: list, params: SamplingParams,
                   request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Each prompt as its own engine request; yields (prompt index, output) as they come. Closing
    this early (or an error in one prompt) aborts every unfinished one."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, prompt) -> None:
        try:
            async for out in engine.generate(prompt, params, f"{request_id}-{i}"):
                merged.put_nowait((i, out))
        except Exception as e:
            merged.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        left = len(tasks)
        while left:
            i, item = await merged.get()
            if isinstance(item, Exception):
                raise item
            left -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnect(request: Request, work):
    """Await `work`, cancelling it if the client hangs up first (Starlette does this by itself
    only while a streaming body is being sent)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # nobody will read this answer
            raise APIError(499, "the client disconnected") from None
        raise
    finally:
        watcher.cancel()


class _Handler:
    """One endpoint's request: runs its prompts and answers in one piece or as an SSE stream."""

    def __init__(self, engine: AsyncLLMEngine, fmt: _Format, model_name: str, req: _SamplingRequest,
                 prompts: list, params: SamplingParams):
        self.engine, self.fmt, self.model, self.req = engine, fmt, model_name, req
        self.prompts, self.params = prompts, params
        self.id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def respond(self, request: Request) -> Response:
        stream = _outputs(self.engine, self.prompts, self.params, self.id)
        if not self.req.stream:
            return JSONResponse(await _until_disconnect(request, self._complete(stream)))
        first = await _until_disconnect(request, anext(stream))  # a rejected prompt is still a 4xx here
        return StreamingResponse(self._sse(first, stream), media_type="text/event-stream")

    async def _complete(self, stream) -> dict:
        finals: dict[int, RequestOutput] = {}
        async with aclosing(stream):
            async for i, out in stream:
                if out.finished:
                    finals[i] = out
        outs = [finals[i] for i in range(len(self.prompts))]
        choices = [self.fmt.choice(i * self.params.n + c.index, c.text, c.logprobs, c.finish_reason)
                   for i, out in enumerate(outs) for c in out.outputs]
        return {"id": self.id, "object": self.fmt.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(outs)}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": self.fmt.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}
        if self.req.stream_options and self.req.stream_options.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def _sse(self, first: tuple[int, RequestOutput], stream) -> AsyncIterator[str]:
        n = self.params.n
        states = [_Choice() for _ in range(len(self.prompts) * n)]
        latest: dict[int, RequestOutput] = {}
        holdback = max((len(s) - 1 for s in self.params.stop), default=0)
        starts = [d for d in map(self.fmt.first_delta, range(len(states))) if d is not None]
        if starts:
            yield self._chunk(starts)
        try:
            async with aclosing(stream):
                item = first
                while item is not None:
                    i, out = item
                    latest[i] = out
                    choices = []
                    for c in out.outputs:
                        st = states[i * n + c.index]
                        text = _settled(c, holdback)[st.chars:]
                        lps = None if c.logprobs is None else c.logprobs[st.tokens:]
                        if st.done or not (text or lps or c.finish_reason):
                            continue
                        choices.append(self.fmt.delta(i * n + c.index, text, lps, c.finish_reason, st))
                        st.chars += len(text)
                        st.tokens = len(c.token_ids)
                        st.done = c.finish_reason is not None
                    if choices:
                        yield self._chunk(choices)
                    item = await anext(stream, None)
        except Exception as e:  # the response has started: the error goes in the stream
            yield f"data: {json.dumps(_as_api_error(e).body())}\n\n"
        else:
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self._chunk([], _usage([latest[i] for i in sorted(latest)]))
        yield "data: [DONE]\n\n"


def _fit_context(tokenizer, prompts: list, params: SamplingParams, context: int) -> list[list[int]]:
    """Token ids of each prompt; like OpenAI and vLLM, refuse a request whose prompt plus
    max_tokens does not fit the context (rather than cutting its output short)."""
    out = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
        want = len(ids) + (params.max_tokens or 0)
        if len(ids) >= context or want > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{want} tokens ({len(ids)} in the prompt, {params.max_tokens or 0} for the "
                                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        out.append(ids)
    return out


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    conversation = [m.as_dict() for m in messages]
    try:
        return apply_chat_template(tokenizer, conversation)
    except jinja2.TemplateError as e:
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None


# --- metrics --------------------------------------------------------------------------------------
def _metrics(engine: AsyncLLMEngine, model_name: str) -> CollectorRegistry:
    """vLLM's serving metrics under the `lowbit:` prefix, in a registry of this app's own."""
    registry = CollectorRegistry()

    def labelled(kind, name: str, doc: str, **kw):
        return kind(name, doc, ["model_name"], registry=registry, **kw).labels(model_name=model_name)

    labelled(Gauge, "lowbit:num_requests_running", "Requests in the running batch.").set_function(
        lambda: engine.num_running)
    labelled(Gauge, "lowbit:num_requests_waiting", "Requests waiting to be scheduled.").set_function(
        lambda: engine.num_waiting)
    labelled(Gauge, "lowbit:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).").set_function(
        lambda: engine.kv_cache_usage)
    prompt = labelled(Counter, "lowbit:prompt_tokens", "Prompt tokens prefilled.")
    generation = labelled(Counter, "lowbit:generation_tokens", "Tokens generated.")
    ttft = labelled(Histogram, "lowbit:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS)
    tpot = labelled(Histogram, "lowbit:time_per_output_token_seconds",
                    "Per request: time per output token after the first.", buckets=TOKEN_BUCKETS)
    e2e = labelled(Histogram, "lowbit:e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS)
    cached = labelled(Counter, "lowbit:prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.")
    scheduler = engine.engine.scheduler
    seen = [scheduler.num_cached_tokens]

    def record(stats: StepStats) -> None:  # runs in the engine thread, after each step
        cached.inc(scheduler.num_cached_tokens - seen[0])
        seen[0] = scheduler.num_cached_tokens
        prompt.inc(stats.prompt_tokens)
        generation.inc(stats.generation_tokens)
        for hist, values in ((ttft, stats.ttft), (tpot, stats.tpot), (e2e, stats.e2e)):
            for v in values:
                hist.observe(v)

    engine.add_stats_listener(record)
    return registry


# --- the app --------------------------------------------------------------------------------------
def build_app(engine: AsyncLLMEngine, model_name: str, tokenizer, api_key: str | None = None,
              max_model_len: int | None = None) -> FastAPI:
    """`max_model_len` (reported by /v1/models) defaults to the engine's."""
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None)
    for exc in (APIError, LowbitError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc, _error_response)
    registry = _metrics(engine, model_name)
    max_model_len = max_model_len or engine.engine.cfg.max_model_len
    context = engine.engine.cfg.max_model_len
    completions, chat = _CompletionFormat(tokenizer), _ChatFormat(tokenizer)

    async def check_key(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)] if api_key else [])

    def check_model(req: _SamplingRequest) -> None:
        if req.model not in (None, model_name):
            raise APIError(404, f"The model `{req.model}` does not exist (this server has `{model_name}`).",
                           param="model", code="model_not_found")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lowbit", "max_model_len": max_model_len}]}

    @v1.post("/completions")
    async def create_completion(req: CompletionRequest, request: Request) -> Response:
        check_model(req)
        params = req.sampling_params(req.max_tokens, req.logprobs)
        prompts = _fit_context(tokenizer, req.prompts(), params, context)
        return await _Handler(engine, completions, model_name, req, prompts, params).respond(request)

    @v1.post("/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        prompts = _fit_context(tokenizer, [_chat_prompt(tokenizer, req.messages)], params, context)
        return await _Handler(engine, chat, model_name, req, prompts, params).respond(request)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
