"""KL divergence and top-1 agreement against the reference model, checked against a float64 computation."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.eval import agreement
from lowbit.eval.agreement import kl_agreement
from lowbit.eval.perplexity import perplexity
from lowbit.models.loader import load_model

CTX = 48


@pytest.fixture(scope="module")
def models(tiny_dir):
    """The tiny model, a copy with its final norm perturbed (logits of another scale), and float64
    transformers twins of both."""
    path = tiny_dir("smollm2")
    model, _, _ = load_model(path)
    ref64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    scale = 1.5 + 0.5 * torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    perturbed, perturbed64 = copy.deepcopy(model), copy.deepcopy(ref64)
    with torch.no_grad():
        perturbed.model.norm.weight.mul_(scale)
        perturbed64.model.norm.weight.mul_(scale.double())
    return model, perturbed, ref64, perturbed64


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 49152, (3 * CTX + 7,), generator=torch.Generator().manual_seed(1))


def test_model_against_itself(models, tokens):
    model = models[0]
    out = kl_agreement(model, model, tokens, ctx=CTX, progress=False)
    assert out["kl_mean"] == 0 and out["kl_p99"] == 0 and out["kl_max"] == 0
    assert out["top1_agreement"] == 1 and out["ppl"] == out["ref_ppl"]
    assert (out["tokens"], out["windows"], out["ctx"]) == (3 * (CTX - 1), 3, CTX)  # the 7-token tail is dropped
    assert out["ppl"] == pytest.approx(perplexity(model, tokens, ctx=CTX, progress=False)["ppl"], rel=1e-6)


@pytest.mark.parametrize("chunk", [256, 5])  # positions per float64 chunk: one, and several per window
def test_perturbed_copy_against_float64_reference(models, tokens, chunk, monkeypatch):
    monkeypatch.setattr(agreement, "POSITIONS_PER_CHUNK", chunk)
    model, perturbed, ref64, perturbed64 = models
    out = kl_agreement(perturbed, model, tokens, ctx=CTX, max_windows=2, batch_size=2, progress=False)
    windows = tokens[: 2 * CTX].view(2, CTX)
    with torch.no_grad():
        ref = torch.log_softmax(ref64(windows).logits[:, :-1], dim=-1)
        logp = torch.log_softmax(perturbed64(windows).logits[:, :-1], dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).flatten()
    target = windows[:, 1:, None]
    assert out["kl_mean"] > 1e-3
    assert out["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert out["kl_p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-4)
    assert out["kl_max"] == pytest.approx(kl.max().item(), rel=1e-4)
    assert out["top1_agreement"] == (ref.argmax(-1) == logp.argmax(-1)).double().mean().item() < 1
    assert out["ppl"] == pytest.approx(torch.exp(-logp.gather(-1, target).mean()).item(), rel=1e-5)
    assert out["ref_ppl"] == pytest.approx(torch.exp(-ref.gather(-1, target).mean()).item(), rel=1e-5)
    assert out["tokens"] == 2 * (CTX - 1) and out["windows"] == 2
