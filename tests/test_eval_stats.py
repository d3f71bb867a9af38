"""Standard errors of the zero-shot accuracies (lm-evaluation-harness's `acc_stderr`) and the accuracy
table's ± and vs-RTN columns, on numbers worked out by hand."""
import json
import math
import statistics

import pytest

from lowbit.eval.accuracy_table import TASKS, VARIANTS, render, task_stats, versus
from lowbit.eval.harness import acc_stderr, difference_in_stderrs, mean_of_means_stderr, paired_difference
from lowbit.quant.recipes import RECIPES


def test_acc_stderr_by_hand():
    assert acc_stderr(0.5, 101) == pytest.approx(0.05)  # sqrt(0.25 / 100)
    assert acc_stderr(0.8, 17) == pytest.approx(0.1)  # sqrt(0.16 / 16)
    assert acc_stderr(0.75, 4) == pytest.approx(0.25)  # sqrt(0.1875 / 3) = sqrt(1 / 16)
    assert acc_stderr(0.0, 10) == 0.0 and acc_stderr(1.0, 10) == 0.0
    assert acc_stderr(1.0, 1) is None  # one item: no sample standard deviation
    with pytest.raises(ValueError):
        acc_stderr(1.5, 10)


def test_acc_stderr_is_the_sample_stderr_of_the_mean():
    # the harness: mean_stderr(arr) = sample_stddev(arr) / sqrt(len(arr)), on the items' 0/1 outcomes
    outcomes = [1] * 7 + [0] * 13
    want = statistics.stdev(outcomes) / math.sqrt(len(outcomes))
    assert acc_stderr(sum(outcomes) / len(outcomes), len(outcomes)) == pytest.approx(want, rel=1e-12)
    assert acc_stderr(0.35, 20) != pytest.approx(math.sqrt(0.35 * 0.65 / 20))  # not the population form


def test_mean_of_means_and_difference_by_hand():
    assert mean_of_means_stderr([0.03, 0.04]) == pytest.approx(0.025)  # sqrt(0.0009 + 0.0016) / 2
    assert mean_of_means_stderr([0.02] * 4) == pytest.approx(0.01)  # sqrt(4 * 0.0004) / 4
    assert mean_of_means_stderr([0.03, None]) is None
    with pytest.raises(ValueError):
        mean_of_means_stderr([])
    assert difference_in_stderrs(0.45, 0.03, 0.40, 0.04) == pytest.approx(1.0)  # 0.05 / 0.05
    assert difference_in_stderrs(0.40, 0.03, 0.45, 0.04) == pytest.approx(-1.0)
    assert difference_in_stderrs(0.4, None, 0.3, 0.01) is None
    assert difference_in_stderrs(0.4, 0.0, 0.3, 0.0) is None


def test_paired_difference_by_hand():
    # items: both right, a only, b only, a only -> differences 0, 1, -1, 1: mean 0.25,
    # sample variance ((0.25² + 0.75² + 1.25² + 0.75²) / 3) = 11/12, stderr sqrt(11/12 / 4)
    diff, se = paired_difference("1101", "1010")
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(11 / 48))
    assert paired_difference("1100", "1100") == (0.0, 0.0)  # the same answers: no noise at all
    assert paired_difference("1", "0") == (1.0, None)
    with pytest.raises(ValueError):
        paired_difference("10", "101")
    # agreeing items shrink the error below the independent estimate of the same two accuracies
    a, b = "1" * 60 + "0" * 40, "1" * 55 + "0" * 45
    _, paired = paired_difference(a, b)
    assert paired < math.hypot(acc_stderr(0.6, 100), acc_stderr(0.55, 100)) / 3


def _result(name: str, accs: list[float], n: int | None = 100, outcomes: dict | None = None) -> dict:
    tasks = {t: {"acc": a, **({} if n is None else {"samples": n}),
                 **({} if outcomes is None else {"outcomes": outcomes[t]})} for t, a in zip(TASKS, accs)}
    return {"recipe": name, "bits": "w4a16", "bits_per_weight": 4.34, "ppl": 30.0, "calib": "-", "quantize_s": 1.0,
            "device": "cpu", "date": "2026-01-01", "commit": "abc1234", "windows": 1, "ctx": 8, "tokens": 8,
            "tasks": {"tasks": tasks, "average_acc": sum(accs) / len(accs)}, "tasks_s": 1.0}


def test_table_shows_stderr_and_difference_to_rtn(tmp_path):
    # every task at 0.5 over n = 101 items: stderr 0.05 each, the average's sqrt(6 * 0.0025) / 6
    for name, accs in (("bf16", [0.5] * 6), ("w4a16", [0.5] * 6), ("rtn-w4a16", [0.5] * 5 + [0.5 - 6 * 0.02])):
        r = _result(name, accs, n=101)
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    se = math.sqrt(6 * 0.05 ** 2) / 6
    text = render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| `w4a16` |") and "±" in line)
    assert row.count("0.500 ± 0.050") == 6
    assert f"0.5000 ± {se:.4f}" in row
    # averages 0.5 and 0.48, each average's stderr about 0.0204: +0.0200 apart, 0.02 / (0.0204 * sqrt 2) ~ 0.7
    rtn_se = task_stats(_result("rtn-w4a16", [0.5] * 5 + [0.38], n=101))[1][1]
    z = 0.02 / math.hypot(se, rtn_se)
    assert f"| +0.0200 ({z:+.1f} se) |" in row
    rtn_row = next(line for line in text.splitlines() if line.startswith("| `rtn-w4a16` |") and "±" in line)
    assert "se)" not in rtn_row


def test_item_count_from_the_shipped_data_when_not_recorded():
    # older results files: n from the task files (full sets unless a task_limit was recorded)
    per_task, _ = task_stats(_result("bf16", [0.5] * 6, n=None))
    assert per_task["piqa"][1] == pytest.approx(math.sqrt(0.25 / 1837))  # 1838 PIQA validation items
    limited = {**_result("bf16", [0.5] * 6, n=None), "task_limit": 5}
    assert task_stats(limited)[0]["boolq"][1] == pytest.approx(math.sqrt(0.25 / 4))


def test_versus_rtn_is_paired_when_outcomes_are_on_file(tmp_path):
    # every task: 4 items, the recipe right on "1101", RTN on "1010" -> +0.25 each, se sqrt(11/48) each;
    # the average: +0.25 with se sqrt(6 * 11/48) / 6
    mine = _result("w4a16", [0.75] * 6, n=4, outcomes={t: "1101" for t in TASKS})
    rtn = _result("rtn-w4a16", [0.5] * 6, n=4, outcomes={t: "1010" for t in TASKS})
    z = 0.25 / (math.sqrt(6 * 11 / 48) / 6)
    assert versus(mine, rtn) == f"+0.2500 ({z:+.1f} se, paired)"
    # one task without outcomes: the independent estimate
    del rtn["tasks"]["tasks"]["piqa"]["outcomes"]
    z = 0.25 / math.hypot(task_stats(mine)[1][1], task_stats(rtn)[1][1])
    assert versus(mine, rtn) == f"+0.2500 ({z:+.1f} se)"
    for r in (_result("bf16", [0.5] * 6), mine, _result("rtn-w4a16", [0.5] * 6, n=4, outcomes={t: "1010" for t in TASKS})):
        (tmp_path / f"{r['recipe']}.json").write_text(json.dumps(r))
    assert "se, paired) |" in next(line for line in render(tmp_path).splitlines()
                                   if line.startswith("| `w4a16` |") and "±" in line)


def test_per_task_paired_table(tmp_path):
    # "1101" against "1010": per-item differences (0, +1, -1, +1), mean +0.25, se sqrt(11/48) per task
    outcomes = {t: "1101" for t in TASKS}
    rows = [_result("bf16", [0.5] * 6), _result("w4a16", [0.75] * 6, n=4, outcomes=outcomes),
            _result("rtn-w4a16", [0.5] * 6, n=4, outcomes={t: "1010" for t in TASKS}),
            _result("w4a8kv4", [0.75] * 6, n=4, outcomes=outcomes)]  # no RTN row at its bits: left out
    for r in rows:
        (tmp_path / f"{r['recipe']}.json").write_text(json.dumps(r))
    text = render(tmp_path)
    table = text.split("Per task, paired")[1].splitlines()
    row = next(line for line in table if line.startswith("| `w4a16` |"))
    assert row == "| `w4a16` | `rtn-w4a16` | " + " | ".join([f"+0.250 ± {math.sqrt(11 / 48):.3f}"] * 6) + " |"
    assert not any(line.startswith("| `w4a8kv4` |") for line in table)


def test_variant_of_a_variant_is_paired_with_the_rtn_row_of_its_root(tmp_path):
    # w4a16-noclip changes w4a16-gptq, which changes w4a16: its RTN baseline is rtn-w4a16's, its
    # "the recipe's" columns are w4a16-gptq's, and it keeps GPTQ from its parent
    assert VARIANTS["w4a16-noclip"].method == "gptq" and not VARIANTS["w4a16-noclip"].clip_search
    assert VARIANTS["w4a16-gptq"].smoothing is None and RECIPES["w4a16"].smoothing == "awq"
    outcomes = {t: "1101" for t in TASKS}
    rows = [_result("bf16", [0.5] * 6), _result("rtn-w4a16", [0.5] * 6, n=4, outcomes={t: "1010" for t in TASKS}),
            _result("w4a16-gptq", [0.6] * 6), _result("w4a16-noclip", [0.75] * 6, n=4, outcomes=outcomes)]
    rows[2]["ppl"] = 28.0
    for r in rows:
        (tmp_path / f"{r['recipe']}.json").write_text(json.dumps(r))
    text = render(tmp_path)
    paired = next(line for line in text.split("Per task, paired")[1].splitlines() if line.startswith("| `w4a16-noclip` |"))
    assert paired.startswith("| `w4a16-noclip` | `rtn-w4a16` | +0.250 ± ")
    tried = next(line for line in text.split("What else was tried")[1].splitlines() if line.startswith("| `w4a16-noclip` |"))
    assert "| 28.000 |" in tried and "| 0.6000 |" in tried


def test_a_row_measured_under_another_name_says_so(tmp_path):
    rows = [_result("bf16", [0.5] * 6), dict(_result("w4a16", [0.75] * 6), measured_as="w4a16-awq")]
    for r in rows:
        (tmp_path / f"{r['recipe']}.json").write_text(json.dumps(r))
    row = next(line for line in render(tmp_path).splitlines() if line.startswith("| `w4a16` |") and "%" in line)
    assert row.endswith("(as `w4a16-awq`) |")


def test_table_names_rows_measured_on_another_device(tmp_path):
    for name, device in (("bf16", "NVIDIA H200"), ("w4a16", "NVIDIA H200"), ("rtn-w4a16", "x86_64")):
        r = _result(name, [0.5] * 6)
        r["device"] = device
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    head = render(tmp_path).splitlines()[0]
    assert "Device: NVIDIA H200; date 2026-01-01 (measured elsewhere: `rtn-w4a16` on x86_64 (2026-01-01));" in head
