"""Hardware counters of one kernel launch, read by Nsight Compute (ncu) on the GPU machine.

    python -m lowbit.bench ncu decode-kv4:64:4096 sdpa:64:4096 w4a8:256 fp8:256 --out DIR

A case is `decode-kv4|decode-kv8|sdpa:BATCH:CTX` (Llama-3-8B's attention heads) or
`w4a8|w4a8-chan|w4a16|w8a8|fp8|bf16:M` (Llama-3-8B's gate_up GEMM, N 28672 x K 4096). Each runs in a
child process under `ncu --clock-control none` (the clocks are left as they are); the third launch of
the case's kernel is profiled. Printed, a table row per case: time, DRAM throughput, SM throughput,
issue activity, resident warps, the occupancy limits and the warp stall reasons (cycles per issued
instruction, largest first); the raw CSV is kept under --out (`--from-csv DIR` re-prints it).
This is the profile evidence behind docs/benchmarks.md's "why" notes.
"""
from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

from lowbit.errors import LowbitError

SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis",
            "SchedulerStats"]
# case -> the kernel profiled, by name (cuBLAS and cuDNN name theirs), and the cache's bits (None:
# SDPA in bf16) or for a GEMM the method of `lowbit.bench.kernels` that builds it
ATTENTION = {"decode-kv4": ("_paged_decode_kv4_kernel", 4), "decode-kv8": ("_paged_decode_kernel", 8),
             "sdpa": ("flash|fmha|sdpa", None)}
GEMMS = {"w4a8": ("_w4a8_kernel", "W4A8 g128"), "w4a8-chan": ("_w4a8_kernel", "W4A8 chan"),
         "w4a16": ("_w4a16_kernel", "W4A16 g128"), "w8a8": ("_w8a8_kernel", "W8A8 int8"),
         "fp8": ("gemm|nvjet|sm90|cutlass", "fp8 cuBLAS"), "bf16": ("gemm|nvjet|sm90|cutlass", "bf16 cuBLAS")}
COLUMNS = [  # (heading, metric, scale): the table's columns from ncu's raw page
    ("us", "gpu__time_duration.sum", 1e-3), ("DRAM TB/s", "dram__bytes.sum.per_second", 1e-12),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active", 1),
    ("warps / scheduler", "smsp__warps_active.avg.per_cycle_active", 1),
    ("regs", "launch__registers_per_thread", 1), ("blocks / SM by regs", "launch__occupancy_limit_registers", 1),
    ("by smem", "launch__occupancy_limit_shared_mem", 1), ("L2 hit %", "lts__t_sector_hit_rate.pct", 1)]
STALL = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def _kernel(case: str) -> str:
    name = case.split(":")[0]
    if name not in ATTENTION and name not in GEMMS:
        raise LowbitError(f"unknown case {name!r}: one of {', '.join([*ATTENTION, *GEMMS])}")
    return (ATTENTION[name] if name in ATTENTION else GEMMS[name])[0]


def build(case: str):
    """The case's run(), built on the GPU."""
    _kernel(case)
    from lowbit.bench import kernels
    name, *dims = case.split(":")
    try:
        dims = [int(d) for d in dims]
        if name in ATTENTION:
            batch, ctx = dims
        else:
            (m,) = dims
    except ValueError:
        raise LowbitError(f"bad case {case!r}: want NAME:BATCH:CTX for attention, NAME:M for a GEMM") from None
    if name in ATTENTION:
        bits = ATTENTION[name][1]
        return kernels.sdpa_case("llama3-8b", batch, ctx) if bits is None else \
            kernels.paged_decode_case("llama3-8b", batch, ctx, bits)
    import torch

    from lowbit.kernels import testing
    builders, _ = kernels._gemm_methods(m)
    if GEMMS[name][1] not in builders:
        raise LowbitError(f"{name} has no kernel at M={m}")
    return builders[GEMMS[name][1]][0](28672, 4096, torch.device("cuda"), testing.gen(0, "cuda"))


def launch(case: str) -> None:
    import torch
    run = build(case)
    for _ in range(5):
        run()
    torch.cuda.synchronize()


def parse(text: str) -> dict:
    """ncu's `--csv --page raw` output (one kernel) as {metric: (unit, value)}; {} if it has none."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if len(lines) < 3:
        return {}
    head, units, values = list(csv.reader(io.StringIO("\n".join(lines[:3]))))
    return {h: (u, v) for h, u, v in zip(head, units, values)}


def profile(case: str, out: Path) -> dict:
    """ncu's raw metrics of the case's third kernel launch, as {metric: (unit, value)}."""
    cmd = ["ncu", "--clock-control", "none", "--csv", "--page", "raw", "--kernel-name", f"regex:{_kernel(case)}",
           "--launch-skip", "2", "--launch-count", "1", *[a for s in SECTIONS for a in ("--section", s)],
           sys.executable, "-m", "lowbit.bench", "ncu", "--launch", case]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{case.replace(':', '_')}.csv").write_text(done.stdout + done.stderr)
    metrics = parse(done.stdout)
    if done.returncode or not metrics:
        raise LowbitError(f"ncu gave no metrics for {case} (rc {done.returncode}): "
                          + (done.stderr.strip().splitlines() or ["no output"])[-1])
    return metrics


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def table(rows: list[tuple[str, dict]]) -> str:
    """A markdown row per (case, metrics): the COLUMNS, then the largest stall reasons in cycles
    per issued instruction (a warp's wait between two of its instructions, by cause)."""
    head = ["case", "kernel", *[c[0] for c in COLUMNS], "stalls (cycles / issue)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, metrics in rows:
        cells = [case, metrics.get("Kernel Name", ("", "?"))[1][:32]]
        for _, key, scale in COLUMNS:
            v = _number(metrics.get(key, ("", ""))[1])
            cells.append("-" if v is None else f"{v * scale:.3g}" if scale != 1 else f"{v:g}")
        stalls = sorted(((v, k[len(STALL[0]):-len(STALL[1])]) for k, (_, text) in metrics.items()
                         if k.startswith(STALL[0]) and k.endswith(STALL[1]) and (v := _number(text))), reverse=True)
        cells.append(", ".join(f"{name} {v:.1f}" for v, name in stalls[:4]))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.bench ncu", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", metavar="CASE")
    p.add_argument("--from-csv", type=Path, metavar="DIR", help="summarize the raw CSVs an earlier run kept")
    p.add_argument("--out", type=Path, default=Path("out/ncu"), help="directory for the raw CSV of each case")
    p.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)  # the child ncu profiles
    args = p.parse_args(argv)
    if args.from_csv:
        print(table([(path.stem.replace("_", ":"), parse(path.read_text()))
                     for path in sorted(args.from_csv.glob("*.csv"))]))
        return 0
    if not args.cases:
        raise LowbitError("name at least one case (or --from-csv DIR)")
    if args.launch:
        launch(args.cases[0])
        return 0
    if shutil.which("ncu") is None:
        raise LowbitError("ncu (Nsight Compute) is not on the PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, rc = [], 0
    for case in args.cases:
        try:
            rows.append((case, profile(case, args.out)))
        except LowbitError as e:
            print(f"{case}: {e}", flush=True)
            rc = 1
    print(table(rows))
    return rc
