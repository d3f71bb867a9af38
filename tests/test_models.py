"""Logits and greedy generations against Hugging Face transformers (fp32, CPU)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from lowbit import LLM, SamplingParams
from lowbit.models.loader import load_model


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens from a transformers model, end-of-sequence ignored (plain argmax loop)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tiny_dir):
    path = tiny_dir(family)
    ours, _, cfg = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 150))  # past 64 tokens: exercises llama3 rope scaling
    with torch.no_grad():
        want = ref(ids).logits
    assert rel_err(ours.logits_for_batch(ids), want) < 1e-4


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "smollm2"])
def test_greedy_generation_matches_transformers(family, tiny_dir):
    path = tiny_dir(family)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 49152, (1, 11))
    want = hf_greedy(ref, prompt, 32)
    llm = LLM(model=str(path), device="cpu", block_size=4)  # small blocks: generation crosses many of them
    got = llm.generate([prompt[0].tolist()], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want


@pytest.mark.slow
def test_default_model_matches_transformers():
    from lowbit.models.default import default_model_path

    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(device="cpu")
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name three colors of the rainbow."}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert rel_err(llm.model.logits_for_batch(ids), ref(ids).logits) < 1e-4
    want = hf_greedy(ref, ids, 32)
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want
