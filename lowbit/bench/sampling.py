"""The sampler's draw on the GPU: `python -m lowbit.bench sampling [--batches B ...] [--out DIR]`.

Times, per batch (bf16 logits over Llama-3's 128,256-token vocabulary, temperature 1): our
one-pass kernel (`kernels.sampling.race_sample`), and in the same run its peers: the torch
exponential race it replaced (fp32 copy, temperature, softmax, Exp(1) noise, division, argmax: the
form vLLM's sampler uses) and a bare `argmax` (one read of the logits: what greedy decoding costs).
Each row gives microseconds and the logits' bytes over the time against the copy roof measured
in the same run. JSON lines as it goes, sampling.json under --out, a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

VOCAB = 128256


def torch_race(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    probs = (logits.float() / temp[:, None]).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def main(argv: list[str] | None = None) -> int:
    from lowbit.bench.env import environment
    from lowbit.bench.kernels import bandwidth, bench_ms, measure_roofs
    from lowbit.kernels.sampling import race_sample

    p = argparse.ArgumentParser(prog="python -m lowbit.bench sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 2048])
    p.add_argument("--out", default="out/bench")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowbit.bench sampling needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    result = dict(env=environment(), roofs=measure_roofs(), rows=[])
    print(json.dumps(result["env"]), flush=True)
    copy = result["roofs"]["copy_GBps"]
    for b in a.batches:
        logits = torch.randn(b, VOCAB, device=dev, dtype=torch.bfloat16)
        ones = torch.ones(b, device=dev)
        stream = torch.randint(0, 2 ** 32, (b,), device=dev)
        pos = torch.full((b,), 1000, device=dev, dtype=torch.int64)
        runs = {"ours (one pass)": lambda: race_sample(logits, ones, ones, stream, pos),
                "torch exponential race": lambda: torch_race(logits, ones),
                "torch argmax (greedy)": lambda: logits.argmax(-1)}
        nbytes = logits.numel() * logits.element_size()
        for name, fn in runs.items():
            row = dict(batch=b, method=name, **bandwidth(bench_ms(fn), nbytes, result["roofs"]))
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sampling.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nSampling, bf16 logits x {VOCAB}, {result['env']['device']}, {result['env']['date']}, "
          f"commit {result['env']['commit']}; us (logits read at GB/s, % of the {copy:.0f} GB/s copy roof)\n")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    print("| batch | " + " | ".join(methods) + " | ours vs torch race |")
    print("| --- |" + " --- |" * (len(methods) + 1))
    for b in a.batches:
        rows = {r["method"]: r for r in result["rows"] if r["batch"] == b}
        cells = [f"{rows[m]['us']:.1f} ({rows[m]['GBps']:.0f}, {rows[m]['roof_pct']:.0f}%)" for m in methods]
        print(f"| {b} | " + " | ".join(cells) + f" | {rows[methods[1]]['us'] / rows[methods[0]]['us']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
