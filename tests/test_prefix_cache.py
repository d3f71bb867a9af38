"""Prefix caching: reused full blocks leave greedy tokens unchanged and are never written."""
import random

import pytest
from test_engine import GREEDY, run_staggered

from lowbit import LLM

BS = 4
PREFIX = [7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]  # 3 full blocks of BS tokens


def make_llm(tiny_dir, **kw):
    """An engine whose runner asserts that every written slot lies in a block its sequence owns alone."""
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", block_size=BS, **kw)
    eng, launch = llm.engine, llm.engine.runner.launch

    def checked_launch(batch):
        for item in batch:
            start = item.seq.num_computed_tokens
            for pos in range(start, start + item.num_tokens):
                assert eng.blocks.ref[item.seq.block_table[pos // BS]] == 1
        return launch(batch)

    eng.runner.launch = checked_launch
    return llm


@pytest.fixture(scope="module")
def alone(tiny_dir):
    """prompt -> greedy tokens when it runs by itself with caching off."""
    llm = LLM(model=str(tiny_dir("llama3")), device="cpu", enable_prefix_caching=False)
    return lambda p: llm.generate([p], GREEDY)[0].outputs[0].token_ids


def test_shared_prefix_after_the_first_finished(tiny_dir, alone):
    a, b = PREFIX + [101, 102], PREFIX + [103]
    llm = make_llm(tiny_dir)
    assert [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in (a, b)] == [alone(a), alone(b)]
    assert llm.engine.scheduler.num_cached_tokens == len(PREFIX)


def test_shared_prefix_while_the_first_runs(tiny_dir, alone):
    a, b = PREFIX + [101, 102], PREFIX + [103]
    llm = make_llm(tiny_dir)
    eng, done = llm.engine, {}
    eng.add_request(a, GREEDY, request_id="a")
    eng.step()  # a's prefill: its full blocks are published at the next schedule
    eng.add_request(b, GREEDY, request_id="b")
    while eng.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
    assert done == {"a": alone(a), "b": alone(b)}
    assert eng.scheduler.num_cached_tokens == len(PREFIX)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_caching_off_publishes_nothing(tiny_dir):
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    llm.generate([PREFIX + [101], PREFIX + [102]], GREEDY)
    assert llm.engine.scheduler.num_cached_tokens == 0 and not llm.engine.blocks.cached


def test_block_aligned_prompt_still_computes_its_last_token(tiny_dir, alone):
    llm = make_llm(tiny_dir)
    llm.generate([PREFIX], GREEDY)
    eng, first = llm.engine, []
    launch = eng.runner.launch

    def record(batch):
        first.extend((b.seq.num_computed_tokens, b.num_tokens) for b in batch)
        return launch(batch)

    eng.runner.launch = record
    assert llm.generate([PREFIX], GREEDY)[0].outputs[0].token_ids == alone(PREFIX)
    assert first[0] == (len(PREFIX) - BS, BS)  # the last block is recomputed, not reused
    assert eng.scheduler.num_cached_tokens == len(PREFIX) - BS


def test_eviction_under_a_tiny_cache(tiny_dir, alone):
    # 8 blocks of 4: each 16-token prompt plus 12 generated tokens takes 7 of them
    llm = make_llm(tiny_dir, num_kv_blocks=8, max_model_len=32)
    a, b = PREFIX + [1, 2, 3, 4], list(range(200, 216))
    for p in (a, b):
        assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == alone(p)
    assert llm.engine.scheduler.num_cached_tokens == 0
    # b evicted a's cached blocks tail first, so only a's head block is left to reuse
    assert llm.generate([a], GREEDY)[0].outputs[0].token_ids == alone(a)
    assert llm.engine.scheduler.num_cached_tokens == BS
    assert llm.engine.blocks.num_free == 8


def test_preemption_with_shared_prefixes(tiny_dir, alone):
    rng = random.Random(1)

    def tokens(lo):
        return [rng.randrange(3, 49152) for _ in range(rng.randrange(lo, 20))]

    heads = [tokens(4) for _ in range(3)]
    prompts = [rng.choice(heads) + tokens(1) for _ in range(16)]
    llm = make_llm(tiny_dir, num_kv_blocks=24, max_model_len=64)
    assert run_staggered(llm, prompts) == [alone(p) for p in prompts]
    sched = llm.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_cached_tokens > 0
    assert llm.engine.blocks.num_free == 24
