"""Bad input to the real server (uvicorn on loopback, real engines): always a 4xx with the OpenAI error
shape and the offending field in ``param``; never FastAPI's 422, never a 5xx, never a traceback."""
from __future__ import annotations

import httpx
import openai
import pytest

from server.api.testing import RANDOM_MAX_LEN



def assert_error(r: httpx.Response, status: int, param: str | None, err_type: str = "BadRequestError") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == err_type
    assert err["code"] == status
    assert err["param"] == param
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


BASE = {"model": "tiny-random", "prompt": "hello", "max_tokens": 2, "ignore_eos": True}

FIELD_CASES = [
    # (overrides, param)
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1, 2], "a"]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [[99999]]}, "prompt"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "abc"}, "max_tokens"),
    ({"max_tokens": 1e30}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": "many"}, "n"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "n": 1, "stream": True}, "best_of"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream_options": 5, "stream": True}, "stream_options"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"suffix": "tail"}, "suffix"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"echo": "sometimes"}, "echo"),
    ({"stream": [True]}, "stream"),
    ({"model": 5}, "model"),
    ({"user": {"id": 1}}, "user"),
]


@pytest.mark.parametrize("overrides,param", FIELD_CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(FIELD_CASES)])
def test_invalid_field_is_400_with_param(http, overrides, param):
    assert_error(http.post("/v1/completions", json={**BASE, **overrides}), 400, param)


STREAM_CASES = [(o, p) for o, p in FIELD_CASES if "stream" not in o and "stream_options" not in o]


@pytest.mark.parametrize("overrides,param", STREAM_CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(STREAM_CASES)])
def test_invalid_streaming_request_is_400_before_any_event(http, overrides, param):
    """Streaming requests are validated completely before the 200 and the first SSE event."""
    assert_error(http.post("/v1/completions", json={**BASE, **overrides, "stream": True}), 400, param)


def test_unknown_model_is_404(http):
    err = assert_error(http.post("/v1/completions", json={**BASE, "model": "gpt-17"}), 404, "model", "NotFoundError")
    assert "gpt-17" in err["message"]


def test_prompt_over_context_is_400_input_tokens(http):
    err = assert_error(http.post("/v1/completions", json={**BASE, "prompt": [5] * (RANDOM_MAX_LEN + 1)}),
                       400, "input_tokens")
    assert str(RANDOM_MAX_LEN) in err["message"] and str(RANDOM_MAX_LEN + 1) in err["message"]


def test_prompt_plus_max_tokens_over_context_is_400_max_tokens(http):
    n_in = RANDOM_MAX_LEN - 10
    err = assert_error(http.post("/v1/completions", json={**BASE, "prompt": [5] * n_in, "max_tokens": 16}),
                       400, "max_tokens")
    assert f"16 > {RANDOM_MAX_LEN} - {n_in}" in err["message"]
    # the same prompt with a budget that fits is fine; a batch fails if any of its prompts is too long
    ok = http.post("/v1/completions", json={**BASE, "prompt": [5] * n_in, "max_tokens": 10, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 10
    assert_error(http.post("/v1/completions", json={**BASE, "prompt": [[5], [5] * n_in], "max_tokens": 16}),
                 400, "max_tokens")


def test_echo_scoring_may_fill_the_whole_context(http):
    r = http.post("/v1/completions", json={**BASE, "prompt": [5] * RANDOM_MAX_LEN, "max_tokens": 0,
                                           "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == RANDOM_MAX_LEN
    assert_error(http.post("/v1/completions", json={**BASE, "prompt": [5] * RANDOM_MAX_LEN, "max_tokens": 1}),
                 400, "input_tokens")


@pytest.mark.parametrize("content,ctype", [
    (b'{"model": "tiny", "prompt": "hi"', "application/json"),
    (b"not json at all", "application/json"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "application/json"),
    (b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', "application/json"),
    (b'["tiny", "hi"]', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"", "application/json"),
    (b'{"model": "tiny", "prompt": "hi"}', "text/plain"),
    (b'{"model": "tiny", "prompt": "hi"}', "application/x-www-form-urlencoded"),
    (b'{"model": "tiny", "prompt": "hi"}', None),
])
def test_bad_body_or_content_type_is_400(http, content, ctype):
    headers = {"content-type": ctype} if ctype else {}
    assert_error(http.post("/v1/completions", content=content, headers=headers), 400, "body")


def test_json_with_charset_is_accepted(http):
    r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "hello", "max_tokens": 1, "ignore_eos": true}',
                  headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_min_p_is_refused_until_the_engine_supports_it(http):
    assert_error(http.post("/v1/completions", json={**BASE, "min_p": 0.1}), 400, "min_p")
    r = http.post("/v1/completions", json={**BASE, "min_p": 0.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_explicit_nulls_mean_defaults(http):
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream", "echo",
                               "logprobs", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
                               "stream_options", "user", "suffix", "best_of", "min_tokens")}
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "ignore_eos": True, **nulls})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] == 16  # the default max_tokens


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={**BASE, "temperature": 0, "frobnicate": {"x": 1},
                                           "response_format": "json", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_unknown_route_and_wrong_method_are_openai_shaped(http):
    assert_error(http.get("/v1/nothing"), 404, None, "NotFoundError")
    assert_error(http.get("/v1/completions"), 405, None, "MethodNotAllowedError")


def test_openai_client_sees_typed_errors(stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, temperature=7)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hello", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, suffix="x")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                  stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"


def test_server_still_serves_after_bad_input(http):
    for overrides, _ in FIELD_CASES[:10]:
        http.post("/v1/completions", json={**BASE, **overrides})
    r = http.post("/v1/completions", json={**BASE, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
