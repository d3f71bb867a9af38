"""Zero-shot tasks read from the shipped files (`lowbit/data/zeroshot/`, see its README), each item
built the way lm-evaluation-harness defines the task, so that accuracies compare with its numbers.

An item is a list of (context, continuation) requests scored by log-likelihood:
- multiple choice (ARC, PIQA, BoolQ): one shared context, one continuation per choice, `" " + choice`;
- WinoGrande (partial scoring): one context per option (the sentence up to the blank with the option
  filled in), one shared continuation (the rest of the sentence);
- LAMBADA: the text less its last word, continuation `" " + last word`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lowbit.data import DATA_DIR
from lowbit.errors import LowbitError

ZEROSHOT_DIR = DATA_DIR / "zeroshot"

MULTIPLE_CHOICE = "multiple_choice"  # the highest log-likelihood among the item's requests wins
LOGLIKELIHOOD = "loglikelihood"  # one request: is its continuation the greedy one, and how likely is it


@dataclass(frozen=True)
class Item:
    requests: tuple[tuple[str, str], ...]  # (context, continuation), one per choice
    gold: int = 0  # index of the right request
    choices: tuple[str, ...] = ()  # the harness's choice strings: acc_norm divides by their length


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str  # MULTIPLE_CHOICE or LOGLIKELIHOOD
    metrics: tuple[str, ...]  # what the harness reports for it
    items: list[Item]


def choice_item(context: str, choices: list[str], gold: int) -> Item:
    """Shared context, `" " + choice` continuations (the harness's default target delimiter)."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold} is out of range for {len(choices)} choices")
    return Item(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _text(doc: dict, key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


# --- one parser per task: a record (dict) -> Item, ValueError/KeyError/TypeError when malformed -----

_ARC_NUMERIC = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def parse_arc(doc: dict) -> Item:
    """AI2 ARC jsonl: `question.stem`, `question.choices[{text, label}]`, `answerKey` ("A".."E" or "1".."5")."""
    question = doc["question"]
    stem = _text(question, "stem")
    choices = question["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"'choices' must be a list of at least 2, got {choices!r}")
    labels = [_ARC_NUMERIC.get(c["label"], c["label"]) for c in choices]
    key = _ARC_NUMERIC.get(doc["answerKey"], doc["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return choice_item(f"Question: {stem}\nAnswer:", [_text(c, "text") for c in choices], labels.index(key))


def parse_piqa(doc: dict) -> Item:
    """`{goal, sol1, sol2}` with `label` (0/1) joined from the separate labels file."""
    context = f"Question: {_text(doc, 'goal')}\nAnswer:"
    return choice_item(context, [_text(doc, "sol1"), _text(doc, "sol2")], doc["label"])


def parse_winogrande(doc: dict) -> Item:
    """Either the shipped layout `{context_options[2], continuation, gold}` or the official release's
    `{sentence with one "_", option1, option2, answer "1"/"2"}` (the blank split here)."""
    if "sentence" in doc:
        sentence = _text(doc, "sentence")
        if "_" not in sentence:
            raise ValueError("the sentence has no '_' blank")
        blank = sentence.index("_")
        contexts = [sentence[:blank] + _text(doc, "option1"), sentence[:blank] + _text(doc, "option2")]
        rest, gold = sentence[blank + 1:], {"1": 0, "2": 1}[doc["answer"]]
    else:
        contexts, rest, gold = doc["context_options"], _text(doc, "continuation"), doc["gold"]
        if not isinstance(contexts, list) or len(contexts) != 2 or not all(isinstance(c, str) and c for c in contexts):
            raise ValueError(f"'context_options' must be 2 non-empty strings, got {contexts!r}")
    if gold not in (0, 1) or isinstance(gold, bool):
        raise ValueError(f"gold must be 0 or 1, got {gold!r}")
    continuation = " " + rest.strip()
    return Item(tuple((c, continuation) for c in contexts), gold, tuple(contexts))


def parse_boolq(doc: dict) -> Item:
    """SuperGLUE BoolQ: `{question, passage, label}`, label true/false (JSON or the strings)."""
    label = {"true": 1, "false": 0, True: 1, False: 0}[doc["label"]]
    context = f"{_text(doc, 'passage')}\nQuestion: {_text(doc, 'question')}?\nAnswer:"
    return choice_item(context, ["no", "yes"], label)


def parse_lambada(doc: dict) -> Item:
    """`{text}`: the target is the last space-separated word (split on " ", as the harness does)."""
    words = _text(doc, "text").split(" ")
    if len(words) < 2 or not words[-1]:
        raise ValueError("the text needs a last word after a space")
    return Item(((" ".join(words[:-1]), " " + words[-1]),))


# --- files ----------------------------------------------------------------------------------------

def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: cannot read ({e})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; `where` is "path:line" for error messages."""
    for n, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise LowbitError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{n}", record


def _piqa_records(data_dir: Path) -> Iterator[tuple[str, dict]]:
    """PIQA ships its labels apart: line i of the labels file is the answer to record i."""
    labels_path = data_dir / "piqa-valid-labels.lst"
    labels = _lines(labels_path)
    records = list(_jsonl(data_dir / "piqa-valid.jsonl"))
    if len(labels) != len(records):
        raise LowbitError(f"{labels_path}: {len(labels)} labels for {len(records)} items in piqa-valid.jsonl")
    for (where, record), (n, label) in zip(records, labels):
        if label.strip() not in ("0", "1"):
            raise LowbitError(f"{labels_path}:{n}: malformed piqa label {label.strip()!r} (expected 0 or 1)")
        yield where, {**record, "label": int(label)}


@dataclass(frozen=True)
class _Spec:
    records: Callable[[Path], Iterator[tuple[str, dict]]]
    parse: Callable[[dict], Item]
    output_type: str
    metrics: tuple[str, ...]


def _file(name: str) -> Callable[[Path], Iterator[tuple[str, dict]]]:
    return lambda data_dir: _jsonl(data_dir / name)


_MC_NORM = (MULTIPLE_CHOICE, ("acc", "acc_norm"))
TASKS = {
    "piqa": _Spec(_piqa_records, parse_piqa, *_MC_NORM),
    "arc_easy": _Spec(_file("arc-easy-test.jsonl"), parse_arc, *_MC_NORM),
    "arc_challenge": _Spec(_file("arc-challenge-test.jsonl"), parse_arc, *_MC_NORM),
    "winogrande": _Spec(_file("winogrande-dev.jsonl"), parse_winogrande, MULTIPLE_CHOICE, ("acc",)),
    "boolq": _Spec(_file("boolq-val.jsonl"), parse_boolq, MULTIPLE_CHOICE, ("acc",)),
    "lambada_openai": _Spec(_file("lambada-openai-test.jsonl"), parse_lambada, LOGLIKELIHOOD, ("acc", "perplexity")),
}
ALIASES = {"lambada": "lambada_openai"}


def load_task(name: str, limit: int | None = None, data_dir: Path = ZEROSHOT_DIR) -> Task:
    """The task's items (the first `limit` of them when given). Every line is checked, also past the limit."""
    spec = TASKS.get(ALIASES.get(name, name))
    if spec is None:
        raise LowbitError(f"unknown task {name!r} (known: {', '.join([*TASKS, *ALIASES])})")
    if limit is not None and limit <= 0:
        raise LowbitError(f"limit must be at least 1, got {limit}")
    name = ALIASES.get(name, name)
    items = []
    for where, record in spec.records(Path(data_dir)):
        try:
            items.append(spec.parse(record))
        except KeyError as e:
            raise LowbitError(f"{where}: malformed {name} line: missing or unknown value {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise LowbitError(f"{where}: malformed {name} line: {e}") from None
    if not items:
        raise LowbitError(f"{name}: no items in {data_dir}")
    return Task(name, spec.output_type, spec.metrics, items[:limit])
