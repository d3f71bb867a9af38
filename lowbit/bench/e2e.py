"""End-to-end offline throughput in one process: (architecture, recipe, workload) configs through our
engine, and transformers' batched `generate` as the peer, on random weights at real shapes (speed does
not depend on the values). One JSON file per row as soon as it is measured; a markdown table last.

    python -m lowbit.bench e2e --out results/ [SPEC ...]      # measure
    python -m lowbit.bench e2e --from-json results/           # the table again, from the JSON

SPEC is ARCH:RECIPE:IN/OUT[,IN/OUT...], RECIPE `hf` being the transformers peer at `--hf-batch-size`
(`hf-bN`: at static batches of N; list several to find its best, which the ratios use). A spec builds its
model once, on the device, runs its workloads in order and frees the model; list the rows that matter
most first. Each workload sends enough requests to fill the KV cache `--fill` times over (capped by
`--max-prompts`), vLLM's max-throughput setting: temperature 1, end-of-sequence ignored, every request
exactly IN prompt and OUT output tokens. A workload stops at `--config-time-s` (its row then says
"capped") and the sweep at `--budget-s`: what finished is on disk either way. Each row also holds the
GPU's clocks, power and clock-event reasons sampled over its timed run (`gpu_clocks`, see `gpu_monitor`).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from lowbit.bench.gpu_monitor import GpuMonitor, nvml_id
from lowbit.errors import LowbitError

HF = "hf"
DEFAULT_SPECS = [
    "llama3-8b:bf16:1024/512", "llama3-8b:fp8:1024/512", "llama3-8b:w4a8kv4:1024/512", "llama3-8b:hf-b64:1024/512",
    "llama3-8b:hf-b256:1024/512", "llama3-8b:w4a8kv4:128/2048,2048/128", "llama3-8b:fp8:128/2048,2048/128",
    "llama3-8b:bf16:128/2048,2048/128", "llama3-8b:hf-b256:128/2048,2048/128", "llama3-70b:w4a8kv4:1024/512",
    "llama3-70b:fp8:1024/512",
]
RECIPE_ORDER = ["bf16", "fp8", "w8a8", "w4a16", "w4a8kv4", "w4a4kv4"]
# (ratio's numerator, denominator, target) per architecture (issue #5)
TARGETS = {"llama3-8b": [("w4a8kv4", "bf16", 2.0), ("w4a8kv4", "fp8", 1.2), ("w4a8kv4", HF, 5.0)],
           "llama3-70b": [("w4a8kv4", "fp8", None)]}
# TensorRT-LLM's published H200 rows (Llama-3.1-8B, fp8, one GPU, output tok/s), quoted in issue #5
TRTLLM_URL = "https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html"
TRTLLM_FP8 = {("llama3-8b", 128, 2048): 26221, ("llama3-8b", 2048, 128): 3538}


def is_hf(recipe: str) -> bool:
    return recipe == HF or (recipe.startswith(HF + "-b") and recipe[len(HF) + 2:].isdigit())


def parse_spec(spec: str) -> tuple[str, str, list[tuple[int, int]]]:
    """'llama3-8b:w4a8kv4:1024/512,128/2048' -> ('llama3-8b', 'w4a8kv4', [(1024, 512), (128, 2048)])."""
    try:
        arch, recipe, workloads = spec.split(":")
        pairs = [tuple(int(n) for n in w.split("/")) for w in workloads.split(",")]
        if not arch or not recipe or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError
    except ValueError:
        raise LowbitError(f"bad config {spec!r}: want ARCH:RECIPE:IN/OUT[,IN/OUT...], "
                          f"e.g. llama3-8b:w4a8kv4:1024/512,128/2048") from None
    return arch, recipe, pairs


def _row_path(out: Path, arch: str, recipe: str, input_len: int, output_len: int) -> Path:
    return out / f"{arch}__{recipe}__{input_len}x{output_len}.json"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


class Sweep:
    def __init__(self, args):
        from lowbit.api import resolve_device
        from lowbit.bench.env import environment

        self.args = args
        self.device = resolve_device(args.device)
        self.gpu = nvml_id(self.device)
        self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.env = environment(self.device)
        self.deadline = time.monotonic() + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._seeds = itertools.count(args.seed)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, specs: list[str]) -> None:
        parsed = [parse_spec(s) for s in specs]  # every spec checked before anything is built
        for arch, recipe, workloads in parsed:
            if self.remaining() < self.args.min_config_s:
                print(f"budget spent: skipping {arch} {recipe} {workloads}", flush=True)
                continue
            self.run_spec(arch, recipe, workloads)
            _free()

    def run_spec(self, arch: str, recipe: str, workloads: list[tuple[int, int]]) -> None:
        t0 = time.monotonic()
        try:
            runner = self._hf(arch, recipe) if is_hf(recipe) else self._ours(arch, recipe, workloads)
        except Exception as e:  # noqa: BLE001 - one row per failure, then the next config
            traceback.print_exc()
            for input_len, output_len in workloads:
                self._write(arch, recipe, input_len, output_len, {"error": _one_line(e)})
            return
        setup_s = round(time.monotonic() - t0, 1)  # model, engine and warm-up
        for input_len, output_len in workloads:
            left = self.remaining()
            if left < self.args.min_config_s:
                print(f"budget spent: skipping {arch} {recipe} {input_len}/{output_len}", flush=True)
                continue
            try:
                row = runner(input_len, output_len, min(self.args.config_time_s, left))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"error": _one_line(e)}
            row["setup_s"] = setup_s
            self._write(arch, recipe, input_len, output_len, row)
            _free()

    def _monitored(self, measure, *args, **kwargs) -> dict:
        """`measure`'s result with the GPU's clocks over it: a throughput figure says what clocks it ran at."""
        with GpuMonitor(self.gpu) as monitor:
            result = measure(*args, **kwargs)
        return dict(result, gpu_clocks=monitor.summary())

    def _requests(self, arch: str, num: int, input_len: int, output_len: int):
        """Random prompts, from a new seed each time: no prefix of one set is cached from another."""
        from lowbit.bench.throughput import random_requests
        from lowbit.models.random_weights import random_config

        return random_requests(num, input_len, output_len, 0.0, random_config(arch).vocab_size, next(self._seeds))

    def _ours(self, arch: str, recipe: str, workloads: list[tuple[int, int]]):
        from lowbit.api import LLM
        from lowbit.bench import throughput

        a = self.args
        llm = LLM(random_weights=arch, recipe=None if recipe == "bf16" else recipe, device=self.device,
                  dtype=self.dtype, max_model_len=a.max_model_len or max(i + o for i, o in workloads),
                  max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                  gpu_memory_utilization=a.gpu_memory_utilization, block_size=a.block_size)
        cfg, blocks = llm.engine.cfg, llm.engine.runner.num_blocks
        n = min(a.warmup_seqs, cfg.max_num_seqs, cfg.max_model_len - 24)
        if n > 0:  # compiles the kernels for a long prefill and for every decode batch size up to n
            throughput.run(llm, [(p, k) for k, (p, _) in enumerate(self._requests(arch, n, 24, 1), 1)],
                           desc="warm-up")
        engine = dict(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                      gpu_memory_utilization=cfg.gpu_memory_utilization, block_size=cfg.block_size,
                      max_model_len=cfg.max_model_len, kv_cache_tokens=blocks * cfg.block_size)

        def run(input_len: int, output_len: int, time_limit_s: float) -> dict:
            fits = blocks // math.ceil((input_len + output_len) / cfg.block_size)
            num = max(1, min(a.max_prompts, math.ceil(a.fill * fits)))
            requests = self._requests(arch, num, input_len, output_len)
            result = self._monitored(throughput.run, llm, requests, time_limit_s=time_limit_s,
                                     desc=f"{recipe} {input_len}/{output_len}")
            return dict(result, num_prompts=num, seqs_in_cache=fits, time_limit_s=round(time_limit_s, 1),
                        engine=engine)

        return run

    def _hf(self, arch: str, recipe: str):
        from lowbit.api import DTYPES
        from lowbit.bench import hf_generate

        a = self.args
        model = hf_generate.load_hf_model(arch, self.device, DTYPES[self.dtype])
        hf_generate.run(model, self._requests(arch, 2, 8, 4), batch_size=2, desc="hf warm-up")

        batch = a.hf_batch_size if recipe == HF else int(recipe[len(HF) + 2:])

        def run(input_len: int, output_len: int, time_limit_s: float) -> dict:
            num = batch * a.hf_batches
            requests = self._requests(arch, num, input_len, output_len)
            result = self._monitored(hf_generate.run, model, requests, batch, time_limit_s,
                                     desc=f"hf {input_len}/{output_len}")
            return dict(result, num_prompts=num, time_limit_s=round(time_limit_s, 1), engine={"batch_size": batch})

        return run

    def _write(self, arch: str, recipe: str, input_len: int, output_len: int, row: dict) -> None:
        row = dict(arch=arch, recipe=recipe, input_len=input_len, output_len=output_len, env=self.env,
                   dtype=self.dtype, **row)
        _row_path(self.out, arch, recipe, input_len, output_len).write_text(json.dumps(row, indent=1) + "\n")
        tps = row.get("output_tokens_per_second")
        print(f"{arch} {recipe} {input_len}/{output_len}: " + (row["error"] if tps is None else
              f"{tps:.0f} output tok/s, {row['num_requests']} requests" + (" (capped)" if row["capped"] else "")),
              flush=True)


def load_rows(results: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*__*__*.json"))]
    if not rows:
        raise LowbitError(f"{results}: no result files (*__*__*.json)")
    return rows


def _order(recipe: str) -> tuple[int, int, str]:
    if is_hf(recipe):
        return (len(RECIPE_ORDER), 0 if recipe == HF else int(recipe[len(HF) + 2:]), recipe)
    return (RECIPE_ORDER.index(recipe) if recipe in RECIPE_ORDER else len(RECIPE_ORDER) - 1, 0, recipe)


def _tps(rows: dict, recipe: str) -> float | None:
    """A recipe's output tokens/s; for HF, that of its fastest batch size."""
    if recipe == HF:
        return max((r["output_tokens_per_second"] for k, r in rows.items()
                    if is_hf(k) and "output_tokens_per_second" in r), default=None)
    return rows.get(recipe, {}).get("output_tokens_per_second")


def _x(num: float | None, den: float | None) -> str:
    return "" if num is None or not den else f"{num / den:.2f}x"


def _clocks(summary: dict | None) -> str:
    """A row's GPU clocks over its timed run, in a few words ('' when none were read)."""
    if not summary or not summary.get("available") or not summary["all"]["samples"]:
        return ""
    s = summary["all"]
    reasons = ", ".join(f"{r} {100 * n / s['samples']:.0f}%" for r, n in s["reasons"].items() if r != "gpu_idle")
    return f"SM {s['sm_mhz_mean']:,.0f} MHz, {s['power_w_mean']:,.0f} W" + (f" ({reasons})" if reasons else "")


def render(rows: list[dict]) -> str:
    """The markdown table of a sweep's rows (all of it derived from the JSON)."""
    env = rows[0]["env"]
    commits = sorted({r["env"]["commit"] or "unrecorded" for r in rows})
    eng = next((r["engine"] for r in rows if "engine" in r and "max_num_seqs" in r["engine"]), None)
    lines = [
        f"Offline throughput on random weights at real shapes, {env['device']}, {env['date']}, commit "
        f"{', '.join(commits)}; torch {env['torch']}, triton {env['triton']}, python {env['python']}. "
        "vLLM's offline method: all requests at once, sampling at temperature 1, end-of-sequence ignored, each "
        "request exactly IN prompt and OUT output tokens; requests = enough to fill the KV cache "
        "(see `seqs_in_cache` in the JSON). Ratios compare output tokens/s in the same workload.",
    ]
    confs = sorted({r["env"].get("alloc_conf", "default") for r in rows})
    if confs != ["default"]:
        lines.append(f"PYTORCH_CUDA_ALLOC_CONF: {', '.join(confs)}.")
    if eng:
        lines.append(f"Our engine: max_num_seqs {eng['max_num_seqs']}, max_num_batched_tokens "
                     f"{eng['max_num_batched_tokens']}, gpu_memory_utilization {eng['gpu_memory_utilization']}, "
                     f"block_size {eng['block_size']}. HF: transformers' batched `generate`, static batches.")
    lines += ["", "| model | in/out | recipe | requests | output tok/s | total tok/s | vs our bf16 | vs our fp8 | vs HF (best batch) "
                  "| note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["input_len"], r["output_len"]), {})[r["recipe"]] = r
    for (arch, i, o), by_recipe in groups.items():
        for recipe in sorted(by_recipe, key=_order):
            r = by_recipe[recipe]
            name = f"HF transformers ({r['dtype']})" if is_hf(recipe) else f"`{recipe}`"
            if "error" in r:
                lines.append(f"| {arch} | {i}/{o} | {name} | | | | | | | {r['error']} |")
                continue
            tps = r["output_tokens_per_second"]
            note = (f"capped at {r['time_limit_s']} s: {r['num_requests']} of {r['num_prompts']} finished"
                    if r["capped"] else "")
            if is_hf(recipe):
                note = "; ".join(filter(None, [f"batch {r['engine']['batch_size']}", note]))
            preempted = f"{r['preemptions']} preemptions" if r.get("preemptions") else ""
            note = "; ".join(filter(None, [note, preempted, _clocks(r.get("gpu_clocks"))]))
            lines.append(f"| {arch} | {i}/{o} | {name} | {r['num_requests']} | {tps:,.0f} | "
                         f"{r['tokens_per_second']:,.0f} | {_x(tps, _tps(by_recipe, 'bf16'))} | "
                         f"{_x(tps, _tps(by_recipe, 'fp8'))} | {_x(tps, _tps(by_recipe, HF))} | {note} |")
    quoted = [(k, v) for k, v in TRTLLM_FP8.items() if k in groups]
    if quoted:
        lines += ["", f"Outside reference, quoted, not measured here: TensorRT-LLM's published H200 fp8 throughput "
                      f"for Llama-3.1-8B ({TRTLLM_URL}), beside ours on the same workload.", "",
                  "| in/out | TensorRT-LLM fp8 output tok/s (quoted) | our fp8 | our w4a8kv4 | our w4a8kv4 / quoted |",
                  "| --- | --- | --- | --- | --- |"]
        for (arch, i, o), v in quoted:
            fp8, w4 = _tps(groups[(arch, i, o)], "fp8"), _tps(groups[(arch, i, o)], "w4a8kv4")
            lines.append(f"| {i}/{o} | {v:,} | {'' if fp8 is None else f'{fp8:,.0f}'} | "
                         f"{'' if w4 is None else f'{w4:,.0f}'} | {_x(w4, v)} |")
    checks = []
    for (arch, i, o), by_recipe in groups.items():
        for num, den, target in TARGETS.get(arch, []):
            a, b = _tps(by_recipe, num), _tps(by_recipe, den)
            if a is not None and b:
                got = a / b
                met = "" if target is None else ("yes" if got >= target else "no")
                label = f"{num} / {den}" + (" (best batch)" if den == HF else "")
                checks.append(f"| {arch} | {i}/{o} | {label} | {'' if target is None else f'>= {target}'} | "
                              f"{got:.2f} | {met} |")
    if checks:
        lines += ["", "| model | in/out | ratio | target | got | met |", "| --- | --- | --- | --- | --- | --- |", *checks]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowbit.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help=f"ARCH:RECIPE:IN/OUT[,IN/OUT...] in the order to run (default: {' '.join(DEFAULT_SPECS)})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write one JSON per row here")
    p.add_argument("--from-json", type=Path, default=None, metavar="DIR", help="only print the table of DIR's rows")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the table to PATH")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--budget-s", type=float, default=540, metavar="S",
                   help="no config starts after this many seconds (default: 540)")
    p.add_argument("--config-time-s", type=float, default=120, metavar="S",
                   help="a workload's requests still running after S seconds are aborted (default: 120)")
    p.add_argument("--min-config-s", type=float, default=20, metavar="S",
                   help="start a config only with at least S seconds of budget left (default: 20)")
    p.add_argument("--fill", type=float, default=2.0, metavar="F",
                   help="requests per workload: F times the sequences the KV cache holds (default: 2)")
    p.add_argument("--max-prompts", type=int, default=2048, metavar="N", help="at most N requests (default: 2048)")
    p.add_argument("--warmup-seqs", type=int, default=96, metavar="N",
                   help="warm-up before timing: N short requests ending one per step, so the kernels for every "
                        "decode batch up to N are compiled (default: 96; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the prompt token ids (default: 0)")
    g = p.add_argument_group("our engine (EngineConfig's names)")
    g.add_argument("--max-num-seqs", type=int, default=2048, metavar="N",
                   help="(default: 2048: the KV cache, not this cap, bounds the batch of every recipe)")
    g.add_argument("--max-num-batched-tokens", type=int, default=16384, metavar="N", help="(default: 16384)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F", help="(default: 0.9)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="(default: 16)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="(default: the spec's longest IN + OUT)")
    g = p.add_argument_group("the HF peer")
    g.add_argument("--hf-batch-size", type=int, default=64, metavar="B", help="static batch (default: 64)")
    g.add_argument("--hf-batches", type=int, default=1, metavar="N", help="batches per workload (default: 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.from_json is None:
            if args.out is None:
                raise LowbitError("give --out DIR (to measure) or --from-json DIR (to print a table)")
            Sweep(args).run(args.specs or DEFAULT_SPECS)
        table = render(load_rows(args.from_json or args.out))
    except LowbitError as e:
        print(f"lowbit bench e2e: error: {e}", file=sys.stderr)
        return 2
    if args.markdown is not None:
        args.markdown.write_text(table)
    print()
    print(table)
    return 0
