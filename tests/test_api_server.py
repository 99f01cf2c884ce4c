"""The OpenAI-compatible API end to end: uvicorn on a loopback port, real AsyncEngines over tiny ModeGPT
models, driven by the official ``openai`` client and raw httpx.

``tiny-script`` walks a known token cycle (``server.api.testing.SCRIPT``), so its texts are exact;
``tiny-random`` (random weights, alias ``tiny``) is used for sampling, seeds, scoring and batching.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from server.api.testing import RANDOM_MAX_LEN, SCRIPT_MAX_LEN


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=120)


def script_after_hello(stack, n_tokens: int) -> str:
    """The scripted model's greedy continuation of "hello" (the chain's first token), decoded whole."""
    chain = stack.chain
    ids = [chain[(1 + i) % len(chain)] for i in range(n_tokens)]
    return stack.tokenizer.decode(ids)


def sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    out = []
    for b in blocks[:-1]:
        assert b.startswith("data: "), b
        out.append(b[len("data: "):])
    return out


def wait_idle(*engines, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(e.stats().num_running or e.stats().num_waiting for e in engines):
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.02)


def scrape(http) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -------------------------------------------------------------------------------- models / health


def test_models_cards(stack, client, http):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-random", "tiny-script", "tiny"]
    data = http.get("/v1/models").json()
    assert data["object"] == "list"
    cards = {c["id"]: c for c in data["data"]}
    for c in cards.values():
        assert c["object"] == "model" and c["owned_by"] == "modegpt" and isinstance(c["created"], int)
    assert cards["tiny-random"]["max_model_len"] == RANDOM_MAX_LEN and cards["tiny-random"]["parent"] is None
    assert cards["tiny-random"]["root"] == "random:tiny-llama"
    assert cards["tiny-script"]["max_model_len"] == SCRIPT_MAX_LEN
    assert cards["tiny-script"]["parent"] == "tiny-random" and cards["tiny-script"]["root"] == "scripted"
    assert cards["tiny"]["parent"] == "tiny-random" and cards["tiny"]["root"] == "random:tiny-llama"
    assert cards["tiny"]["max_model_len"] == RANDOM_MAX_LEN


def test_health_ok(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""


def test_health_503_until_ready_then_200(stack):
    from server.api.app import build_app
    from server.api.registry import ModelRegistry, ServedModel
    from server.api.testing import ServerThread

    registry = ModelRegistry()
    srv = ServerThread(build_app(registry)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
            r = c.post("/v1/completions", json={"model": "a", "prompt": "hello"})
            assert r.status_code == 503 and r.json()["error"]["code"] == 503
            assert c.get("/v1/models").json()["data"] == []
            registry.add(ServedModel("a", stack.script_engine))
            assert c.get("/health").status_code == 503  # added but not marked ready
            registry.mark_ready()
            assert c.get("/health").status_code == 200
            r = c.post("/v1/completions", json={"model": "a", "prompt": "hello", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == script_after_hello(stack, 3)
            # a second app in the same process has its own metrics registry
            m = c.get("/metrics").text
            assert 'vllm:request_success_total{finished_reason="length",model_name="a",variant="a"} 1.0' in m
            assert 'model_name="tiny-script"' not in m
    finally:
        srv.stop()


def test_health_503_when_an_engine_is_stopped(stack):
    from server.api.app import build_app
    from server.api.registry import ModelRegistry, ServedModel
    from server.api.testing import ServerThread
    from server.engine.async_engine import AsyncEngine

    engine = AsyncEngine("spare", stack.script_engine.engine.config, _script_weights(stack), stack.tokenizer,
                         dtype=torch.float32, kv_cache_bytes=1 << 20)
    registry = ModelRegistry()
    registry.add(ServedModel("spare", engine))
    registry.mark_ready()
    srv = ServerThread(build_app(registry)).start()
    try:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and "spare" in r.json()["error"]["message"]
        engine.start()
        assert httpx.get(f"{srv.url}/health").status_code == 200
        engine.shutdown()
        assert httpx.get(f"{srv.url}/health").status_code == 503
    finally:
        srv.stop()
        engine.shutdown()


def _script_weights(stack):
    from server.api.testing import SCRIPT, scripted_model

    return scripted_model(stack.tokenizer, SCRIPT, eos_after="x")[1]


def test_health_reports_load_failure():
    from server.api.app import build_app
    from server.api.registry import ModelRegistry
    from server.api.testing import ServerThread

    registry = ModelRegistry()
    registry.mark_failed("FileNotFoundError: /nope")
    srv = ServerThread(build_app(registry)).start()
    try:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and "/nope" in r.json()["error"]["message"]
    finally:
        srv.stop()


# -------------------------------------------------------------------------------- completions


def test_non_streaming_exact_text(stack, client):
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=11, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny-script"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.text == " é漢🙂!" == script_after_hello(stack, 11)
    assert c.finish_reason == "length" and c.logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 11, 12)


def test_alias_serves_the_original(client):
    a = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0)
    b = client.completions.create(model="tiny-random", prompt="the quick", max_tokens=6, temperature=0)
    assert a.model == "tiny" and b.model == "tiny-random"
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == 6


def test_streaming_matches_non_streaming_and_never_splits_characters(stack, client, http):
    n = 47  # ends on "!": every character complete
    want = script_after_hello(stack, n)
    chunks = list(client.completions.create(model="tiny-script", prompt="hello", max_tokens=n, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want
    assert all("\ufffd" not in t for t in texts)
    assert len(texts) > 10  # really incremental
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == 1 and chunks[-1].usage.total_tokens == n + 1
    assert all(c.usage is None for c in chunks[:-1])

    # raw SSE framing
    r = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 5,
                                           "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)
    assert set(payloads[0]["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert "".join(p["choices"][0]["text"] for p in payloads) == script_after_hello(stack, 5)


def test_streaming_n2_and_batch_interleave(stack, client):
    chunks = list(client.completions.create(model="tiny-script", prompt=["hello", "x"], n=2, max_tokens=6,
                                            temperature=0, stream=True))
    by_index: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in chunks:
        (ch,) = c.choices
        by_index[ch.index] = by_index.get(ch.index, "") + ch.text
        if ch.finish_reason:
            finish[ch.index] = ch.finish_reason
    assert by_index == {0: script_after_hello(stack, 6), 1: script_after_hello(stack, 6), 2: "", 3: ""}
    assert finish == {0: "length", 1: "length", 2: "stop", 3: "stop"}


def test_choice_layout_n2_batch(stack, http):
    r = http.post("/v1/completions", json={"model": "tiny-script", "prompt": ["hello", "x"], "n": 2,
                                           "max_tokens": 3, "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [" é", " é", "", ""]
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "length", "stop", "stop"]
    assert [c["stop_reason"] for c in r["choices"]] == [None, None, None, None]
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 3 + 3 + 1 + 1, "total_tokens": 10}


def test_eos_and_ignore_eos(client):
    r = client.completions.create(model="tiny-script", prompt="x", max_tokens=5, temperature=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(model="tiny-script", prompt="x", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


# -------------------------------------------------------------------------------- stops


def test_stop_strings(stack, client, http):
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=30, temperature=0, stop="漢")
    assert r.choices[0].text == " é" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 6  # generation ran until the token completing the stop string
    raw = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 30,
                                             "temperature": 0, "stop": ["zzz", "🙂!h"]}).json()
    assert raw["choices"][0]["text"] == " é漢" and raw["choices"][0]["stop_reason"] == "🙂!h"
    # the first stop string to complete wins, even if another one would start earlier
    raw = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 30,
                                             "temperature": 0, "stop": ["🙂!h", "!"]}).json()
    assert raw["choices"][0]["text"] == " é漢🙂" and raw["choices"][0]["stop_reason"] == "!"
    raw = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 30,
                                             "temperature": 0, "stop": "漢",
                                             "include_stop_str_in_output": True}).json()
    assert raw["choices"][0]["text"] == " é漢"
    # stop strings are only looked for after min_tokens: the first "!" is token 11
    raw = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 40,
                                             "temperature": 0, "stop": "!", "min_tokens": 12}).json()
    assert raw["choices"][0]["text"] == " é漢🙂!hello é漢🙂"
    # a stop string that never occurs changes nothing
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=11, temperature=0, stop=["q"])
    assert r.choices[0].text == script_after_hello(stack, 11) and r.choices[0].finish_reason == "length"


def test_streaming_stop_string_is_never_sent(client):
    chunks = list(client.completions.create(model="tiny-script", prompt="hello", max_tokens=30, temperature=0,
                                            stop=["🙂!h"], stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == " é漢"
    assert not any("🙂" in t for t in texts)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(stack, http):
    bang = stack.tokenizer("!", add_special_tokens=False)["input_ids"][0]
    r = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 30,
                                           "temperature": 0, "stop_token_ids": [bang]}).json()
    c = r["choices"][0]
    assert c["text"] == " é漢🙂" and c["finish_reason"] == "stop" and c["stop_reason"] == bang
    assert r["usage"]["completion_tokens"] == 11


def test_stop_string_aborts_the_engine_request(stack, http):
    wait_idle(stack.script_engine)
    before = stack.script_engine.stats().generation_tokens_total
    r = http.post("/v1/completions", json={"model": "tiny-script", "prompt": "hello", "max_tokens": 3000,
                                           "temperature": 0, "stop": "!"}).json()
    assert r["choices"][0]["text"] == " é漢🙂"
    wait_idle(stack.script_engine)
    assert stack.script_engine.stats().generation_tokens_total - before < 200


# -------------------------------------------------------------------------------- logprobs / echo


def test_logprobs_of_generated_tokens(stack, client):
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == " é漢"
    assert lp.tokens == [stack.tokenizer.decode([t]) for t in stack.chain[1:7]]
    assert lp.text_offset == [0, 1, 1, 2, 2, 2]
    assert all(-1e-3 < v <= 0.0 for v in lp.token_logprobs)
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert tok in top and 1 <= len(top) <= 4
        assert top[tok] == max(top.values())


def test_echo_max_tokens_zero_scores_the_prompt(stack, client):
    """How evaluation harnesses score choices: echo + max_tokens 0 + logprobs."""
    prompt = "the quick brown fox jumps"
    ids = stack.tokenizer(prompt)["input_ids"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert lp.tokens == [stack.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    # the values are the model's teacher-forced log-probs
    full = stack.random_engine.score_sync([ids], timeout=60)[0]
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], float(full[i - 1, ids[i]]), abs_tol=1e-4)
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and len(top) <= 2
        best = int(full[i - 1].argmax())
        assert math.isclose(top[stack.tokenizer.decode([best])], float(full[i - 1, best]), abs_tol=1e-4)


def test_echo_scoring_batch_of_choices(stack, client):
    r = client.completions.create(model="tiny-script", prompt=["hello é漢", "hello é", "hello "], max_tokens=0,
                                  echo=True, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == ["hello é漢", "hello é", "hello "]
    for c in r.choices:  # every continuation is the scripted one: probability ~1
        assert c.logprobs.token_logprobs[0] is None
        assert all(-1e-3 < v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert r.choices[0].logprobs.text_offset == [0, 5, 6, 6, 7, 7, 7]


def test_echo_with_generation(stack, client):
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=3, echo=True, logprobs=0,
                                  temperature=0)
    c = r.choices[0]
    assert c.text == "hello é"
    assert c.logprobs.tokens[0] == "hello" and len(c.logprobs.tokens) == 4
    assert c.logprobs.text_offset == [0, 5, 6, 6]
    r = client.completions.create(model="tiny-script", prompt="hello", max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text == "hello é" and r.choices[0].logprobs is None
    chunks = list(client.completions.create(model="tiny-script", prompt="hello", max_tokens=3, echo=True,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "hello é"
    assert chunks[0].choices[0].text.startswith("hello")
    chunks = list(client.completions.create(model="tiny-script", prompt="hello é", max_tokens=0, echo=True,
                                            stream=True))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [("hello é", "length")]


def test_streaming_logprobs(stack, client):
    chunks = list(client.completions.create(model="tiny-script", prompt="hello", max_tokens=6, temperature=0,
                                            logprobs=1, stream=True))
    tokens, offsets = [], []
    for c in chunks:
        tokens += c.choices[0].logprobs.tokens
        offsets += c.choices[0].logprobs.text_offset
    assert tokens == [stack.tokenizer.decode([t]) for t in stack.chain[1:7]]
    assert offsets == [0, 1, 1, 2, 2, 2]


# -------------------------------------------------------------------------------- sampling


def test_seed_reproducibility(client):
    def sample(seed):
        r = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=1.0,
                                      n=2, seed=seed)
        return [c.text for c in r.choices]

    a, b = sample(1234), sample(1234)
    assert a == b
    assert a[0] != a[1]  # the n samples get different seeds
    assert sample(99) != a


def test_prompt_forms_agree(stack, client):
    ids = stack.tokenizer("the lazy dog")["input_ids"]
    forms = ["the lazy dog", ["the lazy dog"], ids, [ids]]
    texts = []
    for p in forms:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
        assert len(r.choices) == 1 and r.usage.prompt_tokens == len(ids)
        texts.append(r.choices[0].text)
    assert len(set(texts)) == 1
    hello = stack.tokenizer("hello")["input_ids"]
    r = client.completions.create(model="tiny", prompt=["the lazy dog", "hello"], max_tokens=8, temperature=0)
    r2 = client.completions.create(model="tiny", prompt=[ids, hello], max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    assert r.choices[0].text == texts[0] and r.usage.prompt_tokens == len(ids) + len(hello)


def test_logit_bias(stack, client):
    hello = stack.tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    r = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=5, temperature=0,
                                  logit_bias={str(hello): 1000})  # clamped to 100, still dominant
    assert r.choices[0].text == "hello" * 5
    base = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=1, temperature=0, logprobs=0)
    first = base.choices[0].logprobs.tokens[0]
    first_id = [t for t in range(300) if stack.tokenizer.decode([t]) == first][0]
    r = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=1, temperature=0, logprobs=0,
                                  logit_bias={str(first_id): -100})
    assert r.choices[0].logprobs.tokens[0] != first


def test_best_of_returns_the_most_likely_sample(client):
    kw = dict(model="tiny", prompt="hello", max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    singles = []
    for i in range(3):
        r = client.completions.create(seed=40 + i, logprobs=0, **kw)
        c = r.choices[0]
        singles.append((sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs), c.text))
    best = max(singles)[1]
    r = client.completions.create(seed=40, best_of=3, n=1, **kw)
    assert len(r.choices) == 1 and r.choices[0].text == best and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 18


def test_penalties_change_greedy_output(client):
    kw = dict(model="tiny", prompt="hello", max_tokens=20, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    pen = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    rep = client.completions.create(extra_body={"repetition_penalty": 5.0}, **kw).choices[0].text
    assert pen != plain and rep != plain


# -------------------------------------------------------------------------------- concurrency


def test_32_concurrent_greedy_equal_one_at_a_time(stack, client):
    prompts = [f"{w} {i}" for i, w in enumerate(["the quick", "a model", "hello world", "continuous"] * 8)]
    kw = dict(model="tiny", max_tokens=12, temperature=0)
    wait_idle(stack.random_engine)
    steps0 = stack.random_engine.stats().num_steps_total
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    steps_alone = stack.random_engine.stats().num_steps_total - steps0

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=120)
        try:
            rs = await asyncio.gather(*[aclient.completions.create(prompt=p, **kw) for p in prompts])
        finally:
            await aclient.close()
        return [r.choices[0].text for r in rs]

    steps1 = stack.random_engine.stats().num_steps_total
    together = asyncio.run(all_at_once())
    steps_together = stack.random_engine.stats().num_steps_total - steps1
    assert together == alone
    assert steps_together < steps_alone / 2  # they really shared engine steps


def test_concurrent_streams_from_threads(stack, client):
    def one(_):
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-script", prompt="hello", max_tokens=25, temperature=0, stream=True))

    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(one, range(8)))
    assert outs == [script_after_hello(stack, 25)] * 8


# -------------------------------------------------------------------------------- disconnects


def _abort_count(http, model="tiny-script") -> float:
    return scrape(http).get(("vllm:request_success_total",
                             (("finished_reason", "abort"), ("model_name", model), ("variant", model))), 0.0)


def test_streaming_disconnect_aborts(stack, http):
    wait_idle(stack.script_engine)
    aborts = _abort_count(http)
    gen0 = stack.script_engine.stats().generation_tokens_total
    body = {"model": "tiny-script", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
    wait_idle(stack.script_engine)
    assert stack.script_engine.stats().generation_tokens_total - gen0 < 4000
    assert _abort_count(http) == aborts + 1


def test_non_streaming_disconnect_aborts(stack, http):
    wait_idle(stack.script_engine)
    aborts = _abort_count(http)
    gen0 = stack.script_engine.stats().generation_tokens_total
    body = {"model": "tiny-script", "prompt": "hello", "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    wait_idle(stack.script_engine)
    assert stack.script_engine.stats().generation_tokens_total - gen0 < 4000
    assert _abort_count(http) == aborts + 1


# -------------------------------------------------------------------------------- metrics


def test_metrics_move(stack, client, http):
    wait_idle(stack.script_engine, stack.random_engine)
    lab = (("model_name", "tiny-script"), ("variant", "tiny-script"))  # no canary: variant = model id
    before = scrape(http)
    client.completions.create(model="tiny-script", prompt="hello é", max_tokens=7, temperature=0)
    after = scrape(http)

    def delta(name, labels=lab):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("vllm:prompt_tokens_total") == 4
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", (("finished_reason", "length"),) + lab) == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    for model in ("tiny-script", "tiny-random"):
        ml = (("model_name", model), ("variant", model))
        assert after[("vllm:num_requests_running", ml)] == 0
        assert after[("vllm:num_requests_waiting", ml)] == 0
        assert 0.0 <= after[("vllm:kv_cache_usage_perc", ml)] <= 1.0
    buckets = lambda name: sorted(float(dict(k[1])["le"]) for k in after  # noqa: E731
                                  if k[0] == f"{name}_bucket" and dict(k[1])["model_name"] == "tiny-script")
    assert buckets("vllm:time_to_first_token_seconds") == [*TTFT_BUCKETS, math.inf]
    assert buckets("vllm:inter_token_latency_seconds") == [*ITL_BUCKETS, math.inf]
    assert buckets("vllm:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, math.inf]
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_kv_usage_gauge_reflects_a_running_request(stack, http):
    body = {"model": "tiny-script", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    lab = (("model_name", "tiny-script"), ("variant", "tiny-script"))  # no canary: variant = model id
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            m = scrape(http)
            assert m[("vllm:num_requests_running", lab)] == 1
            assert m[("vllm:kv_cache_usage_perc", lab)] > 0
    wait_idle(stack.script_engine)
