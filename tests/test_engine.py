"""The paged engine: batching, arrival order, chunked prefill and preemption leave greedy tokens unchanged."""
import random

import pytest

from lowbit import LLM, SamplingParams
from lowbit.errors import LowbitError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(1, 40))] for _ in range(16)]


@pytest.fixture(scope="module")
def alone(tiny_dir, prompts):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu")
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


def staggered_outputs(llm, prompts, params=GREEDY, per_step=3, after_step=None) -> dict:
    """Add the requests `per_step` at a time between engine steps (`after_step(engine, steps)` after
    each); return each request's final output by prompt index."""
    eng, pending, done, steps = llm.engine, list(enumerate(prompts)), {}, 0
    while pending or eng.has_unfinished_requests():
        for _ in range(per_step):
            if pending:
                i, p = pending.pop(0)
                eng.add_request(p, params, request_id=str(i))
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = out
        steps += 1
        if after_step is not None:
            after_step(eng, steps)
    return done


def run_staggered(llm, prompts, params=GREEDY):
    """The greedy tokens of `staggered_outputs`, in prompt order."""
    done = staggered_outputs(llm, prompts, params)
    return [done[i].outputs[0].token_ids for i in range(len(prompts))]


def test_batch_of_16_arriving_at_different_steps(tiny_dir, prompts, alone):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", block_size=4)
    assert run_staggered(llm, prompts) == alone


def test_chunked_prefill_under_a_small_token_budget(tiny_dir, prompts, alone):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", max_num_batched_tokens=7, block_size=4)
    assert run_staggered(llm, prompts) == alone


def test_forced_preemption(tiny_dir, prompts, alone):
    # 24 blocks of 4 tokens: far fewer than 16 sequences of up to 51 tokens need at once
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", block_size=4, num_kv_blocks=24, max_model_len=64)
    assert run_staggered(llm, prompts) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_free == 24  # every block came back


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_dir, prompts):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    alone = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    batched = llm.generate(prompts[:6], params)[0].outputs[0].token_ids
    assert alone == batched


def test_n_samples_differ_and_are_reproducible(tiny_dir, prompts):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu")
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10, ignore_eos=True)
    a = [o.token_ids for o in llm.generate([prompts[1]], params)[0].outputs]
    b = [o.token_ids for o in llm.generate([prompts[1]], params)[0].outputs]
    assert a == b and len(set(map(tuple, a))) == 3


def test_prompt_longer_than_context_is_refused(tiny_dir):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", max_model_len=32)
    with pytest.raises(LowbitError, match="context"):
        llm.generate([[5] * 40], GREEDY)


def test_generation_stops_at_context_end(tiny_dir):
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", max_model_len=32)
    out = llm.generate([[5] * 20], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_streamed_requests_report_every_step_offline_ones_only_when_done(tiny_dir, prompts):
    eng = LLM(model=str(tiny_dir("llama3")), device="cpu").engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eng.add_request(prompts[0], params, request_id="s")
    eng.add_request(prompts[1], params, request_id="o", stream=False)
    seen = []
    while eng.has_unfinished_requests():
        seen += [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in eng.step()]
    assert [s for s in seen if s[0] == "s"] == [("s", 1, False), ("s", 2, False), ("s", 3, True)]
    assert [s for s in seen if s[0] == "o"] == [("o", 3, True)]
