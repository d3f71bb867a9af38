"""Asynchronous scheduling (step n+1 launched before step n's tokens are read back) gives exactly the
outputs of the synchronous loop: tokens, text, finish reasons and logprobs, under stops, sampling,
preemption, repetition penalty and aborts."""
import random

import pytest

from lowbit import LLM, SamplingParams

from test_engine import staggered_outputs


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(1, 30))] for _ in range(10)]


def _run(tiny_dir, prompts, params, async_scheduling, abort=None, **kw):
    """Requests arriving two per step; `abort` (an index) is aborted after the third step."""
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", async_scheduling=async_scheduling, block_size=4, **kw)
    eng = llm.engine
    patches, make_patch = [], eng.runner._patch
    eng.runner._patch = lambda batch, hb: patches.append(make_patch(batch, hb)) or patches[-1]

    def after_step(engine, steps):
        if abort is not None and steps == 3:
            engine.abort_request(str(abort))

    done = staggered_outputs(llm, prompts, params, per_step=2, after_step=after_step)
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.scheduler.running
    # inputs taken from the device draws, except where the repetition penalty reads the tokens first
    assert any(p is not None for p in patches) == (async_scheduling and params.repetition_penalty == 1.0)
    return {i: [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in out.outputs] for i, out in done.items()}, llm


def _logprob_values(outputs: dict) -> list[float]:
    return [v for outs in outputs.values() for *_, lps in outs for lp in lps or ()
            for v in (lp.logprob, *(p for _, p in lp.top))]


def _same(tiny_dir, prompts, params, **kw):
    """Tokens, text, finish reasons and the logprobs' token ids exactly; the logprob values within
    1e-5: a step of the asynchronous loop can hold sequences the synchronous one had already
    finished, and the CPU's BLAS rounds a row of a GEMM differently as the row count changes."""
    sync, _ = _run(tiny_dir, prompts, params, False, **kw)
    fast, llm = _run(tiny_dir, prompts, params, True, **kw)

    def exact(outputs):
        return {i: [(t, text, fin, [(lp.token_id, [tok for tok, _ in lp.top]) for lp in lps or ()])
                    for t, text, fin, lps in outs] for i, outs in outputs.items()}
    assert exact(fast) == exact(sync)
    assert _logprob_values(fast) == pytest.approx(_logprob_values(sync), abs=1e-5)
    return sync


def test_greedy_with_stop_tokens_and_logprobs(tiny_dir, prompts):
    plain = _same(tiny_dir, prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2))
    stop_ids = [outs[0][0][2] for outs in plain.values()][:3]  # tokens the outputs do produce
    done = _same(tiny_dir, prompts, SamplingParams(temperature=0, max_tokens=9, stop_token_ids=stop_ids, logprobs=2))
    assert any(outs[0][2] == "stop" for outs in done.values())  # some stopped early: their extra token dropped


def test_stop_strings_and_seeded_samples(tiny_dir, prompts):
    plain = _same(tiny_dir, prompts, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))
    text = next(outs[0][1] for outs in plain.values() if len(outs[0][1]) > 4)
    done = _same(tiny_dir, prompts, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                                   stop=[text[2:4]]))
    assert any(o[2] == "stop" for outs in done.values() for o in outs)


def test_preemption_and_repetition_penalty(tiny_dir, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    _same(tiny_dir, prompts, params, num_kv_blocks=20, max_model_len=48)
    _, llm = _run(tiny_dir, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), True,
                  num_kv_blocks=20, max_model_len=48)
    assert llm.engine.scheduler.num_preemptions > 0


def test_abort_with_a_step_in_flight(tiny_dir, prompts):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sync, _ = _run(tiny_dir, prompts, params, False, abort=1)
    fast, _ = _run(tiny_dir, prompts, params, True, abort=1)
    assert 1 not in fast and fast == sync


def test_streamed_outputs_finish_only_with_their_last_token(tiny_dir, prompts):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu")
    eng, seen = llm.engine, {}
    for i, p in enumerate(prompts[:4]):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True), request_id=str(i))
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.setdefault(int(out.request_id), []).append((len(out.outputs[0].token_ids), out.outputs[0].finish_reason))
    for i, outs in seen.items():
        assert outs == [(n, None) for n in range(1, 3 + i)] + [(3 + i, "length")]
