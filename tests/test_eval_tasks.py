"""Zero-shot task files -> items: the shipped files, hand-made lines of every layout, malformed lines."""
import json

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.tasks import LOGLIKELIHOOD, MULTIPLE_CHOICE, TASKS, ZEROSHOT_DIR, load_task

SHIPPED_COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "boolq": 3270,
                  "lambada_openai": 5153}


PIQA = ({"goal": "G", "sol1": "a", "sol2": "b"}, {"goal": "H", "sol1": "c", "sol2": "d"})


def first_record(name: str) -> dict:
    return json.loads((ZEROSHOT_DIR / name).read_text().splitlines()[0])


def write(dir_, name: str, *lines) -> None:
    (dir_ / name).write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


@pytest.mark.parametrize("name", list(TASKS))
def test_every_shipped_line_parses(name):
    task = load_task(name)
    assert len(task.items) == SHIPPED_COUNTS[name]  # the counts in the data README
    for item in task.items:
        assert 0 <= item.gold < len(item.requests)
        assert all(ctx and cont.startswith(" ") for ctx, cont in item.requests)


def test_shipped_first_lines():
    arc = first_record("arc-challenge-test.jsonl")
    item = load_task("arc_challenge", limit=1).items[0]
    q = arc["question"]
    assert item.requests == tuple((f"Question: {q['stem']}\nAnswer:", " " + c["text"]) for c in q["choices"])
    assert item.gold == "ABCD".index(arc["answerKey"])

    piqa = first_record("piqa-valid.jsonl")
    label = int((ZEROSHOT_DIR / "piqa-valid-labels.lst").read_text().split()[0])
    item = load_task("piqa", limit=1).items[0]
    assert item.requests == ((f"Question: {piqa['goal']}\nAnswer:", " " + piqa["sol1"]),
                             (f"Question: {piqa['goal']}\nAnswer:", " " + piqa["sol2"]))
    assert item.gold == label and item.choices == (piqa["sol1"], piqa["sol2"])

    wino = first_record("winogrande-dev.jsonl")
    item = load_task("winogrande", limit=1).items[0]
    assert item.requests == tuple((c, " " + wino["continuation"]) for c in wino["context_options"])
    assert item.gold == wino["gold"]

    boolq = first_record("boolq-val.jsonl")
    item = load_task("boolq", limit=1).items[0]
    ctx = f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:"
    assert item.requests == ((ctx, " no"), (ctx, " yes")) and item.gold == (boolq["label"] == "true")

    text = first_record("lambada-openai-test.jsonl")["text"]
    task = load_task("lambada", limit=1)  # the alias
    assert task.name == "lambada_openai" and task.output_type == LOGLIKELIHOOD
    assert task.items[0].requests == ((text[: text.rindex(" ")], " " + text.split(" ")[-1]),)


def test_shipped_arc_numeric_labels_and_choice_counts():
    lines = [json.loads(ln) for ln in (ZEROSHOT_DIR / "arc-easy-test.jsonl").read_text().splitlines()]
    items = load_task("arc_easy").items
    numeric = next(i for i, d in enumerate(lines) if d["answerKey"].isdigit())
    assert items[numeric].gold == int(lines[numeric]["answerKey"]) - 1
    assert {len(i.requests) for i in items} == {3, 4, 5}


def test_hand_made_arc(tmp_path):
    def arc(labels, key, texts=None):
        texts = texts or [f"t{i}" for i in range(len(labels))]
        return {"question": {"stem": "Why?", "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
                "answerKey": key}

    write(tmp_path, "arc-easy-test.jsonl", arc("1234", "3"), arc("ABC", "C"), arc("ABCDE", "E"), arc("123", "B"))
    items = load_task("arc_easy", data_dir=tmp_path).items
    assert [i.gold for i in items] == [2, 2, 4, 1]  # numeric labels and keys both read as A-E
    assert [len(i.requests) for i in items] == [4, 3, 5, 3]
    assert items[0].requests[0] == ("Question: Why?\nAnswer:", " t0") and items[0].choices[3] == "t3"


def test_hand_made_winogrande_both_layouts(tmp_path):
    official = {"sentence": "The trophy did not fit in the case because the _ was too big.",
                "option1": "trophy", "option2": "case", "answer": "2"}
    derived = {"context_options": ["Ann gave Bo a gift so Ann", "Ann gave Bo a gift so Bo"],
               "continuation": "was generous.", "gold": 0}
    write(tmp_path, "winogrande-dev.jsonl", official, derived)
    a, b = load_task("winogrande", data_dir=tmp_path).items
    assert a.requests == (("The trophy did not fit in the case because the trophy", " was too big."),
                          ("The trophy did not fit in the case because the case", " was too big."))
    assert a.gold == 1
    assert b.requests == (("Ann gave Bo a gift so Ann", " was generous."),
                          ("Ann gave Bo a gift so Bo", " was generous."))
    assert b.gold == 0


def test_hand_made_boolq_piqa_lambada(tmp_path):
    write(tmp_path, "boolq-val.jsonl", {"question": "is it", "passage": "P.", "label": "false"},
          {"question": "is it", "passage": "P.", "label": True})
    items = load_task("boolq", data_dir=tmp_path).items
    assert items[0].requests == (("P.\nQuestion: is it?\nAnswer:", " no"), ("P.\nQuestion: is it?\nAnswer:", " yes"))
    assert [i.gold for i in items] == [0, 1]

    write(tmp_path, "piqa-valid.jsonl", *PIQA)
    write(tmp_path, "piqa-valid-labels.lst", "1", "0")
    items = load_task("piqa", data_dir=tmp_path).items
    assert items[1].requests == (("Question: H\nAnswer:", " c"), ("Question: H\nAnswer:", " d"))
    assert [i.gold for i in items] == [1, 0]

    write(tmp_path, "lambada-openai-test.jsonl", {"text": "He said\n\"go home"}, {"text": "a  b c"})
    items = load_task("lambada_openai", data_dir=tmp_path).items
    assert items[0].requests == (("He said\n\"go", " home"),)  # split on " " only, as the harness does
    assert items[1].requests == (("a  b", " c"),)


@pytest.mark.parametrize("task,file,lines,where,why", [
    ("arc_easy", "arc-easy-test.jsonl", ['{"question": {"stem": "Q", "choices": []}, "answerKey": "A"}'], 1, "choices"),
    ("arc_easy", "arc-easy-test.jsonl", ["", '{"question": {"stem": "Q", "choices": [{"text": "a", "label": "A"}, '
                                            '{"text": "b", "label": "B"}]}, "answerKey": "C"}'], 2, "answerKey 'C'"),
    ("arc_challenge", "arc-challenge-test.jsonl", ['{"question": {"stem": "Q"}, "answerKey": "A"}'], 1, "'choices'"),
    ("boolq", "boolq-val.jsonl", ['{"question": "q", "passage": "p", "label": "maybe"}'], 1, "maybe"),
    ("boolq", "boolq-val.jsonl", ['{"question": "q", "passage": "p", "label": "true"}', "{not json"], 2,
     "not valid JSON"),
    ("winogrande", "winogrande-dev.jsonl", ['{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}'],
     1, "blank"),
    ("winogrande", "winogrande-dev.jsonl", ['{"context_options": ["a", "b"], "continuation": "c", "gold": 2}'], 1,
     "gold"),
    ("winogrande", "winogrande-dev.jsonl", ['["a list"]'], 1, "JSON object"),
    ("lambada", "lambada-openai-test.jsonl", ['{"text": "oneword"}'], 1, "last word"),
    ("lambada", "lambada-openai-test.jsonl", ['{"text": 7}'], 1, "'text'"),
])
def test_malformed_line_names_file_and_line(tmp_path, task, file, lines, where, why):
    write(tmp_path, file, *lines)
    with pytest.raises(LowbitError, match=rf"{tmp_path / file}:{where}: .*{why}"):
        load_task(task, data_dir=tmp_path)


def test_malformed_piqa_labels(tmp_path):
    write(tmp_path, "piqa-valid.jsonl", *PIQA)
    write(tmp_path, "piqa-valid-labels.lst", "0", "2")
    with pytest.raises(LowbitError, match=r"piqa-valid-labels.lst:2: malformed piqa label '2'"):
        load_task("piqa", data_dir=tmp_path)
    write(tmp_path, "piqa-valid-labels.lst", "0")
    with pytest.raises(LowbitError, match="1 labels for 2 items"):
        load_task("piqa", data_dir=tmp_path)


def test_unknown_task_limit_and_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="unknown task 'hellaswag'.*piqa, arc_easy.*lambada"):
        load_task("hellaswag")
    for bad in (0, -3):
        with pytest.raises(LowbitError, match="limit must be at least 1"):
            load_task("piqa", limit=bad)
    task = load_task("arc_easy", limit=5)
    assert len(task.items) == 5 and task.output_type == MULTIPLE_CHOICE and task.metrics == ("acc", "acc_norm")
    with pytest.raises(LowbitError, match="boolq-val.jsonl: cannot read"):
        load_task("boolq", data_dir=tmp_path)
