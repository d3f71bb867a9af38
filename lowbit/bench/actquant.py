"""The fused activation quantizers on the GPU: `python -m lowbit.bench actquant [--tokens T ...] [--sweep]`.

Llama-3-8B's rows: SiLU-and-mul + int8 quantize of the MLP's `[T, 2 x 14336]` (`silu_mul_quant`),
RMSNorm + int8 quantize of `[T, 4096]` (`rmsnorm_quant`, as the decoder layers call them: after the
residual add, in the same pass, beside that add as a kernel of its own before it), and
W4A4's input quantization of `[T, 4096]` (`group_quant`: Atom's gather, int4 groups of 128, 128 int8
outliers). Beside them in the same run: our 16-bit kernels of the bf16 path (`silu_mul`, `rmsnorm`), the
unfused torch ops (the activation, then absmax, division, rounding; for `group_quant`, `formats.quantize`
of each part, the path it replaced). Each row: microseconds, the bytes the op must move (inputs read
once, outputs written once) over the time, and that against the copy roof measured in the same run.
`--sweep` adds `RowConfig`s of `silu_mul_quant`. JSON lines as it goes, actquant.json under --out, a
markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

HIDDEN, MLP = 4096, 14336
SWEEP = [dict(num_warps=8), dict(num_warps=32)] + [dict(chunk=c, num_warps=w) for c in (1024, 2048, 4096) for w in (4, 8)]


def _torch_quant(y: torch.Tensor) -> torch.Tensor:
    s = y.abs().amax(-1, keepdim=True) / 127
    return (y / s).round().clamp(-128, 127).to(torch.int8)


def cases(t: int, sweep: bool) -> dict:
    """name -> (run(), bytes it must move) for `t` tokens."""
    from lowbit.kernels import actquant, elementwise

    dev = torch.device("cuda")
    x = torch.randn(t, 2 * MLP, device=dev, dtype=torch.bfloat16)
    h = torch.randn(t, HIDDEN, device=dev, dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, device=dev, dtype=torch.bfloat16)
    silu_in, norm_in = t * 2 * MLP * 2, t * HIDDEN * 2 + HIDDEN * 2
    out = {"silu_mul_quant": (lambda: actquant.silu_mul_quant_triton(x), silu_in + t * MLP + 4 * t),
           "silu_mul bf16 (ours)": (lambda: elementwise.silu_mul_triton(x), silu_in + t * MLP * 2),
           "silu_mul_quant torch": (lambda: _torch_quant(torch.nn.functional.silu(x[:, :MLP].float()) * x[:, MLP:]),
                                    silu_in + t * MLP + 4 * t),
           "rmsnorm_quant": (lambda: actquant.rmsnorm_quant_triton(h, w, 1e-5), norm_in + t * HIDDEN + 4 * t),
           "rmsnorm bf16 (ours)": (lambda: elementwise.rmsnorm_triton(h, w, 1e-5), norm_in + t * HIDDEN * 2),
           "rmsnorm_quant torch": (lambda: _torch_quant(torch.nn.functional.rms_norm(h.float(), (HIDDEN,), w.float(), 1e-5)),
                                   norm_in + t * HIDDEN + 4 * t)}
    # the decoder's residual add: inside the norm (reads x and the residual, writes their sum and the codes), or
    # a torch add before it (the path it replaced); the same bytes must move either way
    r = torch.randn(t, HIDDEN, device=dev, dtype=torch.bfloat16)
    resid = norm_in + t * HIDDEN * 4
    out["residual + rmsnorm_quant"] = (lambda: actquant.rmsnorm_quant_triton(h, w, 1e-5, r), resid + t * HIDDEN + 4 * t)
    out["add, then rmsnorm_quant"] = (lambda: actquant.rmsnorm_quant_triton(h + r, w, 1e-5), resid + t * HIDDEN + 4 * t)
    out["residual + rmsnorm bf16 (ours)"] = (lambda: elementwise.rmsnorm_triton(h, w, 1e-5, r), resid + t * HIDDEN * 2)
    out["add, then rmsnorm bf16"] = (lambda: elementwise.rmsnorm_triton(h + r, w, 1e-5), resid + t * HIDDEN * 2)
    from lowbit.kernels import reference
    perm = torch.randperm(HIDDEN, device=dev)
    group_bytes = t * HIDDEN * 2 + HIDDEN * 8 + t * (HIDDEN - 128) // 2 + t * 128 + 4 * t * (HIDDEN // 128 + 1)
    out["group_quant"] = (lambda: actquant.group_quant_triton(h, perm, HIDDEN - 128, 0.9, 128), group_bytes)
    out["group_quant torch"] = (lambda: reference.group_quant(h, perm, HIDDEN - 128, 0.9, 128), group_bytes)
    if sweep:
        for kw in SWEEP:
            cfg = actquant.RowConfig(**kw)
            label = " ".join(f"{k}={v}" for k, v in kw.items())
            out[f"silu_mul_quant [{label}]"] = (lambda cfg=cfg: actquant.silu_mul_quant_triton(x, config=cfg),
                                                silu_in + t * MLP + 4 * t)
    return out


def main(argv: list[str] | None = None) -> int:
    from lowbit.bench.env import environment
    from lowbit.bench.kernels import bandwidth, bench_ms, measure_roofs

    p = argparse.ArgumentParser(prog="python -m lowbit.bench actquant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 2048, 16384])
    p.add_argument("--sweep", action="store_true", help="also time RowConfigs of silu_mul_quant")
    p.add_argument("--out", default="out/bench")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowbit.bench actquant needs a CUDA GPU")
        return 2
    result = dict(env=environment(), roofs=measure_roofs(), rows=[])
    print(json.dumps(result["env"]), flush=True)
    copy = result["roofs"]["copy_GBps"]
    for t in a.tokens:
        for name, (fn, nbytes) in cases(t, a.sweep).items():
            row = dict(tokens=t, method=name, **bandwidth(bench_ms(fn), nbytes, result["roofs"]))
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "actquant.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nFused activation quantization, Llama-3-8B rows, {result['env']['device']}, {result['env']['date']}, "
          f"commit {result['env']['commit']}; us (GB/s of the bytes each op must move, % of the {copy:.0f} GB/s copy roof)\n")
    print("| tokens | method | us | GB/s | % copy roof |")
    print("| --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['tokens']} | {r['method']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['roof_pct']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
