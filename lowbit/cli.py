"""The `lowbit` command line. `generate` and `chat` live here; other commands live beside what they
drive, each module exposing `register(subparsers) -> {name: handler}`."""
from __future__ import annotations

import argparse
import importlib
import sys

from lowbit.errors import LowbitError
from lowbit.models.default import DEFAULT_MODEL

EPILOG = f"""examples:
  lowbit generate --chat "What is the capital of France?"
  lowbit generate --max-tokens 64 --temperature 0.7 --seed 0 "Once upon a time"
  lowbit chat --model ./my-hf-model-dir

MODEL is a Hugging Face model directory (config.json + *.safetensors + tokenizer), a .gguf file,
a lowbit quantized checkpoint, or the built-in {DEFAULT_MODEL} (the default)."""


# modules that add commands (quantize, eval, serve, bench); a missing one is simply not offered
COMMAND_MODULES = ["lowbit.quant.cli", "lowbit.eval.cli", "lowbit.server.cli", "lowbit.bench.cli"]


def model_args(p: argparse.ArgumentParser, random_weights: bool = True) -> None:
    """--model/--device/--dtype, and (for bench and serve) --random-weights/--arch."""
    from lowbit.models.random_weights import ARCHS

    p.add_argument("--model", default=None, metavar="M", help=f"model to load (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    if not random_weights:
        return
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random weights at the shapes of --arch, for throughput; --recipe then "
                        "applies its formats only (round-to-nearest, no calibration: calibrating random weights "
                        "is meaningless); the tokenizer is the built-in model's where that is installed, "
                        "else prompts must be token ids")
    p.add_argument("--arch", default=None, metavar="A", help=f"shapes for --random-weights: {', '.join(ARCHS)}")


def sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N", help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest prompt + output in tokens (default: the model's context length)")
    g.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="most sequences decoded together in one step (default: 64)")
    g.add_argument("--block-size", type=int, default=None, metavar="N", help="tokens per KV-cache block (default: 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="fraction of GPU memory the model and KV cache may use (default: 0.9)")
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="no CUDA graphs for decode batches (default: graphs on CUDA)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading back the last one's tokens (default: on)")
    from lowbit.quant.cli import add_recipe_args

    add_recipe_args(p, required=False)


def load_llm(args):
    """The `LLM` that the model and engine options describe. Sets `args.model` when it was not given
    (the served model's name): the default model, or `random-<arch>`."""
    from lowbit.api import LLM

    if args.random_weights != (args.arch is not None):
        raise LowbitError("--random-weights and --arch go together")
    engine = {k: getattr(args, k) for k in ("max_num_seqs", "block_size", "gpu_memory_utilization", "enforce_eager",
                                            "async_scheduling") if getattr(args, k) is not None}
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              recipe=args.recipe, calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
              random_weights=args.arch, **engine)
    args.model = args.model or (f"random-{args.arch}" if args.random_weights else DEFAULT_MODEL)
    return llm


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="lowbit", description="Run and serve low-bit LLMs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts (or answer them as chat messages with --chat)",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(gen, random_weights=False)
    sampling_args(gen, 128)
    gen.add_argument("--chat", action="store_true", help="treat each prompt as a user message (chat template)")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")

    chat = sub.add_parser("chat", help="talk with the model interactively (empty line or Ctrl-D to quit)")
    model_args(chat, random_weights=False)
    sampling_args(chat, 512)
    chat.add_argument("--system", default=None, help="a system message to start the conversation")
    commands = {"generate": cmd_generate, "chat": cmd_chat}
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        commands.update(module.register(sub))
    return parser, commands


def _params(args):
    from lowbit.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def cmd_generate(args) -> None:
    from lowbit.api import LLM

    if any(not p.strip() for p in args.prompts):
        raise LowbitError("empty prompt")
    params = _params(args)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text if args.chat else prompt + out.outputs[0].text)


def cmd_chat(args) -> None:
    from lowbit.api import LLM

    params = _params(args)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
    conv = [{"role": "system", "content": args.system}] if args.system else []
    print("(empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        conv.append({"role": "user", "content": line})
        answer = llm.chat(conv, params)[0].outputs[0].text
        print(answer)
        conv.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        commands[args.command](args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
