"""`lowbit quantize`: calibrate, quantize and save a checkpoint."""
from __future__ import annotations

import argparse

from lowbit.models.default import DEFAULT_MODEL

RECIPE_HELP = ("bf16, w8a8, fp8, w4a16, w4a8kv4, w4a4kv4, w4a4kv4-rot; rtn-<name> for the same bits with "
               "plain round-to-nearest; or a recipe .json file")


def add_recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--recipe", required=required, default=None, metavar="R", help=RECIPE_HELP)
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text file (default: the shipped WikiText-2 validation split)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default: 128)")
    p.add_argument("--calib-len", type=int, default=2048, metavar="L", help="tokens per window (default: 2048)")


def register(sub) -> dict:
    p = sub.add_parser("quantize", help="quantize a model with a recipe and save a checkpoint",
                       description="Quantize MODEL with a recipe (calibrating on text where the recipe needs it) "
                                   "and write a checkpoint directory that every lowbit command loads.",
                       epilog="example: lowbit quantize --recipe w4a8kv4 --output smollm2-w4a8kv4")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M", help=f"model to quantize (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    add_recipe_args(p, required=True)
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoint directory to create")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    return {"quantize": cmd_quantize}


def cmd_quantize(args) -> None:
    from pathlib import Path

    import torch

    from lowbit.api import resolve_device
    from lowbit.errors import LowbitError
    from lowbit.models.loader import load_model
    from lowbit.quant.checkpoint import save_checkpoint
    from lowbit.quant.quantize import quantize_loaded
    from lowbit.quant.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    if Path(args.output).exists() and not args.force:
        raise LowbitError(f"{args.output} exists; choose another --output or pass --force to replace it")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.model, torch.float32, device)
    quantize_loaded(model, tokenizer, recipe, args.calib, args.calib_samples, args.calib_len)
    out = save_checkpoint(model, tokenizer, recipe, args.output, force=args.force)
    print(f"wrote {out} ({recipe.name}: {recipe.description})")
