"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on 127.0.0.1 serving the tiny model; plus `lowbit bench throughput|serve`."""
import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lowbit import LLM, SamplingParams
from lowbit.cli import main
from lowbit.engine.async_engine import AsyncLLMEngine
from lowbit.server.openai import build_app

MODEL, KEY = "tiny", "test-key"
PROMPT = "The capital of France is"  # the tiny model answers " is is ... isMahMahMah"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
CHAT = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a busy 2-core machine two spinning intra-op threads make the tiny model ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_dir):
    llm = LLM(model=str(tiny_dir("smollm2")), device="cpu")
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, MODEL, llm.tokenizer, api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=url, llm=llm, engine=engine)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    sock.close()


@pytest.fixture(scope="module")
def ref(server, tiny_dir):
    """A second copy of the model for offline references (the server's runs in its engine thread)."""
    return LLM(model=str(tiny_dir("smollm2")), device="cpu")


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=30, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def offline(ref, prompt, **kw):
    return ref.generate([prompt], SamplingParams(**kw))[0]


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].text if hasattr(c.choices[0], "text") else (c.choices[0].delta.content or "")
                   for c in chunks if c.choices)
    return text, chunks


def scrape(http) -> dict:
    return {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}


def test_health_and_models(server, client, http):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_offline_greedy(client, ref):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    want = offline(ref, PROMPT, temperature=0, max_tokens=12, ignore_eos=True)
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == MODEL
    n_prompt = len(want.prompt_token_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)


def test_token_and_batched_prompts(client, ref):
    ids = ref.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert by_ids.choices[0].text == batch.choices[0].text == batch.choices[1].text
    assert batch.usage.completion_tokens == 4 * 6


@pytest.mark.parametrize("stop", [None, "Mah", ["zzz", "sMa"]])
def test_streamed_completion_concatenates_to_the_full_text(client, stop):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, stop=stop, **GREEDY)
    full = client.completions.create(**kw).choices[0]
    text, chunks = streamed_text(client.completions.create(stream=True, **kw))
    assert text == full.text and chunks[-1].choices[0].finish_reason == full.finish_reason
    if stop is not None:  # the stop string is cut, and so is what follows it
        assert full.finish_reason == "stop" and full.text == " is" * 12 + (" is" if stop == "Mah" else " i")


def test_chat_matches_offline_and_streams(client, ref):
    kw = dict(model=MODEL, messages=CHAT, max_completion_tokens=8, **GREEDY)
    r = client.chat.completions.create(**kw)
    want = ref.chat(CHAT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.apply_chat_template(CHAT)) and r.usage.completion_tokens == 8
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    text, chunks = streamed_text(stream)
    assert text == want.outputs[0].text and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_seeded_samples_match_offline(client, ref):
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=1.0, seed=3, max_tokens=6,
                                  extra_body={"ignore_eos": True})
    want = offline(ref, PROMPT, n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    assert [c.text for c in r.choices] == [o.text for o in want.outputs]
    assert r.choices[0].text != r.choices[1].text and r.usage.completion_tokens == 12


def reference_logprobs(ref, prompt_ids, token_ids):
    """log_softmax of the model's logits at each generated position."""
    ids = torch.tensor([prompt_ids + token_ids[:-1]])
    return ref.model.logits_for_batch(ids)[0, len(prompt_ids) - 1:].log_softmax(-1)


def test_completion_logprobs(client, ref):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=3, **GREEDY)
    want = offline(ref, PROMPT, temperature=0, max_tokens=5, ignore_eos=True).outputs[0].token_ids
    lp = reference_logprobs(ref, ref.tokenizer.encode(PROMPT, add_special_tokens=False), want)
    got = r.choices[0].logprobs
    assert got.tokens == [ref.tokenizer.decode([t]) for t in want]
    assert got.token_logprobs == pytest.approx([lp[i, t].item() for i, t in enumerate(want)], abs=1e-4)
    for i, top in enumerate(got.top_logprobs):
        v, idx = lp[i].topk(3)
        assert top == pytest.approx({ref.tokenizer.decode([t]): x for t, x in zip(idx.tolist(), v.tolist())}, abs=1e-4)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(5)]


def test_chat_logprobs(client, ref):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    prompt_ids = ref.apply_chat_template(CHAT)
    want = ref.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    lp = reference_logprobs(ref, prompt_ids, want.token_ids)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [ref.tokenizer.decode([t]) for t in want.token_ids]
    for i, (c, t) in enumerate(zip(content, want.token_ids)):
        assert c.logprob == pytest.approx(lp[i, t].item(), abs=1e-4) and bytes(c.bytes).decode() == c.token
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(lp[i].topk(2).values.tolist(), abs=1e-4)


def test_64_concurrent_streams(server, ref):
    prompts = [f"Request {i}:" for i in range(64)]
    lens = [4 + i % 5 for i in range(64)]
    want = ref.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens])

    async def one(c, prompt, n):
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
        chunks = [chunk async for chunk in stream]
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, lens))), 60)

    got = asyncio.run(run())
    assert [n for _, n in got] == lens
    assert [t for t, _ in got] == [w.outputs[0].text for w in want]


BAD = [  # (endpoint, body, status); a str body is sent as raw bytes
    ("completions", {"model": "nope", "prompt": "x"}, 404),
    ("completions", {"prompt": 123}, 400),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("completions", '{"prompt": "x",', 400),
    ("completions", {"prompt": [5] * 300}, 400),  # longer than the 256-token context
    ("completions", {"prompt": [5] * 300, "stream": True}, 400),
    ("completions", {"prompt": [5] * 200, "max_tokens": 100}, 400),  # fits alone, not with its output
    ("completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400),
    ("completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400),
    ("completions", {"prompt": "x", "presence_penalty": 1.0}, 400),
    ("completions", {"prompt": []}, 400),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 400}]}, 400),
    ("chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, 400),
    ("chat/completions", {"model": MODEL}, 400),
]


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_bad_requests_get_4xx_and_others_keep_going(server, http, client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as bystander:  # in flight the whole time
        lines = bystander.iter_lines()
        assert next(lines).startswith("data: ")
        for endpoint, bad, status in BAD:
            raw = bad if isinstance(bad, str) else json.dumps(bad)
            assert_openai_error(http.post(f"/v1/{endpoint}", content=raw,
                                          headers={"Content-Type": "application/json"}), status)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers), 401)
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 40
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def leave_mid_stream(server, client):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True, **GREEDY)
    it = iter(stream)
    next(it), next(it)
    assert server.llm.engine.blocks.num_free < server.llm.engine.blocks.num_blocks
    stream.close()


def give_up_waiting(server, client):
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, **GREEDY)


@pytest.mark.parametrize("leave", [leave_mid_stream, give_up_waiting])
def test_a_client_that_leaves_frees_its_blocks(server, client, http, monkeypatch, leave):
    engine = server.llm.engine
    step = engine.step

    def slow_step():  # a few ms a step, so the request cannot finish before the client leaves
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = scrape(http)["lowbit:generation_tokens_total"]
    leave(server, client)
    deadline = time.monotonic() + 10
    while engine.blocks.num_free < engine.blocks.num_blocks or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the abandoned request kept its KV blocks"
        time.sleep(0.01)
    assert scrape(http)["lowbit:generation_tokens_total"] - before < 200  # aborted, not finished


def test_serve_help_names_the_endpoints(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(w in out for w in ("--api-key", "/v1/chat/completions", "curl"))


def test_metrics_move(client, http, ref):
    before = scrape(http)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, **GREEDY)
    after = scrape(http)
    n_prompt = len(ref.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert after["lowbit:prompt_tokens_total"] - before["lowbit:prompt_tokens_total"] == n_prompt
    assert after["lowbit:generation_tokens_total"] - before["lowbit:generation_tokens_total"] == 5
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"lowbit:{hist}_count"] - before[f"lowbit:{hist}_count"] == 1
    assert after["lowbit:num_requests_running"] == after["lowbit:num_requests_waiting"] == 0
    assert after["lowbit:kv_cache_usage_perc"] == 0


def test_prefix_cache_hits_are_counted(server, client, http):
    prompt = " ".join(f"word{i}" for i in range(40))
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    before = scrape(http)["lowbit:prefix_cache_hit_tokens_total"]
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    n = len(server.llm.tokenizer.encode(prompt, add_special_tokens=False))
    bs = server.llm.engine.cfg.block_size
    assert scrape(http)["lowbit:prefix_cache_hit_tokens_total"] - before == (n - 1) // bs * bs > 0


def test_bench_throughput(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--model", str(tiny_dir("smollm2")), "--device", "cpu", "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "3", "--range-ratio", "0.5", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4
    assert result["total_num_tokens"] == result["prompt_tokens"] + result["output_tokens"]
    assert result["requests_per_second"] > 0 and "requests/s" in capsys.readouterr().out


@pytest.mark.parametrize("load", [["--max-concurrency", "2"], ["--request-rate", "50"]])
def test_bench_serve(server, tmp_path, load):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", server.url, "--api-key", KEY, "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "4", "--disable-tqdm", "--output-json", str(out), *load]) == 0
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (6, 0, 24)
    assert result["model"] == MODEL and 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert result["p99_itl_ms"] > 0 and result["mean_tpot_ms"] > 0
