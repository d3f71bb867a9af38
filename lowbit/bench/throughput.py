"""Offline throughput (vLLM's `benchmark_throughput`): N requests of random token ids through the
engine at once; reports requests/s, output tokens/s and total tokens/s."""
from __future__ import annotations

import random
import time

from lowbit.errors import LowbitError


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs; lengths are fixed, or uniform in
    [len * (1 - range_ratio), len * (1 + range_ratio)] (vLLM's random dataset)."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise LowbitError("--num-prompts, --input-len and --output-len must be >= 1")
    if not 0 <= range_ratio < 1:
        raise LowbitError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(max(1, round(mean * (1 - range_ratio))), round(mean * (1 + range_ratio)))

    return [([rng.randrange(vocab_size) for _ in range(length(input_len))], length(output_len)) for _ in range(num)]


def run(llm, requests: list[tuple[list[int], int]], ignore_eos: bool = True, time_limit_s: float | None = None,
        desc: str = "generating") -> dict:
    """Generate every request (sampling at temperature 1, as vLLM does) and time the whole batch.

    With `time_limit_s`, requests still running when it has passed are aborted and the result counts
    what was generated until then (`capped`; `num_requests` then counts the finished requests)."""
    from tqdm.auto import tqdm

    from lowbit.sampling_params import SamplingParams

    engine = llm.engine
    sched = engine.scheduler
    before = (sched.num_steps, sched.num_scheduled_tokens, sched.num_preemptions)
    longest = max(len(p) + n for p, n in requests)
    if longest > engine.cfg.max_model_len:
        raise LowbitError(f"a request needs {longest} tokens, more than max_model_len "
                          f"{engine.cfg.max_model_len}: lower --input-len/--output-len or raise --max-model-len")
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=ignore_eos), stream=False)
           for p, n in requests]
    done = []  # finished outputs
    prompt_tokens = output_tokens = 0  # of requests cut off by the time limit
    capped = False
    with tqdm(total=len(ids), desc=desc) as bar:
        while engine.has_unfinished_requests():
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                capped = True
                for rid in ids:
                    req = engine.requests.get(rid)
                    if req is not None and any(s.output_token_ids for s in req.seqs):
                        prompt_tokens += len(req.prompt_ids)
                        output_tokens += sum(len(s.output_token_ids) for s in req.seqs)
                    engine.abort_request(rid)
                break
            outs = engine.step()
            done += outs
            bar.update(len(outs))
    elapsed = time.perf_counter() - start
    steps, computed, preemptions = (now - then for now, then in zip(
        (sched.num_steps, sched.num_scheduled_tokens, sched.num_preemptions), before))
    # how the run used the engine: steps, tokens computed (a preempted request's are computed again) and
    # preemptions, next to the counts a figure is made of
    return dict(summary(elapsed, num_requests=len(done),
                        prompt_tokens=prompt_tokens + sum(len(o.prompt_token_ids) for o in done),
                        output_tokens=output_tokens + sum(len(c.token_ids) for o in done for c in o.outputs),
                        capped=capped),
                steps=steps, computed_tokens=computed, preemptions=preemptions)


def summary(elapsed: float, num_requests: int, prompt_tokens: int, output_tokens: int, capped: bool) -> dict:
    """vLLM's throughput metrics (prompt tokens count once their request has produced a token)."""
    total = prompt_tokens + output_tokens
    return {"elapsed_time": elapsed, "num_requests": num_requests, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "total_num_tokens": total, "capped": capped,
            "requests_per_second": num_requests / elapsed, "output_tokens_per_second": output_tokens / elapsed,
            "tokens_per_second": total / elapsed}


def report(result: dict) -> str:
    return (f"Throughput: {result['requests_per_second']:.2f} requests/s, "
            f"{result['tokens_per_second']:.2f} total tokens/s, "
            f"{result['output_tokens_per_second']:.2f} output tokens/s")
