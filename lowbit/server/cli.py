"""`lowbit serve`: an OpenAI-compatible HTTP server for one model."""
from __future__ import annotations

import argparse
import os
import sys

from lowbit.cli import engine_args, load_llm, model_args
from lowbit.errors import LowbitError

EPILOG = """examples:
  lowbit serve                                    # the built-in model at http://127.0.0.1:8000/v1
  lowbit serve --model ./my-hf-model-dir --port 8080 --api-key secret

then, from any OpenAI client (base URL http://127.0.0.1:8000/v1) or the shell:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}]}'

endpoints: /v1/completions, /v1/chat/completions (both stream with "stream": true), /v1/models,
/health, /metrics (Prometheus). Sampling extras beyond OpenAI's (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids) go in the request body, as with vLLM."""


def register(sub) -> dict:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve one model over an OpenAI-compatible HTTP API, batching all "
                                   "requests together (continuous batching over a paged KV cache).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 accepts other machines (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("LOWBIT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $LOWBIT_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients send as \"model\" (default: the --model value)")
    engine_args(p)
    return {"serve": cmd_serve}


def cmd_serve(args) -> None:
    try:
        import uvicorn

        from lowbit.server.openai import build_app
    except ModuleNotFoundError as e:
        raise LowbitError(f"lowbit serve needs {e.name}: pip install 'lowbit[serve]'") from None
    from lowbit.engine.async_engine import AsyncLLMEngine

    llm = load_llm(args)
    name = args.served_model_name or args.model
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, name, llm.tokenizer, api_key=args.api_key)
    print(f"lowbit: serving {name!r} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()
