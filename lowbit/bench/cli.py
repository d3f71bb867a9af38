"""`lowbit bench throughput|serve`, with vLLM's benchmark conventions, and the benchmarks of
`PASSTHROUGH` (kernels, e2e, profile, ...), which hand their arguments to `lowbit.bench.<name>.main`."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from lowbit.cli import engine_args, load_llm, model_args
from lowbit.errors import LowbitError

EPILOG = """examples:
  lowbit bench throughput --num-prompts 200 --input-len 128 --output-len 128
  lowbit bench throughput --random-weights --arch llama3-8b --recipe w4a8kv4   # no checkpoint needed
  lowbit bench throughput --random-weights --arch llama3-8b --backend hf       # transformers' generate
  lowbit bench e2e --out results/   # the recipes x workloads sweep, one table (e2e --help)
  lowbit serve &    # then, in another shell:
  lowbit bench serve --num-prompts 200 --request-rate 4 --output-json serve.json
  lowbit bench serve --num-prompts 200 --max-concurrency 16"""


# the benchmarks that hand their arguments to `lowbit.bench.<name>.main`
PASSTHROUGH = {
    "kernels": "GPU kernel microbenchmarks",
    "e2e": "offline throughput of recipes x workloads and the HF peer in one run, one table",
    "profile": "where an engine step's time goes, per phase and kernel",
    "sass": "instruction counts of our kernels' main loops, compiled for sm_90a without a GPU",
    "ncu": "hardware counters of one kernel launch, by Nsight Compute on a GPU",
    "sampling": "the sampler's one-pass draw against the torch path, on a GPU",
    "actquant": "the fused activation quantizers against the bf16 and torch paths, on a GPU",
}


def _workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    g = p.add_argument_group("workload (random token ids, as vLLM's random dataset)")
    g.add_argument("--num-prompts", type=int, default=num_prompts, metavar="N",
                   help=f"requests to send (default: {num_prompts})")
    g.add_argument("--input-len", type=int, default=128, metavar="N", help="prompt tokens per request (default: 128)")
    g.add_argument("--output-len", type=int, default=128, metavar="N",
                   help="tokens to generate per request (default: 128)")
    g.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="sample each length uniformly in [len*(1-R), len*(1+R)] (default: 0, fixed lengths)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the output length even past end-of-sequence (default: on)")
    g.add_argument("--seed", type=int, default=0, help="seed for the prompts and arrival times (default: 0)")
    p.add_argument("--output-json", type=Path, default=None, metavar="PATH", help="also write the results here")


def register(sub) -> dict:
    bench = sub.add_parser("bench", help="measure offline throughput or a server's latency",
                           description="Benchmarks with vLLM's conventions and metric names.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    tp = kinds.add_parser("throughput", help="offline: all requests through the engine at once; "
                                             "requests/s, output and total tokens/s")
    model_args(tp)
    engine_args(tp)
    _workload_args(tp, 100)
    tp.add_argument("--backend", choices=["lowbit", "hf"], default="lowbit",
                    help="our engine, or transformers' batched generate on the --random-weights --arch model in "
                         "the compute dtype (default: lowbit)")
    tp.add_argument("--hf-batch-size", type=int, default=64, metavar="B",
                    help="static batch of the hf backend (default: 64)")

    sv = kinds.add_parser("serve", help="against a running server: TTFT, TPOT, ITL and throughput")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    sv.add_argument("--endpoint", default="/v1/completions",
                    help="streaming completions path (default: /v1/completions)")
    sv.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models entry)")
    sv.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), metavar="KEY",
                    help="bearer key, if the server wants one (default: $OPENAI_API_KEY)")
    sv.add_argument("--request-rate", type=float, default=math.inf, metavar="RPS",
                    help="requests started per second, Poisson arrivals (default: inf, all at once)")
    sv.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                    help="at most N requests in flight (default: no cap)")
    sv.add_argument("--vocab-size", type=int, default=32000, metavar="V",
                    help="prompt token ids are drawn from [0, V); keep V within the model's vocabulary "
                         "(default: 32000)")
    sv.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    _workload_args(sv, 100)

    # no options of their own (no prefix chars), so every argument, --help included, goes to their main
    handlers = {"throughput": _throughput, "serve": _serve}
    for name, about in PASSTHROUGH.items():
        kinds.add_parser(name, help=f"{about} (lowbit bench {name} --help)", add_help=False,
                         prefix_chars="\0").add_argument("argv", nargs="*")
        handlers[name] = _main(name)
    return {"bench": lambda args: handlers[args.benchmark](args)}


def _write(args, result: dict) -> None:
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(result, indent=2) + "\n")


def _throughput(args) -> None:
    from lowbit.bench import throughput

    if args.backend == "hf":
        result = _hf_throughput(args)
    else:
        llm = load_llm(args)
        requests = throughput.random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                                              llm.model_config.vocab_size, args.seed)
        result = throughput.run(llm, requests, args.ignore_eos)
    print(throughput.report(result))
    _write(args, result)


def _serve(args) -> None:
    import asyncio

    from lowbit.bench import serve
    from lowbit.bench.throughput import random_requests

    requests = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               args.vocab_size, args.seed)
    result = asyncio.run(serve.benchmark(
        args.base_url, requests, model=args.model, endpoint=args.endpoint, api_key=args.api_key,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        seed=args.seed, disable_tqdm=args.disable_tqdm))
    print(serve.report(result))
    _write(args, result)


def _hf_throughput(args) -> dict:
    from lowbit.api import DTYPES, resolve_device
    from lowbit.bench import hf_generate
    from lowbit.bench.throughput import random_requests
    from lowbit.models.random_weights import random_config

    if not args.random_weights or args.arch is None or args.model is not None or args.recipe is not None:
        raise LowbitError("--backend hf runs --random-weights --arch models only, without --model or --recipe")
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               random_config(args.arch).vocab_size, args.seed)
    model = hf_generate.load_hf_model(args.arch, device, DTYPES[dtype])
    return hf_generate.run(model, requests, args.hf_batch_size)


def _main(name: str):
    def handler(args) -> None:
        import importlib

        code = importlib.import_module(f"lowbit.bench.{name}").main(args.argv)
        if code:
            raise SystemExit(code)

    return handler
