"""Quantized checkpoints: a directory with config.json, tokenizer files, model.safetensors (packed
codes, scales, zeros, permutations, and the unquantized tensors) and quant_config.json.

Writes go to a temporary sibling directory that is renamed into place at the end, so an
interrupted or failing save never leaves a half-written checkpoint under the target name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.quant.formats import QTensor, QuantSpec
from lowbit.quant.linear_method import QuantLinearMethod, install
from lowbit.quant.progressive import ProgressiveWeight
from lowbit.quant.recipes import KVSpec, Recipe

FORMAT_VERSION = 1
QUANT_CONFIG = "quant_config.json"


def is_quantized_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / QUANT_CONFIG).is_file()


def _linear_entries(model, prefix_state: dict) -> dict:
    """Tensors and metadata of every quantized linear; fills `prefix_state` with its tensors."""
    layers = {}
    for name, mod in model.named_modules():
        method = getattr(mod, "quant_method", None)
        if method is None:
            continue
        if method.weight is None:
            raise LowbitError(f"{name}: the model holds only its kernels' weight layout (loaded to serve); "
                              "save a checkpoint from the quantizer's model")
        entry = {"activation": None if method.activation is None else method.activation.to_dict(),
                 "act_outliers": method.act_outliers, "input_perm": method.input_perm is not None}
        if isinstance(method.weight, ProgressiveWeight):
            pw = method.weight
            entry.update(format="progressive", group_size=pw.group_size, shape=list(pw.shape))
            for field in ("codes4", "s1", "s2", "z2"):
                prefix_state[f"{name}.{field}"] = getattr(pw, field)
        else:
            entry.update(format="segments", segments=[])
            for i, (start, stop, qt) in enumerate(method.weight):
                entry["segments"].append({"start": start, "stop": stop, "spec": qt.spec.to_dict(),
                                          "shape": list(qt.shape)})
                prefix_state[f"{name}.codes.{i}"] = qt.codes
                prefix_state[f"{name}.scale.{i}"] = qt.scale
                if qt.zero is not None:
                    prefix_state[f"{name}.zero.{i}"] = qt.zero
        if method.input_perm is not None:
            prefix_state[f"{name}.input_perm"] = method.input_perm
        layers[name] = entry
    return layers


def save_checkpoint(model, tokenizer, recipe: Recipe, output: str | os.PathLike, force: bool = False) -> Path:
    from safetensors.torch import save_file

    out = Path(output)
    if out.exists() and not force:
        raise LowbitError(f"{out} exists; choose another --output or pass --force to replace it")
    state: dict[str, torch.Tensor] = {}
    layers = _linear_entries(model, state)
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in layers and name.endswith(".weight"):
            continue  # the dequantized copy: the codes above are the checkpoint
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = t
    attn = model.attention_layers()[0]
    qcfg = {"format_version": FORMAT_VERSION, "recipe": recipe.to_dict(), "layers": layers,
            "kv": None if attn.kv_spec is None else dataclasses.asdict(attn.kv_spec), "rotate_kv": attn.rotate_kv,
            "online_hadamard": [n for n, m in model.named_modules() if getattr(m, "online_hadamard", False)]}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().clone() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        (tmp / QUANT_CONFIG).write_text(json.dumps(qcfg, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        raise LowbitError(f"cannot write checkpoint {out}: {e.strerror or e}; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_quant_config(path: Path) -> dict:
    try:
        qcfg = json.loads((path / QUANT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path / QUANT_CONFIG}: cannot read: {e}") from None
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise LowbitError(f"{path / QUANT_CONFIG}: format version {qcfg.get('format_version')!r}, "
                          f"this lowbit reads {FORMAT_VERSION}")
    return qcfg


def split_quantized_state(qcfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the quantized linears' tensors from `state`; return them keyed as saved."""
    quantized = {}
    for name in qcfg["layers"]:
        for key in [k for k in state if k.startswith(name + ".") and not k.endswith(".bias")]:
            quantized[key] = state.pop(key)
    return quantized


def install_quantized(model, qcfg: dict, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Rebuild every quantized linear's method from the saved codes and install it."""
    def get(key):
        if key not in tensors:
            raise LowbitError(f"{source}: missing tensor {key}")
        return tensors[key]

    device = next(model.parameters()).device
    for name, e in qcfg["layers"].items():
        lin = model.get_submodule(name)
        if e["format"] == "progressive":
            weight = ProgressiveWeight(get(f"{name}.codes4"), get(f"{name}.s1"), get(f"{name}.s2"),
                                       get(f"{name}.z2"), e["group_size"], tuple(e["shape"]))
        else:
            weight = [(s["start"], s["stop"], QTensor(get(f"{name}.codes.{i}"), get(f"{name}.scale.{i}"),
                                                       tensors.get(f"{name}.zero.{i}"), QuantSpec.from_dict(s["spec"]),
                                                       tuple(s["shape"])))
                      for i, s in enumerate(e["segments"])]
        act = None if e["activation"] is None else QuantSpec.from_dict(e["activation"])
        perm = get(f"{name}.input_perm").to(device) if e["input_perm"] else None
        install(lin, QuantLinearMethod(weight, act, e["act_outliers"], perm), keep_codes=False)
    for name in qcfg["online_hadamard"]:
        model.get_submodule(name).online_hadamard = True
    kv = None if qcfg["kv"] is None else KVSpec(**qcfg["kv"])
    for attn in model.attention_layers():
        attn.kv_spec, attn.rotate_kv = kv, qcfg["rotate_kv"]
