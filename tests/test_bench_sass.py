"""`lowbit bench sass`: the loop finder on hand-written SASS, and a real sm_90a compile of the KV4
decode kernel (no GPU needed; Triton ships ptxas and cuobjdump)."""
import json
import os
import subprocess
import sys

import pytest

from lowbit.bench.sass import loops

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R1, R1, RZ ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   LDG.E R3, desc[UR4][R2.64] ;
        /*0040*/                   ISETP.GE.AND P0, PT, R3, 0x10, PT ;
        /*0050*/               @!P0 BRA 0x20 ;
        /*0060*/                   FADD R5, R5, R6 ;
        /*0070*/                   FMUL R5, R5, R6 ;
        /*0080*/                   BRA 0x0 ;
        /*0090*/                   BRA 0x90 ;
        /*00a0*/                   EXIT ;
"""


def test_innermost_loops_by_hand():
    # backward branches: 0x50 -> 0x20 (inside 0x80 -> 0x0), 0x80 -> 0x0, and the trailing self-loop
    # 0x90 -> 0x90 (not backward: target == address); the innermost is 0x20..0x50
    (inner,) = loops(SASS)
    assert (inner["start"], inner["end"], inner["instructions"]) == (0x20, 0x50, 4)
    assert inner["mix"] == {"HMMA": 1, "LDG": 1, "ISETP": 1, "BRA": 1}


def test_kv4_decode_compiles_for_hopper_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lowbit.bench", "sass", "--kernel", "decode-kv4", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)
    assert row["kernel"] == "decode-kv4" and row["mix"].get("HMMA", 0) > 0  # fp16 MMAs on the tensor cores
    assert row["spills"] == 0 and "LDL" not in row["mix"]
    assert row["bytes_per_iter"] == 64 * 2 * (64 + 4)  # 64 tokens of int4 K and V (+ fp16 scale, zero), one head
    # both code tiles and the (scale, zero) words arrive by cp.async (at most the block table's 2 loads
    # synchronous) and widen in registers as the MMAs' A operands (token-packed V needs no transpose):
    # 7.8 bytes per warp instruction, where the 4-warp kernel over a V packed along head_dim had 4.9
    assert "LDGSTS" in row["mix"] and row["mix"].get("LDG", 0) <= 2 and row["bytes_per_warp_instruction"] > 7


@pytest.mark.parametrize("kernel,mma", [("w8a8-tma-int8-m4096", "IGMMA"), ("w8a8-tma-fp8-m4096", "QGMMA")])
def test_tma_gemm_compiles_to_tma_loads_feeding_wgmma(kernel, mma):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lowbit.bench", "sass", "--kernel", kernel, "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)
    # the operands arrive by bulk tensor copies (UTMALDG), not per-thread cp.async (LDGSTS), and
    # the int8 / fp8 MMAs are warpgroup MMAs; the output leaves by TMA too
    mix = row["mix"]
    assert mix.get(mma, 0) > 0 and mix.get("UTMALDG", 0) > 0 and mix.get("UTMASTG", 0) > 0
    assert "LDGSTS" not in mix and row["spills"] == 0


def test_decode_config_changes():
    """`--decode-config` rebuilds the decode presets with the given fields (a preset's own changes
    kept unless named), and refuses what is not an integer field of DecodeConfig."""
    pytest.importorskip("triton")
    from lowbit.bench.sass import _decode_preset, _int_fields, presets
    from lowbit.errors import LowbitError

    capped = _decode_preset(4, maxnreg=96)
    assert capped.name == "decode-kv4-maxnreg96" and "decode-kv4" in presets()
    p = _decode_preset(4, **{**dict(capped.changes), **_int_fields(["block_n=32", "num_warps=1"])})
    assert (p.constexprs["BN"], p.num_warps, p.maxnreg) == (32, 1, 96)
    assert p.bytes_per_iter == 32 * 2 * (64 + 4)
    for bad in (["bogus=1"], ["block_n=x"], ["block_n"]):
        with pytest.raises(LowbitError, match="FIELD=INT"):
            _int_fields(bad)


def test_from_json_reprints_rows_named_after_their_files(tmp_path, capsys):
    """`--from-json`: the table of saved rows; with several files each row names its file (before and
    after a change), and a file that is not JSON is one clear error."""
    from lowbit.bench.sass import main
    from lowbit.errors import LowbitError

    row = dict(kernel="decode-kv4", num_warps=1, num_stages=3, loop_instructions=1117, bytes_per_iter=9216,
               bytes_per_warp_instruction=8.25, spills=0, registers=167, shared=12186, programs_per_sm=12,
               mix={"LOP3": 264, "PRMT": 128})
    for name, n in (("old", 935), ("new", 1117)):
        (tmp_path / f"{name}.json").write_text(json.dumps([dict(row, loop_instructions=n)]))
    main(["--from-json", str(tmp_path / "old.json")])
    assert "| decode-kv4 | 1 | 3 | 935 |" in capsys.readouterr().out
    main(["--from-json", str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    out = capsys.readouterr().out
    assert "| decode-kv4 @ old | 1 | 3 | 935 |" in out and "| decode-kv4 @ new | 1 | 3 | 1117 |" in out
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(LowbitError, match="bad.json"):
        main(["--from-json", str(tmp_path / "bad.json")])


def test_row_quantizers_issue_no_division_per_element():
    """The fused quantizers multiply by `qmax / amax` (`actquant._quantize_store`): a division per
    element (div_rn's dozen instructions and slow-path branch) made the SiLU-and-mul one issue-bound
    (45.8 instructions per element, 2.26 TB/s on the H200). Whole-kernel counts, one row per program."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lowbit.bench", "sass", "--kernel", "quant-per-token",
                          "--kernel", "silu-mul-quant", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["kernel"]: r for r in json.loads(out.stdout)}
    per_token, silu = rows["quant-per-token"], rows["silu-mul-quant"]
    assert per_token["bytes_per_iter"] == 4096 * 3 and silu["bytes_per_iter"] == 14336 * 5
    elems = {"quant-per-token": 4096 / 128, "silu-mul-quant": 16384 / 512}  # columns per thread (padded BLOCK)
    for name, row in rows.items():
        assert row["spills"] == 0 and row["mix"].get("BSSY", 0) == 0  # no slow-path calls
        assert row["loop_instructions"] / elems[name] < {"quant-per-token": 14, "silu-mul-quant": 30}[name]
