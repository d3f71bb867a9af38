"""Static instruction counts of our kernels' main loops, compiled for Hopper (sm_90a) on any machine.

    python -m lowbit.bench sass                       # every preset, a table
    python -m lowbit.bench sass --kernel decode-kv4 --json
    python -m lowbit.bench sass --kernel decode-kv4 --decode-config block_n=32 num_warps=1

Triton compiles a kernel for a GPU it does not see (ptxas and cuobjdump ship with it), so the SASS
of a change can be read without a GPU. For each innermost loop (a backward branch and the
instructions it jumps back over) this reports the instruction count per iteration of one thread, the
mix by opcode, and the bytes of operands one iteration of the whole program moves: at the H200's
roof an SM must take in about 16 B per clock, and it issues at most 4 warp instructions per clock, so
bytes per warp instruction bounds the share of the roof a kernel can reach. Local-memory traffic
(LDL/STL: register spills) is counted apart, and the registers and shared memory of a program give
how many programs an SM holds at once. The numbers are what the compiler emits, not what the
GPU achieves: they guide a change, the benchmarks measure it.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError


@dataclasses.dataclass(frozen=True)
class Preset:
    """One kernel launch as the engine makes it: the jit function, argument types, constexprs."""
    name: str
    kernel: str  # module:function
    types: dict  # argument name -> Triton type ("*bf16", "i32", ...); the rest are constexprs
    constexprs: dict
    num_warps: int
    num_stages: int
    bytes_per_iter: int  # operand bytes one loop iteration of one program reads
    note: str
    aligned_ints: tuple = ()  # integer arguments that are multiples of 16 at the engine's shapes
    maxnreg: int | None = None  # the launch's cap on registers per thread
    changes: tuple = ()  # (field, value) pairs of a decode preset's DecodeConfig beside the default
    whole: bool = False  # a loop-free kernel (one row per program): count all of it, bytes per program


def _decode_preset(bits: int, **config) -> Preset:
    """Llama-3-8B's attention (8 KV heads of 128, GQA 4) at the engine's block size 16, the launch
    `paged_decode_attention` makes on a CUDA device (its default DecodeConfig for the cache's width),
    or that launch with some of the config's fields changed (`config`: the sweep's other configs)."""
    import dataclasses

    from lowbit.kernels.paged_attention import default_decode_config

    cfg = dataclasses.replace(default_decode_config(bits), **config)
    maxnreg = config.get("maxnreg")
    cache = {16: "*bf16", 8: "*u8", 4: "*u8"}[bits]
    sz = "*i32" if bits != 16 else "*bf16"  # (scale, zero) fp16 pairs read as 32-bit words
    types = dict(q_ptr="*bf16", kc_ptr=cache, vc_ptr=cache, ksz_ptr=sz, vsz_ptr=sz, bt_ptr="*i32", sl_ptr="*i32",
                 o_ptr="*bf16", po_ptr="*fp32", plse_ptr="*fp32", sm_scale="fp32", stride_qb="i32",
                 stride_qh="i32", stride_bt="i32", per_split="i32")
    d = 128
    per_token = 2 * (d * bits // 8 + (4 if bits != 16 else 0))  # K and V codes (+ fp16 scale, zero) of one head
    name = (f"decode-kv{bits}" if bits != 16 else "decode-bf16") + (f"-maxnreg{maxnreg}" if maxnreg else "")
    name += "".join(f" {k}={v}" for k, v in config.items() if k != "maxnreg")
    kernel, constexprs = "_paged_decode_kernel", dict(HKV=8, GQ=4, D=d, BS=16, BITS=bits, BH=16, BN=cfg.block_n,
                                                       SPLITS=4, ASM=True)
    if bits == 4:  # token-packed V: the transposed kernel, heads padded to 8
        kernel, constexprs = "_paged_decode_kv4_kernel", dict(HKV=8, GQ=4, D=d, BS=16, BH=8, BN=cfg.block_n, SPLITS=4,
                                                              ASM=True)
    return Preset(name, f"lowbit.kernels.paged_attention:{kernel}", types, constexprs,
                  cfg.num_warps, cfg.num_stages, cfg.block_n * per_token,
                  f"paged decode attention, {bits}-bit cache, {cfg.block_n} tokens per iteration",
                  ("stride_qb", "stride_qh", "stride_bt", "per_split"), cfg.maxnreg, tuple(config.items()))


def _prefill_preset(bits: int) -> Preset:
    """The prefill attention kernel at Llama-3-8B's heads as `paged_prefill_attention_triton` launches it
    (its default PrefillConfig)."""
    from lowbit.kernels.paged_prefill import PrefillConfig

    cfg = PrefillConfig()
    cache = {16: "*bf16", 8: "*u8", 4: "*u8"}[bits]
    sz = "*i32" if bits != 16 else "*bf16"  # (scale, zero) fp16 pairs read as 32-bit words
    types = dict(q_ptr="*bf16", kc_ptr=cache, vc_ptr=cache, ksz_ptr=sz, vsz_ptr=sz, bt_ptr="*i32", sl_ptr="*i32",
                 cu_ptr="*i32", seqs_ptr="*i32", o_ptr="*bf16", sm_scale="fp32", stride_qt="i32", stride_qh="i32",
                 stride_ot="i32", stride_oh="i32", stride_bt="i32")
    d, gq = 128, 4
    per_token = 2 * (d * bits // 8 + (4 if bits != 16 else 0))
    return Preset("prefill-" + (f"kv{bits}" if bits != 16 else "bf16"),
                  "lowbit.kernels.paged_prefill:_paged_prefill_kernel", types,
                  dict(HKV=8, GQ=gq, GP=gq, D=d, BS=16, BITS=bits, BMT=cfg.block_m // gq, BN=cfg.block_n, ASM=True),
                  cfg.num_warps, cfg.num_stages, cfg.block_n * per_token,
                  f"paged prefill attention, {bits}-bit cache, {cfg.block_m} rows x {cfg.block_n} tokens per iteration",
                  ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt"))


def _w4a8_preset(m: int, tma: bool = False, **changes) -> Preset:
    """The W4A8 GEMM at Llama-3-8B's gate_up (N 28672, K 4096) as `w4a8_gemm` launches it for M <= 64
    tokens (its default config; two K-splits, which only changes the epilogue; above 64 tokens the
    weight is widened to int8 and the W8A8 kernel runs); `tma`: with that config's `tma` switch on;
    `changes`: other W4A8Config fields (a config of the sweep)."""
    from lowbit.kernels.w4a8 import default_config

    cfg = dataclasses.replace(default_config(m), **changes)
    x, w = ("*i8", "*u8") if not tma else (f"tensordesc<i8[{cfg.block_m}, 64]>", f"tensordesc<u8[{cfg.block_n}, 64]>")
    types = dict(x_ptr=x, xs_ptr="*fp32", w_ptr=w, s1_ptr="*fp32", zs_ptr="*i32",
                 out_ptr="*bf16", ws_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
                 stride_xm="i32", stride_wn="i32", stride_om="i32")
    # one K-step reads a group of 128 int4 codes and its zero and scale word for each of BN channels from
    # memory (the activations are re-read by every channel tile: from L2)
    name = f"w4a8{'-tma' if tma else ''}-m{m}" + "".join(f"-{k}{v}" for k, v in changes.items())
    return Preset(name, "lowbit.kernels.w4a8:_w4a8_kernel", types,
                  dict(GROUPED=True, SWAP=cfg.swap, SCALE_ACC=cfg.scale_acc, BM=cfg.block_m, BN=cfg.block_n,
                       SPLIT_K=2, GROUP_M=cfg.group_m, ASM=True, TMA=tma),
                  cfg.num_warps, cfg.num_stages, cfg.block_n * (64 + 4),
                  f"W4A8 g128 GEMM, M = {m}, one group of 128 per iteration{', tiles by TMA' if tma else ''}",
                  ("N", "K", "stride_xm", "stride_wn", "stride_om"))


def _w8a8_tma_preset(m: int, fp8: bool) -> Preset:
    """The TMA-fed W8A8 GEMM at Llama-3-8B's gate_up as `w8a8_gemm` launches it for M tokens. Its
    tile loop and K loop are flattened into one, so the count includes the epilogue's share."""
    from lowbit.kernels.w8a8 import default_config

    cfg = default_config(m, fp8)
    t = "fp8e4nv" if fp8 else "i8"
    out_n = cfg.block_n // (2 if cfg.split_store else 1)
    types = dict(x_desc=f"tensordesc<{t}[{cfg.block_m}, {cfg.block_k}]>",
                 w_desc=f"tensordesc<{t}[{cfg.block_n}, {cfg.block_k}]>",
                 out_desc=f"tensordesc<bf16[{cfg.block_m}, {out_n}]>", xs_ptr="*fp32", cs_ptr="*fp32",
                 M="i32", N="i32", K="i32")
    return Preset(f"w8a8-tma-{'fp8' if fp8 else 'int8'}-m{m}", "lowbit.kernels.w8a8_tma:_w8a8_tma_kernel", types,
                  dict(FP8=fp8, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
                       WS=cfg.warp_specialize, SPLIT_STORE=cfg.split_store),
                  cfg.num_warps, cfg.num_stages, (cfg.block_m + cfg.block_n) * cfg.block_k,
                  f"W8A8 {'fp8' if fp8 else 'int8'} GEMM through TMA, M = {m}, one K-step of {cfg.block_k} per iteration",
                  ("N", "K"))


def _w4a16_preset(m: int) -> Preset:
    """The W4A16 GEMM (GPTQ's g128 asymmetric) at Llama-3-8B's gate_up as `w4a16_gemm` launches it
    for M tokens below DEQUANT_MIN_M (its default config; two K-splits)."""
    from lowbit.kernels.w4a16 import default_config

    cfg = default_config(m)
    types = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*fp32", z_ptr="*fp32", out_ptr="*bf16", ws_ptr="*fp32",
                 lock_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32", stride_om="i32",
                 GROUP="i32")
    return Preset(f"w4a16-m{m}", "lowbit.kernels.w4a16:_w4a16_kernel", types,
                  dict(GROUP64=False, SWAP=cfg.swap, BM=cfg.block_m, BN=cfg.block_n, SPLIT_K=2, GROUP_M=cfg.group_m,
                       ASM=True),
                  cfg.num_warps, cfg.num_stages, cfg.block_n * (64 + 4 + 4),
                  f"W4A16 g128 GEMM, M = {m}, 128 columns per iteration",
                  ("N", "K", "stride_xm", "stride_wn", "stride_om", "GROUP"))


def _w4a4_preset(m: int, even_k: bool = True, **changes) -> Preset:
    """The W4A4 + int8 outliers GEMM (Atom) at Llama-3-8B's gate_up (N 28672, K 4096: 3968 int4 channels in
    whole groups, 128 outliers) as `w4a4_gemm` launches it for M tokens (its default config, two K-splits);
    `changes`: other TileConfig fields; `even_k=False`: the loads masked along K, as for a short last group
    (and for every shape before `EVEN_K`)."""
    from lowbit.kernels.w4a4 import default_config

    cfg = dataclasses.replace(default_config(m), **changes)
    types = dict(x4_ptr="*u8", xs4_ptr="*fp32", x8_ptr="*i8", xs8_ptr="*fp32", w4_ptr="*u8", ws4_ptr="*fp32",
                 w8_ptr="*i8", ws8_ptr="*fp32", out_ptr="*bf16", ws_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32",
                 K4="i32", KO="i32", stride_x4="i32", stride_xs4="i32", stride_x8="i32", stride_w4="i32",
                 stride_ws4="i32", stride_w8="i32", stride_om="i32")
    name = f"w4a4-m{m}" + "".join(f"-{k}{v}" for k, v in changes.items()) + ("" if even_k else "-masked")
    # one group step reads 128 int4 codes of each of BN channels and their fp32 scale (the activations: from L2)
    return Preset(name, "lowbit.kernels.w4a4:_w4a4_kernel", types,
                  dict(BM=cfg.block_m, BN=cfg.block_n, BKO=128, SPLIT_K=2, GROUP_M=cfg.group_m, SWAP=cfg.swap,
                       EVEN_K=even_k, ASM=True),
                  cfg.num_warps, cfg.num_stages, cfg.block_n * (64 + 4),
                  f"W4A4 + outliers GEMM, M = {m}, one group of 128 per iteration",
                  ("N", "K4", "stride_x4", "stride_w4", "stride_ws4", "stride_om", "stride_w8", "stride_x8"))


def _row_preset(name: str, kernel: str, types: dict, constexprs: dict, width: int, bytes_per_col: int) -> Preset:
    """A row kernel (one token's row per program, no loop) at Llama-3-8B's widths, launched as its
    wrapper launches it: `bytes_per_col` is what one column of the row reads and writes."""
    from lowbit.kernels.actquant import _launch_rows

    launch = _launch_rows(width)
    return Preset(name, kernel, types, {**constexprs, "BLOCK": launch["BLOCK"]}, launch["num_warps"], 1,
                  width * bytes_per_col, f"one row of {width} per program (the whole kernel)",
                  tuple(n for n, t in types.items() if t == "i32"), whole=True)


def _row_presets() -> list[Preset]:
    """The fused activation quantizers at Llama-3-8B's rows: the norms' 4096 (int8 codes, with and
    without the residual add), SiLU-and-mul's 14336, and the o_proj input's plain per-token codes."""
    norm = dict(x_ptr="*bf16", r_ptr="*bf16", rout_ptr="*bf16", w_ptr="*bf16", perm_ptr="*i32", q_ptr="*i8",
                s_ptr="*fp32", H="i32", eps="fp32", stride_x="i32", stride_r="i32")
    silu = dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", I="i32", stride_x="i32")
    rows = "lowbit.kernels.actquant:_rownorm_quant_kernel"
    return [_row_preset("rmsnorm-quant", rows, norm, dict(NORM=True, RESID=False, PERM=False, FP8=False), 4096, 3),
            _row_preset("rmsnorm-quant-resid", rows, norm, dict(NORM=True, RESID=True, PERM=False, FP8=False), 4096, 7),
            _row_preset("quant-per-token", rows, norm, dict(NORM=False, RESID=False, PERM=False, FP8=False), 4096, 3),
            _row_preset("silu-mul-quant", "lowbit.kernels.actquant:_silu_mul_quant_kernel", silu,
                        dict(FP8=False, TWO_PASS=False), 14336, 5)]


def _kv_write_preset(bits: int, tokens_packed: bool) -> Preset:
    """The KV cache write (`kv_cache_write`, one token's 8 kv heads of 128 per program, with the echo) for
    Llama-3-8B at block size 16: the int4 K or token-packed V, or int8, counted whole."""
    types = dict(x_ptr="*bf16", cache_ptr="*u8", sz_ptr="*fp16", slot_ptr="*i64", echo_ptr="*bf16", stride_t="i32",
                 stride_h="i32", n_tokens="i32")
    name = f"kv-write-{'v' if tokens_packed else 'k'}{bits}"
    return Preset(name, "lowbit.kernels.paged_attention:_kv_write_kernel", types,
                  dict(HKV=8, BS=16, D=128, BITS=bits, BH=8, ECHO=True, TOKENS_PACKED=tokens_packed), 4, 1,
                  8 * 128 * 2 * 2 + 8 * (128 * bits // 8 + 4), "one token's K or V per program (the whole kernel)",
                  ("stride_t", "stride_h"), whole=True)


def presets() -> dict[str, Preset]:
    return {p.name: p for p in (_decode_preset(4), _decode_preset(8), _decode_preset(16),
                                _prefill_preset(4), _prefill_preset(8), _prefill_preset(16),
                                _w4a8_preset(1), _w4a8_preset(64), _w4a8_preset(1, True), _w4a8_preset(64, True),
                                _w8a8_tma_preset(4096, False),
                                _w8a8_tma_preset(4096, True), _w4a16_preset(1), _w4a4_preset(1),
                                _w4a4_preset(1, swap=False), _w4a4_preset(1, even_k=False, swap=False),
                                *(_w4a4_preset(m, even_k=e) for m in (64, 4096) for e in (True, False)),
                                *_row_presets(), _kv_write_preset(4, False), _kv_write_preset(4, True),
                                _kv_write_preset(8, False))}


def _jit_function(path: str):
    import importlib

    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def compile_sm90(preset: Preset) -> tuple[bytes, int]:
    """The preset's cubin for sm_90a (no GPU needed) and its shared memory per program in bytes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise LowbitError("sass: TRITON_INTERPRET=1 is set; the interpreter compiles nothing (unset it)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        raise LowbitError("sass: needs triton (pip install triton)") from None
    fn = _jit_function(preset.kernel)
    names = fn.arg_names
    unknown = sorted((set(preset.types) | set(preset.constexprs)) - set(names))
    if unknown:
        raise LowbitError(f"sass: {preset.name}: {fn.__name__} has no argument(s) {', '.join(unknown)}")
    signature = {n: preset.types.get(n, "constexpr") for n in names}
    # as Triton's launcher specializes: 16-byte aligned pointers (torch's allocations) and ints % 16 == 0
    aligned = [n for n, t in preset.types.items() if t.startswith("*") or n in preset.aligned_ints]
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in preset.constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=preset.num_warps, num_stages=preset.num_stages,
                                           maxnreg=preset.maxnreg))
    return compiled.asm["cubin"], compiled.metadata.shared


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton.backends.nvidia as nv  # the backend ships ptxas and cuobjdump

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not tool.is_file():
        raise LowbitError(f"sass: no cuobjdump at {tool}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], check=True, capture_output=True, text=True).stdout


def disassemble(cubin: bytes) -> str:
    return _cuobjdump(cubin, "-sass")


def registers(cubin: bytes) -> int:
    """Registers per thread, as ptxas allocated them."""
    m = re.search(r"REG:(\d+)", _cuobjdump(cubin, "-res-usage"))
    if m is None:
        raise LowbitError("sass: cuobjdump -res-usage reported no register count")
    return int(m.group(1))


def programs_per_sm(regs: int, shared: int, warps: int) -> int:
    """Resident programs per H100/H200 SM: 64K registers, 228 KB of shared memory (1 KB of it
    reserved per block), 64 warps."""
    return min(65536 // (regs * 32 * warps), (228 * 1024) // (shared + 1024), 64 // warps)


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?\.?L?_?x?(0x[0-9a-f]+)")


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, opcode without predicate or modifiers) of every instruction."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
            out.append((int(m.group(1), 16), text))
    return out


def loops(sass: str) -> list[dict]:
    """Innermost loops: `[start, end]` address ranges that a backward branch closes and that hold no
    other such range, each with its instruction count and opcode mix."""
    ins = instructions(sass)
    ranges = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and text.startswith("BRA") and int(m.group(1), 16) < addr:
            ranges.append((int(m.group(1), 16), addr))
    inner = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    result = []
    for start, end in inner:
        mix = collections.Counter(text.split()[0].split(".")[0] for a, text in ins if start <= a <= end)
        result.append(dict(start=start, end=end, instructions=sum(mix.values()), mix=dict(mix.most_common())))
    return result


def report(preset: Preset) -> dict:
    cubin, shared = compile_sm90(preset)
    sass = disassemble(cubin)
    if preset.whole:
        mix = collections.Counter(text.split()[0].split(".")[0] for _, text in instructions(sass))
        body = dict(instructions=sum(mix.values()), mix=dict(mix.most_common()))
    else:
        body = max(loops(sass), key=lambda lp: lp["instructions"], default=None)
    if body is None:
        raise LowbitError(f"sass: {preset.name}: no loop in the compiled kernel")
    warps, mix, regs = preset.num_warps, body["mix"], registers(cubin)
    return dict(kernel=preset.name, note=preset.note, num_warps=warps, num_stages=preset.num_stages,
                constexprs=preset.constexprs, loop_instructions=body["instructions"],
                warp_instructions=body["instructions"] * warps, bytes_per_iter=preset.bytes_per_iter,
                bytes_per_warp_instruction=round(preset.bytes_per_iter / (body["instructions"] * warps), 2),
                spills=mix.get("LDL", 0) + mix.get("STL", 0), registers=regs, shared=shared,
                programs_per_sm=programs_per_sm(regs, shared, warps), mix=mix)


def render(rows: list[dict]) -> str:
    lines = ["| kernel | warps | stages | instructions / iteration (thread) | bytes / iteration | B / warp instruction "
             "| spill LDL+STL | registers | shared KB | programs / SM | top opcodes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["mix"].items())[:8])
        lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['loop_instructions']} | "
                     f"{r['bytes_per_iter']} | {r['bytes_per_warp_instruction']} | {r['spills']} | {r['registers']} | "
                     f"{r['shared'] / 1024:.1f} | {r['programs_per_sm']} | {top} |")
    return "\n".join(lines)


def _int_fields(pairs: list[str]) -> dict[str, int]:
    """`["block_n=32", ...]` -> {"block_n": 32, ...}; a clear error for anything else."""
    from lowbit.kernels.paged_attention import DecodeConfig

    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields or not value.lstrip("-").isdigit():
            raise LowbitError(f"sass: --decode-config wants FIELD=INT with FIELD one of {sorted(fields)}, got {pair!r}")
        out[key] = int(value)
    return out


def main(argv=None) -> None:
    known = presets()
    p = argparse.ArgumentParser(prog="lowbit bench sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", action="append", choices=sorted(known), help="preset(s) to compile (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--decode-config", nargs="+", metavar="FIELD=INT",
                   help="decode presets with these DecodeConfig fields changed, e.g. block_n=32 num_warps=1")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="print the table of earlier --json outputs (with several, each row named after its file)")
    args = p.parse_args(argv)
    if args.from_json:
        rows = []
        for path in map(Path, args.from_json):
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise LowbitError(f"sass: cannot read {path}: {e}") from None
            rows += [dict(r, kernel=f"{r['kernel']} @ {path.stem}") if len(args.from_json) > 1 else r for r in part]
        print(render(rows))
        return
    names = args.kernel or sorted(known)
    if args.decode_config:
        changes = _int_fields(args.decode_config)
        rows = [report(_decode_preset(known[n].constexprs.get("BITS", 4), **{**dict(known[n].changes), **changes})
                       if n.startswith("decode-") else known[n]) for n in names]
    else:
        rows = [report(known[name]) for name in names]
    print(json.dumps(rows, indent=1) if args.json else render(rows))


if __name__ == "__main__":
    main()
