"""`lowbit eval`: perplexity, zero-shot tasks and agreement with the unquantized model, for a model,
a checkpoint, or a recipe applied in memory."""
from __future__ import annotations

import json

from lowbit.errors import LowbitError
from lowbit.models.default import DEFAULT_MODEL

EPILOG = """examples:
  lowbit eval --recipe w4a16 --ppl wikitext2 --ctx 2048
  lowbit eval --model ./smollm2-w4a8kv4 --tasks piqa,arc_easy,arc_challenge,winogrande,boolq,lambada --limit 200
  lowbit eval --recipe w4a4kv4 --kl --ctx 512 --max-windows 20      # KL and top-1 agreement vs the fp model"""


def register(sub) -> dict:
    import argparse

    from lowbit.quant.cli import add_recipe_args

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and agreement with the unquantized model",
                       description="Perplexity: the whole test file tokenized once, non-overlapping windows of --ctx "
                                   "tokens, every next token scored. Tasks: scored as lm-evaluation-harness does. "
                                   "With neither --tasks nor --kl, WikiText-2 perplexity is measured.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M|DIR", help=f"model or checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32)")
    add_recipe_args(p, required=False)
    p.add_argument("--ppl", default=None, metavar="DATASET", help="perplexity dataset: wikitext2")
    p.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None, metavar="K", help="score only the first K windows")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated: piqa, arc_easy, arc_challenge, winogrande, boolq, lambada")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each task")
    p.add_argument("--kl", action="store_true", help="KL divergence and top-1 agreement against --kl-ref")
    p.add_argument("--kl-ref", default=None, metavar="M", help="reference model for --kl (default: --model unquantized)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per forward pass for --ppl and --kl (default: 8); tasks pack ~16k tokens per pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return {"eval": cmd_eval}


def load_for_eval(model_name, args, recipe=None):
    """The model as asked: loaded, and quantized in memory when a recipe is given."""
    from lowbit.api import DTYPES, resolve_device
    from lowbit.models.loader import load_model

    model, tokenizer, _ = load_model(model_name, DTYPES[args.dtype], resolve_device(args.device))
    if recipe:
        from lowbit.quant.quantize import quantize_loaded
        from lowbit.quant.recipes import get_recipe

        quantize_loaded(model, tokenizer, get_recipe(recipe), args.calib, args.calib_samples, args.calib_len,
                        progress=not args.json)
    return model, tokenizer


def cmd_eval(args) -> None:
    from lowbit.eval.perplexity import dataset_tokens, perplexity, windows
    from lowbit.eval.tasks import load_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks is not None and not tasks:
        raise LowbitError("--tasks is empty")
    for name in tasks:  # refuse unknown names, bad data and --limit before loading anything
        load_task(name, args.limit)
    ppl = args.ppl or (None if tasks or args.kl else "wikitext2")
    model, tokenizer = load_for_eval(args.model, args, args.recipe)
    result = {"model": str(args.model), "recipe": args.recipe}
    progress = not args.json
    if ppl or args.kl:
        tokens = dataset_tokens(tokenizer, ppl or "wikitext2")
        windows(tokens, args.ctx, args.max_windows)  # refuse bad --ctx / --max-windows before any work
    if ppl:
        result["perplexity"] = {"dataset": ppl, **perplexity(model, tokens, args.ctx, args.max_windows,
                                                              args.batch_size, progress)}
    if tasks:
        from lowbit.eval.harness import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, tasks, args.limit, args.batch_size, progress)
    if args.kl:
        from lowbit.eval.agreement import kl_agreement

        ref, _ = load_for_eval(args.kl_ref or args.model, args)
        result["agreement"] = kl_agreement(model, ref, tokens, args.ctx, args.max_windows, args.batch_size, progress)
    print(json.dumps(result) if args.json else render(result))


def render(result: dict) -> str:
    lines = [f"model {result['model']}" + (f", recipe {result['recipe']}" if result["recipe"] else "")]
    if "perplexity" in result:
        p = result["perplexity"]
        lines.append(f"{p['dataset']} perplexity {p['ppl']:.4f} ({p['windows']} windows x {p['ctx']} tokens)")
    if "tasks" in result:
        pm = lambda se: "" if se is None else f" ± {se:.4f}"  # noqa: E731
        for name, m in result["tasks"]["tasks"].items():
            extra = "".join(f"  {k} {v:.4f}{pm(m.get(k + '_stderr'))}" for k, v in m.items()
                            if k not in ("acc", "samples", "outcomes") and not k.endswith("_stderr"))
            lines.append(f"{name:15s} acc {m['acc']:.4f}{pm(m.get('acc_stderr'))}{extra}  (n={m['samples']})")
        lines.append(f"{'average':15s} acc {result['tasks']['average_acc']:.4f}"
                     f"{pm(result['tasks'].get('average_acc_stderr'))}")
    if "agreement" in result:
        a = result["agreement"]
        lines.append(f"KL mean {a['kl_mean']:.5f}  p99 {a['kl_p99']:.5f}  max {a['kl_max']:.4f}  "
                     f"top-1 agreement {100 * a['top1_agreement']:.2f}%  (ppl {a['ppl']:.3f} vs ref {a['ref_ppl']:.3f})")
    return "\n".join(lines)
