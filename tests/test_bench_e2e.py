"""The end-to-end throughput sweep and the HF peer, on the tiny random-weights model on the CPU."""
from __future__ import annotations

import itertools
import json
import time

import pytest

from lowbit.bench import e2e
from lowbit.cli import main


def test_hf_backend_counts(tmp_path, capsys):
    out = tmp_path / "hf.json"
    assert main(["bench", "throughput", "--backend", "hf", "--random-weights", "--arch", "tiny", "--device", "cpu",
                 "--num-prompts", "5", "--input-len", "12", "--output-len", "6", "--hf-batch-size", "2",
                 "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["num_requests"], r["prompt_tokens"], r["output_tokens"]) == (5, 60, 30) and not r["capped"]
    assert r["total_num_tokens"] == 90 and r["output_tokens_per_second"] > 0
    assert "output tokens/s" in capsys.readouterr().out
    assert main(["bench", "throughput", "--backend", "hf", "--device", "cpu", "--recipe", "fp8",
                 "--random-weights", "--arch", "tiny"]) == 2
    assert "--backend hf runs --random-weights --arch models only" in capsys.readouterr().err


def test_sweep_writes_rows_and_rerenders(tmp_path, capsys):
    out, md = tmp_path / "res", tmp_path / "table.md"
    assert e2e.main(["--device", "cpu", "--out", str(out), "--max-prompts", "3", "--warmup-seqs", "2",
                     "--hf-batch-size", "2", "--markdown", str(md),
                     "tiny:bf16:16/8", "tiny:w4a8kv4:16/8", "tiny:hf:16/8"]) == 0
    rows = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(rows) == ["tiny__bf16__16x8.json", "tiny__hf__16x8.json", "tiny__w4a8kv4__16x8.json"]
    ours = rows["tiny__w4a8kv4__16x8.json"]
    assert (ours["num_requests"], ours["output_tokens"], ours["prompt_tokens"]) == (3, 24, 48)
    assert ours["seqs_in_cache"] > 3 and ours["engine"]["max_num_seqs"] == 2048 and ours["env"]["torch"]
    # every prompt token once, every output token but the last fed back once: nothing preempted, in 1 + 7 steps
    # of one prefill then decodes (the 3 prompts fit one step's budget)
    assert (ours["computed_tokens"], ours["preemptions"], ours["steps"]) == (48 + 24 - 3, 0, 8)
    assert rows["tiny__hf__16x8.json"]["output_tokens"] == 16
    # the clocks each figure ran at: none to read on the CPU
    assert all(r["gpu_clocks"] == {"available": False, "error": "not a CUDA device"} for r in rows.values())
    table = capsys.readouterr().out.split("\n\n", 1)[1]
    assert "| tiny | 16/8 | `w4a8kv4` | 3 |" in table and "HF transformers (float32)" in table
    assert "| tiny | 16/8 | `bf16` | 3 |" in table and "1.00x" in table
    assert md.read_text() == table.rstrip("\n") + "\n"
    assert e2e.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_time_cap_and_budget(tmp_path, monkeypatch, capsys):
    """A workload past --config-time-s is cut (its row says so); no config starts once the budget is spent."""
    out = tmp_path / "res"
    # the run's clock advances 0.1 s per reading (one or two a step): the cap falls after a few steps
    # whatever this machine's speed, long before 490 tokens
    run_clock = itertools.count(0, 0.1)
    monkeypatch.setattr(time, "perf_counter", lambda: next(run_clock))
    assert e2e.main(["--device", "cpu", "--out", str(out), "--max-prompts", "4", "--warmup-seqs", "0",
                     "--config-time-s", "1.0", "tiny:bf16:16/490"]) == 0
    monkeypatch.undo()
    row = json.loads((out / "tiny__bf16__16x490.json").read_text())
    assert row["capped"] and row["num_requests"] < 4 and 0 < row["output_tokens"] < 4 * 490
    assert "capped at 1.0 s" in capsys.readouterr().out

    clock = itertools.count(0, 10)  # each reading of the sweep's clock is 10 s after the last
    monkeypatch.setattr(e2e.time, "monotonic", lambda: next(clock))
    out2 = tmp_path / "res2"
    assert e2e.main(["--device", "cpu", "--out", str(out2), "--max-prompts", "2", "--warmup-seqs", "0",
                     "--budget-s", "45", "--min-config-s", "1", "tiny:bf16:16/4,16/8", "tiny:fp8:16/4"]) == 0
    assert [p.name for p in out2.glob("*.json")] == ["tiny__bf16__16x4.json"]
    assert "budget spent: skipping tiny bf16 16/8" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["tiny:bf16", "tiny:bf16:16x8", "tiny::16/8", "tiny:bf16:0/8"])
def test_bad_spec(tmp_path, capsys, spec):
    assert e2e.main(["--device", "cpu", "--out", str(tmp_path), spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "want ARCH:RECIPE:IN/OUT" in err[0]


def test_hf_batch_sizes_and_the_best_as_the_peer(tmp_path, capsys):
    out = tmp_path / "res"
    assert e2e.main(["--device", "cpu", "--out", str(out), "--max-prompts", "2", "--warmup-seqs", "0",
                     "tiny:hf-b1:16/4", "tiny:hf-b2:16/4", "tiny:w4a8kv4:16/4"]) == 0
    rows = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert rows["tiny__hf-b1__16x4.json"]["engine"] == {"batch_size": 1}
    assert rows["tiny__hf-b2__16x4.json"]["num_requests"] == 2
    rows = {r["recipe"]: r for r in rows.values()}
    best = max(rows["hf-b1"]["output_tokens_per_second"], rows["hf-b2"]["output_tokens_per_second"])
    want = rows["w4a8kv4"]["output_tokens_per_second"] / best
    table = capsys.readouterr().out
    assert table.index("batch 1") < table.index("batch 2")
    assert f"| tiny | 16/4 | `w4a8kv4` | 2 |" in table and f"{want:.2f}x" in table


def test_table_names_the_allocator_settings_of_its_rows():
    from pathlib import Path

    saved = Path(__file__).parents[1] / "results/bench/e2e-h200-echo/llama3-8b__w4a8kv4__1024x512.json"
    row = json.loads(saved.read_text())
    assert "gpu_clocks" not in row  # a row from before the GPU monitor still renders
    assert "PYTORCH_CUDA_ALLOC_CONF" not in e2e.render([row])
    row["env"]["alloc_conf"] = "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True." in e2e.render([row])


def test_throughput_counts_recomputed_tokens_of_preempted_requests():
    """A cache of 24 blocks of 4 tokens for 8 requests of 40: the scheduler preempts, and the recomputed
    tokens show as computed tokens beyond the prompt and fed-back output tokens."""
    from lowbit.api import LLM
    from lowbit.bench import throughput

    llm = LLM(random_weights="tiny", device="cpu", block_size=4, num_kv_blocks=24, max_model_len=64)
    requests = throughput.random_requests(8, 24, 16, 0.0, 256, 0)
    result = throughput.run(llm, [(p, n) for p, n in requests])
    assert result["output_tokens"] == 8 * 16 and result["preemptions"] > 0
    assert result["computed_tokens"] > result["prompt_tokens"] + result["output_tokens"] - 8
    assert result["steps"] >= 16


def test_table_notes_the_clocks_and_preemptions_of_a_row():
    """A row's note says the GPU's mean SM clock and power over its run and the throttle reasons seen
    (not `gpu_idle`), and how many requests were preempted; rows without them (older JSON) say nothing."""
    clocks = {"available": True, "all": {"samples": 10, "sm_mhz_mean": 1755.4, "power_w_mean": 652.0,
                                         "reasons": {"sw_power_cap": 8, "gpu_idle": 1}}}
    assert e2e._clocks(clocks) == "SM 1,755 MHz, 652 W (sw_power_cap 80%)"
    assert e2e._clocks({"available": False, "error": "x"}) == "" and e2e._clocks(None) == ""
    env = {"device": "d", "date": "t", "commit": "c", "torch": "2", "triton": "3", "python": "3.12"}
    row = dict(arch="a", input_len=1, output_len=1, recipe="bf16", dtype="bfloat16", env=env, num_requests=2,
               output_tokens_per_second=10.0, tokens_per_second=20.0, capped=False, preemptions=3, gpu_clocks=clocks)
    old = {k: v for k, v in row.items() if k not in ("preemptions", "gpu_clocks")}
    assert "| 3 preemptions; SM 1,755 MHz, 652 W (sw_power_cap 80%) |" in e2e.render([row])
    assert e2e.render([old]).splitlines()[-1].endswith("| 1.00x |  |  |  |")
