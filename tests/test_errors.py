"""Bad inputs end in one clear line (CLI exit code 2), never a traceback, never a half-written file."""
import json
import shutil
import subprocess
import sys

import pytest

from lowbit import LLM, SamplingParams
from lowbit.cli import main
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.models.loader import load_model


def cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what fixtures printed
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and "\n" not in err and "Traceback" not in err
    return err


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_nonexistent_path(capsys, tmp_path):
    assert "no such file" in cli_error(capsys, "generate", "--model", str(tmp_path / "nope"), "hi")


def test_directory_without_config(capsys, tmp_path):
    assert "config.json" in cli_error(capsys, "generate", "--model", str(tmp_path), "hi")


def test_truncated_safetensors(capsys, tmp_path, tiny_dir):
    d = copy_model(tiny_dir("llama2"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = sorted(p.name for p in d.iterdir())
    err = cli_error(capsys, "generate", "--model", str(d), "hi")
    assert "model.safetensors" in err and "truncated" in err
    assert sorted(p.name for p in d.iterdir()) == before


def test_unsupported_architecture(capsys, tmp_path, tiny_dir):
    d = copy_model(tiny_dir("llama2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture 'gpt_neox'" in cli_error(capsys, "generate", "--model", str(d), "hi")


def test_shape_mismatch(tmp_path, tiny_dir):
    d = copy_model(tiny_dir("llama2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="mlp.*has shape"):
        load_model(d)


def test_empty_prompt(capsys, tiny_dir):
    assert "empty prompt" in cli_error(capsys, "generate", "--model", str(tiny_dir("llama2")), "")
    llm = LLM(model=str(tiny_dir("llama2")), device="cpu")
    with pytest.raises(LowbitError, match="empty"):
        llm.generate([""], SamplingParams())


@pytest.mark.parametrize("flag,value,msg", [("--max-tokens", "0", "max_tokens"), ("--max-tokens", "-5", "max_tokens"),
                                            ("--temperature", "-1", "temperature")])
def test_bad_sampling_flags(capsys, flag, value, msg):
    assert msg in cli_error(capsys, "generate", flag, value, "hi")


def test_config_parsing_of_transformers_4_spelling():
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, rope_theta=5e5, rope_scaling=dict(type="llama3", factor=8.0,
        original_max_position_embeddings=8192)))
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.num_kv_heads == 2
    with pytest.raises(LowbitError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2, rope_scaling=dict(rope_type="yarn")))


@pytest.mark.slow
def test_readme_chat_answer_names_paris():
    out = subprocess.run([sys.executable, "-m", "lowbit", "generate", "--chat", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
