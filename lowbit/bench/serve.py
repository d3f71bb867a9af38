"""Serving benchmark (vLLM's `benchmark_serving`): streams completions of random token ids from a
running server, arriving at a request rate (Poisson) or under a concurrency cap, and measures
TTFT, TPOT, ITL and end-to-end latency (mean / median / p99) and throughput."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first streamed choice
    itl: list[float] = field(default_factory=list)  # gaps between later streamed choices
    latency: float = 0.0
    error: str = ""


async def _request(client: httpx.AsyncClient, endpoint: str, model: str, prompt: list[int], max_tokens: int,
                   ignore_eos: bool) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    res = RequestResult(len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if res.ttft:
                        res.itl.append(now - last)
                    else:
                        res.ttft = now - start
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or len(res.itl) + 1  # servers that send no usage: one token a chunk
    res.ok = True
    return res


async def _served_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise LowbitError(f"GET /v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]["id"]


async def benchmark(base_url: str, requests: list[tuple[list[int], int]], model: str | None = None,
                    endpoint: str = "/v1/completions", api_key: str | None = None,
                    request_rate: float = math.inf, max_concurrency: int | None = None, ignore_eos: bool = True,
                    seed: int = 0, disable_tqdm: bool = False) -> dict:
    """Send every request, starting them at `request_rate` per second (Poisson; inf: all at once),
    at most `max_concurrency` in flight; returns the summary (see `summarize`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=None)
    rng = random.Random(seed)
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
            model = model or await _served_model(client)
            gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
            bar = tqdm(total=len(requests), desc="requests", disable=disable_tqdm)

            async def one(prompt: list[int], max_tokens: int) -> RequestResult:
                async with gate:
                    res = await _request(client, endpoint, model, prompt, max_tokens, ignore_eos)
                bar.update(1)
                return res

            start, tasks = time.perf_counter(), []
            for prompt, max_tokens in requests:
                tasks.append(asyncio.create_task(one(prompt, max_tokens)))
                if math.isfinite(request_rate):
                    await asyncio.sleep(rng.expovariate(request_rate))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
            bar.close()
    except httpx.ConnectError as e:
        raise LowbitError(f"cannot reach {base_url}: {e} (is `lowbit serve` running?)") from None
    config = {"base_url": base_url, "model": model, "request_rate": request_rate, "max_concurrency": max_concurrency}
    return {**config, **summarize(results, duration)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM's names: throughputs per second, latencies in ms (TPOT excludes the first token)."""
    ok = [r for r in results if r.ok]
    inputs, outputs = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": inputs, "total_output_tokens": outputs,
           "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
           "total_token_throughput": (inputs + outputs) / duration}
    series = {"ttft": [r.ttft for r in ok],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [gap for r in ok for gap in r.itl],
              "e2el": [r.latency for r in ok]}
    for name, values in series.items():
        ms = np.asarray(values or [0.0]) * 1000
        out |= {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                f"p99_{name}_ms": float(np.percentile(ms, 99))}
    out["errors"] = sorted({r.error for r in results if not r.ok})
    return out


def report(result: dict) -> str:
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Benchmark duration (s)", result["duration"]), ("Total input tokens", result["total_input_tokens"]),
            ("Total generated tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["request_throughput"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total token throughput (tok/s)", result["total_token_throughput"])]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f"-- {title}", None))
        rows += [(f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms)", result[f"{stat}_{name}_ms"])
                 for stat in ("mean", "median", "p99")]
    lines = [f"{k:<40}{'' if v is None else (f'{v:.2f}' if isinstance(v, float) else v)}" for k, v in rows]
    lines += [f"error: {e}" for e in result["errors"]]
    return "\n".join(lines)
