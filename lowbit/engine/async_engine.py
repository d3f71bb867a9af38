"""`AsyncLLMEngine`: the synchronous `LLMEngine` driven by one background thread, for asyncio servers.

The thread owns the engine: requests and aborts reach it through a queue, and each output goes
back to the caller's event loop with `call_soon_threadsafe`, so no engine state is shared between
threads. A caller that stops listening (client gone, task cancelled) aborts its request, which
frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from lowbit.engine.llm_engine import LLMEngine
from lowbit.engine.outputs import RequestOutput
from lowbit.errors import LowbitError
from lowbit.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one engine step did, for metrics (latencies in seconds)."""

    prompt_tokens: int = 0  # prompts whose prefill finished this step
    generation_tokens: int = 0
    ttft: list[float] = field(default_factory=list)  # requests that got their first token
    tpot: list[float] = field(default_factory=list)  # finished requests: time per token after the first
    e2e: list[float] = field(default_factory=list)  # finished requests: arrival to last token


@dataclass
class _Tracked:
    """A request as the engine thread sees it: where its outputs go, and its timings."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    arrival: float
    first_token: float | None = None
    num_tokens: int = 0  # generated so far, all samples together


class AsyncLLMEngine:
    """Starts its engine thread on construction; `shutdown()` stops it.

    `num_running`, `num_waiting` (requests) and `kv_cache_usage` (0..1) are refreshed by the
    engine thread after every step; listeners added with `add_stats_listener` get a `StepStats`
    per step, called from that thread.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.num_running = self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._listeners: list[Callable[[StepStats], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Every update of the request until it finishes; a rejected request raises its error here."""
        if self._stopping:
            raise LowbitError("the engine is shut down")
        tracked = _Tracked(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        self._submit(("add", request_id, prompt, params, tracked))
        done = False
        try:
            while not done:
                item = await tracked.outputs.get()
                done = not isinstance(item, RequestOutput) or item.finished
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight end with an error."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    # --- the engine thread ------------------------------------------------------------------------
    def _submit(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before draining, so a message that lands after the drain still wakes us
            self._drain()
            if self._stopping:
                break
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                continue
            try:
                self._step()
            except Exception as e:  # the engine's state is unknown: end what is in flight, keep serving
                log.exception("engine step failed; ending the %d requests in flight", len(self._tracked))
                message = f"the engine failed: {e}"  # `e` is unbound once the except block ends
                self._fail_all(lambda: RuntimeError(message))
        self._fail_all(lambda: LowbitError("the engine was shut down"))

    def _drain(self) -> None:
        while True:
            try:
                kind, request_id, *rest = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "abort":
                self.engine.abort_request(request_id)
                self._tracked.pop(request_id, None)
                continue
            prompt, params, tracked = rest
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as e:  # a bad request fails alone
                _deliver(tracked, e)
            else:
                self._tracked[request_id] = tracked
        self._snapshot()

    def _step(self) -> None:
        outs = self.engine.step()
        now, stats = time.monotonic(), StepStats()
        tracked = {out.request_id: self._tracked[out.request_id] for out in outs}
        for out in outs:
            t = tracked[out.request_id]
            num_tokens = sum(len(o.token_ids) for o in out.outputs)
            if t.first_token is None:
                t.first_token = now
                stats.prompt_tokens += len(out.prompt_token_ids)
                stats.ttft.append(now - t.arrival)
            stats.generation_tokens += num_tokens - t.num_tokens
            t.num_tokens = num_tokens
            if out.finished:
                del self._tracked[out.request_id]
                longest = max(len(o.token_ids) for o in out.outputs)
                if longest > 1:
                    stats.tpot.append((now - t.first_token) / (longest - 1))
                stats.e2e.append(now - t.arrival)
        self._snapshot()
        for listener in self._listeners:  # before the outputs go out, so a client never sees stale metrics
            try:
                listener(stats)
            except Exception:  # metrics must not end requests
                log.exception("stats listener failed")
        for out in outs:
            _deliver(tracked[out.request_id], out)

    def _snapshot(self) -> None:
        sched = self.engine.scheduler
        running = {s.request_id for s in sched.running}
        self.num_running = len(running)
        self.num_waiting = len({s.request_id for s in sched.waiting} - running)
        self.kv_cache_usage = self.engine.blocks.usage()

    def _fail_all(self, error: Callable[[], Exception]) -> None:
        for request_id, tracked in self._tracked.items():
            self.engine.abort_request(request_id)
            _deliver(tracked, error())
        self._tracked.clear()
        self._snapshot()


def _deliver(tracked: _Tracked, item: RequestOutput | Exception) -> None:
    try:
        tracked.loop.call_soon_threadsafe(tracked.outputs.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
        pass
