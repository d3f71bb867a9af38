"""bench kernels' report: an interrupted run's log read back, and the targets computed from rows; the peers of
bench actquant and bench sampling."""
import json

import pytest
import torch

from lowbit.bench.kernels import read_result, targets
from lowbit.errors import LowbitError

ENV = {"device": "NVIDIA H200", "date": "2026-12-04", "commit": "abc1234", "torch": "2.11", "triton": "3.6"}
ROOFS = {"copy_GBps": 4000.0, "bf16_TFLOPs": 700.0, "fp8_TFLOPs": 1200.0, "int8_mm_TOPs": 850.0}


def _row(method, us, **key):
    return dict(model="llama3-8b", method=method, us=us, roof_pct=50.0, **key)


def test_log_of_an_interrupted_run_reads_back_as_its_result(tmp_path):
    rows = [_row("bf16 cuBLAS", 120.0, m=1), _row("fp8 cuBLAS", 110.0, m=1), _row("W4A8 g128", 60.0, m=1),
            _row("W4A8 g128 [swap=True block_m=16 waves=4]", 40.0, m=1), _row("W4A8 g128", 100.0, m=64),
            _row("KV4 paged", 150.0, batch=64, ctx=4096), _row("SDPA bf16", 450.0, batch=64, ctx=4096)]
    log = tmp_path / "table.md"
    log.write_text("\n".join([json.dumps(ENV), json.dumps(ROOFS)] + [json.dumps(r) for r in rows])
                   + "\nTraceback (most recent call last):\n")  # what a timeout leaves after the rows
    result = read_result(str(log))
    assert result["env"] == ENV and result["roofs"] == ROOFS
    assert result["ms"] == [1, 64] and result["batches"] == [64] and result["contexts"] == [4096]
    assert len(result["linear"]) == 5 and len(result["attention"]) == 2 and result["prefill"] == []
    got = {(t["target"], t["config"]): t["got"] for t in targets(result)}
    # peer time over ours: 120 / 60 and 110 / 60 for the default, 120 / 40 for the swept config (named
    # by its fields away from W4A8Config's defaults)
    assert got[("W4A8 g128 vs bf16 cuBLAS, 8B layer, M=1", "default")] == 2.0
    assert got[("W4A8 g128 vs fp8 cuBLAS, 8B layer, M=1", "default")] == 1.83
    assert got[("W4A8 g128 vs bf16 cuBLAS, 8B layer, M=1", "waves=4")] == 3.0
    assert got[("KV4 decode vs SDPA bf16, batch 64, ctx 4k", "default")] == 3.0


def test_kernels_json_reads_as_written(tmp_path):
    result = dict(env=ENV, roofs=ROOFS, ms=[1], linear=[_row("W4A8 g128", 60.0, m=1)], attention=[])
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(result))
    assert read_result(str(path)) == result


def test_a_file_of_neither_kind_is_refused(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# notes\n{\"method\": \"W4A8 g128\", \"m\": 1, \"us\": 1.0}\n")
    with pytest.raises(LowbitError, match="neither kernels.json nor the log"):
        read_result(str(path))


def test_actquant_benchs_torch_peer_makes_our_codes():
    """The unfused torch peer of `lowbit bench actquant` computes the int8 format the kernels write."""
    from lowbit.bench.actquant import _torch_quant
    from lowbit.kernels import reference, testing
    y = testing.randn((5, 300), testing.gen()).float()  # the peer quantizes fp32 activations
    assert torch.equal(_torch_quant(y), reference.quant_per_token(y)[0])


def test_sampling_benchs_torch_peer_draws_from_the_softmax():
    """The torch exponential race of `lowbit bench sampling` (the sampler's path before its kernel)."""
    from lowbit.bench.sampling import torch_race
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(20000, 1)
    freq = torch.bincount(torch_race(logits, torch.ones(20000)), minlength=4) / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)


def test_prefill_table_sets_our_paths_beside_each_other():
    """The prefill table: each path's time, and the paged kernel's speed against the engine's two paths
    (peer time over ours: 900 / 300 for the gathered rows' KV4, 600 / 1200 for the fresh-prompt path's bf16)."""
    from lowbit.bench.kernels import tables

    key = dict(seqs=16, q_len=1024)
    rows = [_row("SDPA bf16", 325.0, **key), _row("bf16 paged", 600.0, **key), _row("KV4 paged", 900.0, **key),
            _row("bf16 engine", 1200.0, **key), _row("KV4 engine", 450.0, **key),
            _row("bf16 gathered", 400.0, **key), _row("KV4 gathered", 300.0, **key)]
    result = dict(env=ENV, roofs=ROOFS, models=[], ms=[], linear=[], attention=[], prefill=rows, targets=[])
    out = tables(result, markdown=True)
    head = next(line for line in out.splitlines() if line.startswith("| prompts"))
    row = next(line for line in out.splitlines() if line.startswith("| 16 | 1024"))
    cells = dict(zip(head.strip("|").split("|"), row.strip("|").split("|")))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells["KV4 gathered"].startswith("300") and cells["bf16 gathered"].startswith("400")
    assert cells["KV4 paged/gathered"] == "0.33" and cells["bf16 paged/engine"] == "2.00"
