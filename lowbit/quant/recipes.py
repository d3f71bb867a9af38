"""Named quantization recipes: what each tensor role becomes and which calibrated algorithms get it there.

A recipe is plain data (JSON round-trip), so users can compose their own: start from a named one,
change fields, save it, pass the file with `--recipe FILE.json`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.quant.formats import QuantSpec

METHODS = ("rtn", "gptq")
SMOOTHING = (None, "smoothquant", "awq")


@dataclass(frozen=True)
class KVSpec:
    """KV-cache format: asymmetric int per (token, head) (optionally grouped in the head) or fp8."""

    bits: int = 8
    group_size: int | None = None
    fp8: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8) or (self.fp8 and self.bits != 8):
            raise LowbitError(f"invalid KV spec: bits {self.bits}{' with fp8' if self.fp8 else ''}")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    weight: QuantSpec | None = None  # None: weights stay in the model dtype
    activation: QuantSpec | None = None  # dynamic, per token / per group of a token
    kv: KVSpec | None = None
    method: str = "rtn"  # how weights are rounded: "rtn" (with clip search) or "gptq"
    clip_search: bool = False  # search each group's clipping ratio (RTN: output MSE; GPTQ: weight MSE at fit)
    clip_by_output: bool = False  # GPTQ: the clip search minimizes the group's output error under the Hessian
    act_order: bool = True  # GPTQ: visit columns by decreasing Hessian diagonal (static groups)
    damp: float = 0.01  # GPTQ: added to the Hessian's diagonal, as a share of its mean
    smoothing: str | None = None  # "smoothquant" (alpha) or "awq" (searched scales)
    alpha: float = 0.5
    progressive: bool = False  # QServe: int8 per channel, then uint4 groups with integer scales
    smooth_attention: bool = False  # QServe: migrate key outliers into the query (RoPE-aware)
    rotate: bool = False  # QuaRot: Hadamard on the residual stream + online Hadamard before down_proj
    rotate_kv: bool = False  # Hadamard over head_dim on q and k after RoPE (keys quantize better)
    outliers: int = 0  # Atom: the k input channels kept in int8 (per channel / per token)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowbitError(f"recipe {self.name}: method must be one of {', '.join(METHODS)}")
        if self.smoothing not in SMOOTHING:
            raise LowbitError(f"recipe {self.name}: smoothing must be smoothquant, awq or none")
        if self.weight is None and (self.activation is not None or self.calibrated):
            raise LowbitError(f"recipe {self.name}: activation quantization and calibrated methods need quantized weights")
        if self.outliers < 0:
            raise LowbitError(f"recipe {self.name}: outliers must be >= 0")
        if self.progressive and (self.weight is None or self.weight.bits != 4 or self.weight.granularity != "group"):
            raise LowbitError(f"recipe {self.name}: progressive needs 4-bit group weights")
        if self.clip_by_output and not (self.clip_search and self.method == "gptq"):
            raise LowbitError(f"recipe {self.name}: clip_by_output is GPTQ's clip search (method gptq, clip_search)")
        if self.progressive and self.method != "rtn":
            raise LowbitError(f"recipe {self.name}: progressive weights are rounded to nearest (method rtn)")

    @property
    def calibrated(self) -> bool:
        return bool(self.method == "gptq" or self.clip_search or self.smoothing or self.smooth_attention
                    or self.rotate or self.outliers)

    @property
    def bits_label(self) -> str:
        w = self.weight.bits if self.weight else 16
        a = self.activation.bits if self.activation else 16
        kv = f"kv{self.kv.bits}" if self.kv else ""
        return f"w{w}a{a}{kv}"

    def rtn_baseline(self) -> "Recipe":
        """The same storage formats (bit widths, QServe's progressive weights) with plain
        round-to-nearest and none of the calibrated algorithms (Atom's int8 outlier channels go too:
        every channel in the main format)."""
        return Recipe(name=f"rtn-{self.name}", description=f"plain RTN in the formats of {self.name}",
                      weight=self.weight, activation=self.activation, kv=self.kv, progressive=self.progressive)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key, cls in (("weight", QuantSpec), ("activation", QuantSpec)):
            d[key] = None if getattr(self, key) is None else getattr(self, key).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "name" not in d:
            raise LowbitError("a recipe is a JSON object with at least a name")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LowbitError(f"recipe {d['name']}: unknown field(s) {', '.join(unknown)}")
        d = dict(d)
        for key in ("weight", "activation"):
            if d.get(key) is not None:
                d[key] = QuantSpec.from_dict(d[key])
        if d.get("kv") is not None:
            d["kv"] = KVSpec(**d["kv"])
        return cls(**d)


def _w(bits, granularity="group", symmetric=True, clip=1.0, dtype="int"):
    return QuantSpec(bits=bits, dtype=dtype, symmetric=symmetric, granularity=granularity, clip=clip)


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16", "no quantization: the model in its own precision"),
    Recipe("w8a8", "SmoothQuant (alpha 0.5) + GPTQ: int8 per-channel weights, int8 per-token activations",
           weight=_w(8, "channel"), activation=_w(8, "channel"), smoothing="smoothquant", alpha=0.5, method="gptq"),
    Recipe("fp8", "fp8 e4m3 per-channel weights and per-token activations",
           weight=_w(8, "channel", dtype="fp8"), activation=_w(8, "channel", dtype="fp8")),
    Recipe("w4a16", "AWQ: activation-aware scales, int4 g128 asymmetric weights rounded to nearest with clip "
           "search, 16-bit activations", weight=_w(4, symmetric=False), smoothing="awq", clip_search=True),
    Recipe("w4a8kv4", "QServe QoQ: progressive g128 weights (AWQ scales, clip search), int8 per-token "
           "activations, SmoothAttention, 4-bit KV cache",
           weight=_w(4, symmetric=False), activation=_w(8, "channel"), kv=KVSpec(4), progressive=True,
           smoothing="awq", smooth_attention=True, clip_search=True),
    Recipe("w4a4kv4", "Atom: 128 int8 outlier channels, int4 g128 weights (GPTQ, clip 0.85) and "
           "activations (clip 0.9), 4-bit KV cache",
           weight=_w(4, clip=0.85), activation=_w(4, clip=0.9), kv=KVSpec(4), method="gptq", outliers=128),
    Recipe("w4a4kv4-rot", "QuaRot-128G: Hadamard-rotated residual stream and down_proj input, GPTQ int4 "
           "g128 weights, int4 g128 activations (clip 0.9), 4-bit KV cache with rotated keys",
           weight=_w(4), activation=_w(4, clip=0.9), kv=KVSpec(4), method="gptq", rotate=True, rotate_kv=True),
]}


def get_recipe(name_or_path: str) -> Recipe:
    """A named recipe, `rtn-<name>` for its plain-RTN baseline, or a JSON file."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    if name_or_path.startswith("rtn-") and name_or_path[4:] in RECIPES:
        return RECIPES[name_or_path[4:]].rtn_baseline()
    path = Path(name_or_path)
    if path.suffix == ".json":
        try:
            return Recipe.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"{path}: cannot read recipe: {e}") from None
        except TypeError as e:
            raise LowbitError(f"{path}: invalid recipe: {e}") from None
    raise LowbitError(f"unknown recipe {name_or_path!r} (known: {', '.join(RECIPES)}, rtn-<name>, or a .json file)")
