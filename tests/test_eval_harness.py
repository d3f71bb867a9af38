"""Log-likelihood scoring and zero-shot metrics against a float64 Hugging Face forward of each sequence
on a tiny random model; the lm-evaluation-harness adapter (when lm_eval is installed)."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.errors import LowbitError
from lowbit.eval.harness import (encode_pair, evaluate_tasks, loglikelihood, loglikelihood_tokens, score_tasks,
                                 task_metrics)
from lowbit.eval.tasks import LOGLIKELIHOOD, MULTIPLE_CHOICE, TASKS, Item, Task, choice_item, load_task
from lowbit.models.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(lowbit module, tokenizer, float64 transformers reference) of one tiny random model."""
    path = tiny_dir("smollm2")
    model, tok, _ = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return model, tok, ref


def ref_score(ref, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Direct float64 forward of the whole sequence: sum of log p(cont | ctx), and is cont the argmax."""
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ctx + cont])).logits[0], dim=-1)
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    return rows[range(len(cont)), cont].sum().item(), rows.argmax(-1).tolist() == cont


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_pair_the_harness_way(tiny):
    _, tok, _ = tiny
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")  # the space moves over
    for ctx, cont in [("Question: 2+2?\nAnswer:", " 4"), ("The trophy", " was too big.")]:
        c, k = encode_pair(tok, ctx, cont)
        assert c == encode(tok, ctx) and c + k == encode(tok, ctx + cont)
    c, k = encode_pair(tok, "hel", "lo world")  # "hello" is one token: the whole's tokens past len(context)
    assert len(c) == 1 and k == encode(tok, "hello world")[1:]
    assert encode_pair(tok, "", " hi") == ([tok.bos_token_id], encode(tok, " hi"))


def test_loglikelihood_matches_float64_forward(tiny):
    model, tok, ref = tiny
    requests = [
        ("P. Long passage about nothing much at all.\nQuestion: is it?\nAnswer:", " no"),  # same input as the next
        ("P. Long passage about nothing much at all.\nQuestion: is it?\nAnswer:", " yes"),
        ("Question: Why?\nAnswer:", " Because the sky is blue and the grass is green."),
        ("Sarah was a much better surgeon than Maria so Maria ", "always got the harder cases."),
        ("x", " y"),
    ]
    got = loglikelihood(model, tok, requests, batch_size=2, progress=False)  # padded batches of unequal rows
    for (ll, greedy), (ctx, cont) in zip(got, requests):
        want_ll, want_greedy = ref_score(ref, *encode_pair(tok, ctx, cont))
        assert ll == pytest.approx(want_ll, abs=2e-4) and greedy == want_greedy
    again = loglikelihood(model, tok, requests, batch_size=5, progress=False)
    assert [ll for ll, _ in again] == pytest.approx([ll for ll, _ in got], abs=1e-4)


def test_greedy_flag_and_left_truncation(tiny):
    model, _, ref = tiny
    ctx = torch.randint(3, 49152, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():  # the reference's own greedy continuation, 3 tokens
        ids = torch.tensor([ctx])
        for _ in range(3):
            ids = torch.cat([ids, ref(ids).logits[:, -1:].argmax(-1)], dim=1)
    greedy = ids[0, 12:].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % 49152]
    max_len = model.config.max_position_embeddings  # 256
    long_ctx = torch.randint(3, 49152, (max_len + 40,), generator=torch.Generator().manual_seed(1)).tolist()
    got = loglikelihood_tokens(model, [(ctx, greedy), (ctx, other), (long_ctx, greedy)], batch_size=3, progress=False)
    assert got[0][1] and not got[1][1]
    assert got[0][0] == pytest.approx(ref_score(ref, ctx, greedy)[0], abs=1e-4)
    assert got[1][0] == pytest.approx(ref_score(ref, ctx, other)[0], abs=1e-4)
    whole = (long_ctx + greedy)[-(max_len + 1):]  # the harness keeps the last max_len + 1 tokens
    assert got[2][0] == pytest.approx(ref_score(ref, whole[:-3], whole[-3:])[0], abs=1e-4)
    with pytest.raises(LowbitError, match="continuation of 300 tokens"):
        loglikelihood_tokens(model, [([1], [5] * 300)], progress=False)
    with pytest.raises(LowbitError, match="batch_size"):
        loglikelihood_tokens(model, [([1], [5])], batch_size=0, progress=False)


def test_packed_batches_equal_one_request_at_a_time(tiny):
    """Inputs of very different lengths packed into flat batches (one longer than the token budget, several
    sharing one) score as each request's own unpadded forward does."""
    model, _, _ = tiny
    gen = torch.Generator().manual_seed(2)
    tokens = lambda n: torch.randint(3, 49152, (n,), generator=gen).tolist()  # noqa: E731
    max_len = model.config.max_position_embeddings  # 256

    def alone(ctx, cont):
        whole = (ctx + cont)[-(max_len + 1):]
        with torch.no_grad():
            logits = model.logits_for_batch(torch.tensor([whole[:-1]]))[0, -len(cont):]
        logp = torch.log_softmax(logits, dim=-1)
        return logp[range(len(cont)), cont].sum().item(), logp.argmax(-1).tolist() == cont

    ctx = tokens(90)
    greedy = []
    for _ in range(4):  # the model's own greedy continuation, so that one flag is true
        with torch.no_grad():
            greedy.append(model.logits_for_batch(torch.tensor([ctx + greedy]))[0, -1].argmax().item())
    long_ctx = tokens(250)
    requests = [(tokens(1), tokens(1)), (tokens(3), tokens(40)), (long_ctx, tokens(1)), (long_ctx, tokens(1)),
                (tokens(300), tokens(5)), (ctx, greedy), (tokens(17), tokens(2)), (tokens(120), tokens(9))]
    got = loglikelihood_tokens(model, requests, progress=False, max_tokens_per_batch=200)
    want = [alone(*r) for r in requests]
    assert [g for _, g in got] == [g for _, g in want] and got[5][1]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    with pytest.raises(LowbitError, match="max_tokens_per_batch"):
        loglikelihood_tokens(model, requests, max_tokens_per_batch=0, progress=False)


def test_acc_and_acc_norm_choose_differently(tiny):
    model, tok, _ = tiny
    context, choices = "Question: Pick one.\nAnswer:", ["x", "internationalization"]
    (short, _), (long, _) = loglikelihood(model, tok, [(context, " " + c) for c in choices], progress=False)
    # a random model gives every token about -log(vocab): the one-token choice wins on the sum,
    # the long word (few tokens, many characters) wins per character
    assert short > long and short / len(choices[0]) < long / len(choices[1])
    task = Task("toy", MULTIPLE_CHOICE, ("acc", "acc_norm"), [choice_item(context, choices, gold=1)])
    report = score_tasks(model, tok, [task], progress=False)
    # one item: no sample standard deviation, so no stderr (the harness would divide by n - 1 = 0)
    assert report["tasks"]["toy"] == {"acc": 0.0, "acc_stderr": None, "acc_norm": 1.0, "acc_norm_stderr": None,
                                      "samples": 1, "outcomes": "0"}
    assert report["average_acc_stderr"] is None
    assert report["average_acc"] == 0.0


def test_multiple_choice_and_lambada_metrics(tiny):
    model, tok, ref = tiny
    mc = Task("mc", MULTIPLE_CHOICE, ("acc",), [
        Item((("Ann gave Bo a gift so Ann", " was kind."), ("Ann gave Bo a gift so Bo", " was kind.")), gold=g)
        for g in (0, 1)])
    lam = Task("lam", LOGLIKELIHOOD, ("acc", "perplexity"),
               [Item(((t[: t.rindex(" ")], t[t.rindex(" "):]),)) for t in ("the cat sat on the mat", "we go home")])
    report = score_tasks(model, tok, [mc, lam], batch_size=3, progress=False)
    wino = [ref_score(ref, *encode_pair(tok, *r))[0] for r in mc.items[0].requests]
    assert wino[0] != wino[1]
    # the same pair, once right and once wrong: outcomes (1, 0), sample stddev sqrt(0.5), stderr 0.5
    outcomes = "10" if wino[0] > wino[1] else "01"
    assert report["tasks"]["mc"] == {"acc": 0.5, "acc_stderr": pytest.approx(0.5), "samples": 2, "outcomes": outcomes}
    scores = [ref_score(ref, *encode_pair(tok, *item.requests[0])) for item in lam.items]
    acc = sum(g for _, g in scores) / 2
    want = {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc)),  # sqrt(acc (1 - acc) / (n - 1)), n = 2
            "perplexity": math.exp(-sum(ll for ll, _ in scores) / 2), "samples": 2}
    lam_report = dict(report["tasks"]["lam"])
    assert lam_report.pop("outcomes") == "".join("1" if g else "0" for _, g in scores)
    assert lam_report == pytest.approx(want, rel=1e-5)
    assert report["average_acc"] == pytest.approx((0.5 + want["acc"]) / 2)
    assert report["average_acc_stderr"] == pytest.approx(math.hypot(0.5, want["acc_stderr"]) / 2)
    # metrics from given results, ties resolved to the first choice as numpy's argmax does
    tie = Task("t", MULTIPLE_CHOICE, ("acc", "acc_norm"), [choice_item("c", ["ab", "cd"], gold=0)])
    assert task_metrics(tie, [[(-1.0, False), (-1.0, False)]]) == {"acc": 1.0, "acc_stderr": None, "acc_norm": 1.0,
                                                                   "acc_norm_stderr": None, "samples": 1,
                                                                   "outcomes": "1"}


def test_evaluate_shipped_tasks(tiny):
    model, tok, _ = tiny
    report = evaluate_tasks(model, tok, [*TASKS, "lambada"], limit=1, batch_size=4, progress=False)
    assert list(report["tasks"]) == list(TASKS)  # the alias is the same task, evaluated once
    for name, metrics in report["tasks"].items():
        assert metrics["samples"] == 1
        stderrs = {f"{m}_stderr" for m in TASKS[name].metrics if m != "perplexity"}
        assert set(metrics) == {*TASKS[name].metrics, *stderrs, "samples", "outcomes"}
        assert 0 <= metrics["acc"] <= 1
    assert report["average_acc"] == pytest.approx(sum(m["acc"] for m in report["tasks"].values()) / len(TASKS))
    with pytest.raises(LowbitError, match="no tasks"):
        evaluate_tasks(model, tok, [], progress=False)


# --- lm-evaluation-harness ---------------------------------------------------------------------------

def harness_yaml(dir_, task: str, base: str, docs: list[dict]) -> None:
    """A harness task that includes the harness's own YAML for `base`, reading `docs` from a local file."""
    import lm_eval.tasks

    data = dir_ / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (dir_ / f"{task}.yaml").write_text(
        f"include: {lm_eval.tasks.__path__[0]}/{base}\ntask: {task}\ntag: []\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {dir_ / 'cache'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")


def to_hf_layout(task: str) -> tuple[str, list[dict]]:
    """The harness's YAML and the first shipped lines of a task, rewritten to its Hub dataset's layout."""
    from lowbit.eval.tasks import ZEROSHOT_DIR

    def lines(name, n=3):
        return [json.loads(ln) for ln in (ZEROSHOT_DIR / name).read_text().splitlines()[:n]]

    if task == "arc_challenge":
        return "arc/arc_challenge.yaml", [
            {"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]}}
            for d in lines("arc-challenge-test.jsonl")]
    if task == "piqa":
        labels = (ZEROSHOT_DIR / "piqa-valid-labels.lst").read_text().split()
        return "piqa/piqa.yaml", [{**d, "label": int(l)} for d, l in zip(lines("piqa-valid.jsonl"), labels)]
    if task == "boolq":
        return "super_glue/boolq/default.yaml", [{**d, "label": int(d["label"] == "true")}
                                                 for d in lines("boolq-val.jsonl")]
    if task == "lambada_openai":
        return "lambada/lambada_openai.yaml", lines("lambada-openai-test.jsonl")
    return "winogrande/default.yaml", [  # the shipped file is pre-split: the official layout, by hand
        {"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
         "option2": "case", "answer": "1"},
        {"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "1"}]


@pytest.mark.parametrize("task", ["arc_challenge", "piqa", "boolq", "lambada_openai", "winogrande"])
def test_items_equal_the_harness_requests(tmp_path, task):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lowbit.eval.tasks import parse_winogrande

    base, docs = to_hf_layout(task)
    harness_yaml(tmp_path, f"toy_{task}", base, docs)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    built = manager.load([f"toy_{task}"])["tasks"][f"toy_{task}"]
    built.build_all_requests(rank=0, world_size=1)
    theirs = [tuple(i.args for i in built.instances if i.doc_id == d) for d in range(len(docs))]
    ours = [parse_winogrande(d) for d in docs] if task == "winogrande" else load_task(task, limit=len(docs)).items
    assert [item.requests for item in ours] == theirs
    if task != "lambada_openai":
        gold = built.doc_to_text if task == "winogrande" else built.doc_to_target
        assert [item.gold for item in ours] == [gold(d) for d in built.eval_docs]


def test_lm_eval_adapter(tmp_path, tiny_dir, tiny):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from lowbit.eval.lm_eval_adapter import LowbitLM, rolling_windows

    docs = [{"q": "Pick one.", "choices": ["x", "internationalization"], "gold": 1},
            {"q": "Is it?", "choices": ["no", "yes", "maybe so"], "gold": 0}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\n"
              f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\n")
    (tmp_path / "toy_mc.yaml").write_text(
        "task: toy_mc\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{q}}\\nAnswer:\"\n"
        "doc_to_target: gold\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n" + common)
    (tmp_path / "toy_gen.yaml").write_text(
        "task: toy_gen\noutput_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{choices[gold]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n" + common)
    lm = lm_eval.api.registry.get_model("lowbit").create_from_arg_string(
        f"model={tiny_dir('smollm2')},device=cpu,batch_size=3")
    assert isinstance(lm, LowbitLM) and lm.batch_size == 3
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_gen"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    items = [choice_item(f"Question: {d['q']}\nAnswer:", d["choices"], d["gold"]) for d in docs]
    ours = score_tasks(tiny[0], tiny[1], [Task("toy_mc", MULTIPLE_CHOICE, ("acc", "acc_norm"), items)], progress=False)
    assert out["results"]["toy_mc"]["acc,none"] == ours["tasks"]["toy_mc"]["acc"]
    assert out["results"]["toy_mc"]["acc_norm,none"] == ours["tasks"]["toy_mc"]["acc_norm"]
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["toy_gen"])  # via lowbit.LLM
    assert "exact_match,none" in out["results"]["toy_gen"]

    # loglikelihood_rolling: every token scored exactly once, windows of the model's context
    assert rolling_windows([5, 6, 7, 8, 9], prefix=1, max_len=2) == [([1], [5, 6]), ([6], [7, 8]), ([7, 8], [9])]
    text = "one two three " * 90
    ids = encode(tiny[1], text)
    assert len(ids) > lm.max_length  # more than one window
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    want = sum(ll for ll, _ in loglikelihood_tokens(tiny[0], rolling_windows(ids, 1, lm.max_length), progress=False))
    first = ref_score(tiny[2], [1], ids[: lm.max_length])[0]
    assert got == pytest.approx(want) and got < first < 0
    with pytest.raises(LowbitError, match="batch_size must be a number"):
        LowbitLM(model=str(tiny_dir("smollm2")), batch_size="auto")

    # recipe=: the model is quantized in memory before any scoring
    quant = LowbitLM.create_from_arg_string(f"model={tiny_dir('smollm2')},device=cpu,recipe=rtn-w4a16")
    assert any(getattr(m, "quant_method", None) is not None for m in quant.llm.model.modules())
    request = Instance("loglikelihood", {}, ("Question: Pick one.\nAnswer:", " x"), 0)
    (quantized, _), (full, _) = quant.loglikelihood([request], True)[0], lm.loglikelihood([request], True)[0]
    assert quantized != full
