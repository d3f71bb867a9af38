"""`lowbit eval` end to end on a tiny model: perplexity, tasks and agreement in one JSON object."""
import json

from lowbit.cli import main


def test_eval_reports_tasks_and_agreement(tiny_dir, capsys):
    capsys.readouterr()
    code = main(["eval", "--model", str(tiny_dir("llama3")), "--device", "cpu", "--recipe", "rtn-w4a4kv4",
                 "--ppl", "wikitext2", "--tasks", "piqa,lambada", "--limit", "3", "--kl", "--ctx", "64",
                 "--max-windows", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["perplexity"]["windows"] == 2
    assert set(out["tasks"]["tasks"]) == {"piqa", "lambada_openai"}
    assert out["tasks"]["tasks"]["piqa"]["samples"] == 3
    agree = out["agreement"]
    assert agree["kl_mean"] > 0 and 0 <= agree["top1_agreement"] < 1
    assert abs(agree["ppl"] / out["perplexity"]["ppl"] - 1) < 1e-5  # the same windows, the same model


def test_eval_bad_task_list(capsys):
    capsys.readouterr()
    assert main(["eval", "--tasks", ",", "--device", "cpu"]) == 2
    assert "--tasks is empty" in capsys.readouterr().err
