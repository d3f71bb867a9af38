"""Sampler rules on hand-made distributions, and the engine's stop conditions."""
import math

import pytest
import torch

from lowbit import LLM, SamplingParams
from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError
from lowbit.layers.sampler import draw

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def seqs_for(params, n=1, history=(0,)):
    return [Sequence(str(i), 0, list(history), params, seed=params.seed) for i in range(n)]


def frequencies(params, draws=4000, history=(0,)):
    logits = PROBS.log().repeat(draws, 1)
    seqs = [Sequence(str(i), 0, list(history), params, seed=i) for i in range(draws)]
    tokens, _ = draw(logits, seqs).host()
    return torch.bincount(torch.tensor(tokens), minlength=4).double() / draws


def close(freq, want, tol=0.03):
    return torch.allclose(freq, torch.tensor(want, dtype=torch.float64), atol=tol)


def test_plain_sampling_follows_the_distribution():
    assert close(frequencies(SamplingParams(temperature=1.0)), PROBS.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert close(frequencies(SamplingParams(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0, 0])


def test_top_k():
    assert close(frequencies(SamplingParams(temperature=1.0, top_k=3)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])


def test_min_p():
    # min_p 0.4 keeps tokens with p >= 0.2: only the first two
    assert close(frequencies(SamplingParams(temperature=1.0, min_p=0.4)), [0.625, 0.375, 0, 0])


def test_temperature_sharpens():
    p = PROBS.pow(2)
    assert close(frequencies(SamplingParams(temperature=0.5)), (p / p.sum()).tolist())


def test_repetition_penalty_matches_the_hf_rule():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.5]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=4)
    tokens, lps = draw(logits, seqs_for(params, history=[0, 3])).host()
    assert tokens == [1]  # token 0's 2.0 became 1.0
    want = torch.tensor([1.0, 1.9, -1.0, -3.0]).log_softmax(-1)
    assert lps[0].top[0][0] == 1 and math.isclose(lps[0].logprob, want[1].item(), rel_tol=1e-6)


def test_logprobs_are_log_softmax():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=0, logprobs=5)
    tokens, lps = draw(logits, seqs_for(params, 3)).host()
    ref = logits.double().log_softmax(-1)
    for i in range(3):
        assert tokens[i] == int(logits[i].argmax())
        top_v, top_i = ref[i].topk(5)
        assert [t for t, _ in lps[i].top] == top_i.tolist()
        assert all(math.isclose(v, r, abs_tol=1e-5) for (_, v), r in zip(lps[i].top, top_v.tolist()))


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(max_tokens=0), dict(max_tokens=-3), dict(top_p=0), dict(top_p=1.5),
    dict(n=0), dict(top_k=-2), dict(min_p=2), dict(repetition_penalty=0), dict(stop=[""]),
])
def test_bad_params_are_refused(bad):
    with pytest.raises(LowbitError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(model=str(tiny_dir("smollm2")), device="cpu")


def test_max_tokens_and_stop_token_ids(llm):
    free = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                      stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    free = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    assert stop.strip(), free.text
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                      stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(stop)]


def test_sampling_in_row_chunks_equals_one_pass(monkeypatch):
    """`sample` draws SAMPLE_ROWS rows at a time; the tokens and logprobs are those of one pass
    over the whole batch (seeded rows draw their own noise; a chunk where nobody asks logprobs
    still reports the batch's width)."""
    import lowbit.layers.sampler as sampler
    monkeypatch.setattr(sampler, "SAMPLE_ROWS", 3)
    logits = torch.randn(10, 40)
    hidden = torch.arange(10.0)[:, None]  # each row's index: its logits do not depend on the chunk (a matmul's may)
    kinds = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0.8, top_p=0.9, seed=5),
             SamplingParams(temperature=1.0, top_k=7, seed=9), SamplingParams(temperature=0)]

    def batch():
        rows = [0, 1, 2, 3, 1, 2, 3, 3, 3, 2]  # rows 3-8 (the second and third chunks) ask no logprobs
        return [Sequence(str(i), 0, [0], kinds[k], seed=kinds[k].seed) for i, k in enumerate(rows)]

    want_tokens, want_lps = draw(logits, batch()).host()
    got_tokens, got_lps = sampler.sample(hidden, lambda h: logits[h[:, 0].long()], batch()).host()
    assert got_tokens == want_tokens
    assert [lp is None for lp in got_lps] == [lp is None for lp in want_lps] == [False] + [True] * 9
    assert got_lps[0].top == want_lps[0].top and got_lps[0].logprob == want_lps[0].logprob


def test_a_seeded_draw_depends_on_its_position_only():
    """No generator state: drawing a sequence's token again at the same position (a preemption's
    recompute) gives the same token; the next position draws fresh noise; unseeded sequences differ."""
    logits = torch.randn(1, 1000)
    params = SamplingParams(temperature=1.0, seed=11)
    seq = Sequence("a", 0, [0, 1, 2], params, seed=11)
    first = [draw(logits, [seq]).host()[0][0] for _ in range(3)]
    assert first == [first[0]] * 3
    later = []
    for t in range(20):
        seq.token_ids.append(t)
        later.append(draw(logits, [seq]).host()[0][0])
    assert len(set(later)) > 10  # fresh noise at each position (1000 near-uniform choices)
    other = [draw(logits, [Sequence(str(i), 0, [0, 1, 2], SamplingParams(temperature=1.0))]).host()[0][0]
             for i in range(20)]
    assert len(set(other)) > 10
