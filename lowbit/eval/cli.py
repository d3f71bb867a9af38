"""`lowbit eval`: perplexity (and, where available, zero-shot tasks) of a model, checkpoint or recipe."""
from __future__ import annotations

import json

from lowbit.models.default import DEFAULT_MODEL


def register(sub) -> dict:
    from lowbit.quant.cli import add_recipe_args

    p = sub.add_parser("eval", help="measure perplexity of a model, a checkpoint, or a recipe applied in memory",
                       description="WikiText-2 perplexity: the whole test file tokenized once, non-overlapping "
                                   "windows of --ctx tokens, every next token scored.",
                       epilog="example: lowbit eval --recipe w4a16 --ppl wikitext2 --ctx 2048")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M|DIR", help=f"model or checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32)")
    add_recipe_args(p, required=False)
    p.add_argument("--ppl", default="wikitext2", metavar="DATASET", help="perplexity dataset (default: wikitext2)")
    p.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None, metavar="K", help="score only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return {"eval": cmd_eval}


def load_for_eval(args):
    """The model as asked: loaded, and quantized in memory when --recipe is given."""
    import torch

    from lowbit.api import DTYPES, resolve_device
    from lowbit.models.loader import load_model

    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.model, DTYPES[args.dtype], device)
    if args.recipe:
        from lowbit.quant.quantize import quantize_loaded
        from lowbit.quant.recipes import get_recipe

        quantize_loaded(model, tokenizer, get_recipe(args.recipe), args.calib, args.calib_samples, args.calib_len)
    torch.manual_seed(0)
    return model, tokenizer


def cmd_eval(args) -> None:
    from lowbit.eval.perplexity import dataset_tokens, perplexity, windows

    model, tokenizer = load_for_eval(args)
    tokens = dataset_tokens(tokenizer, args.ppl)
    windows(tokens, args.ctx, args.max_windows)  # refuse bad --ctx / --max-windows before any work
    result = {"model": str(args.model), "recipe": args.recipe, "dataset": args.ppl,
              **perplexity(model, tokens, args.ctx, args.max_windows, args.batch_size, progress=not args.json)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.ppl} perplexity {result['ppl']:.4f} ({result['windows']} windows x {args.ctx} tokens, "
              f"model {args.model}{', recipe ' + args.recipe if args.recipe else ''})")
