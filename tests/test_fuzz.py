"""Fuzzing: whatever arrives, the answer is a 200 or a 4xx OpenAI error, never a 5xx or a traceback.

- hypothesis fuzzes ``parse_completion_request`` (the one way from a JSON body to a request) and the
  request's later checks in process, then the live endpoint with the same generated bodies;
- schemathesis generates valid and invalid requests for every operation of the server's own
  ``/openapi.json`` and checks the answers against it (status codes, content types, body schemas).

Servers are the real app under uvicorn on loopback over real tiny engines. Generation is bounded by a
small ``--max-generation-tokens`` so that accepted requests stay cheap.
"""
from __future__ import annotations

import collections
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)
from test_security import ADMIN, API_KEYS, SecureStack, bearer

from server.api.app import build_app
from server.api.errors import APIError
from server.api.protocol import (CompletionRequest, CompletionResponse, CompletionStreamResponse, RequestLimits,
                                 parse_completion_request)
from server.api.registry import ModelRegistry
from server.api.testing import ServerThread, wait_engines_clean
from server.canary.review import ReviewQueue

CAP = RequestLimits(max_generation_tokens=64, max_body_bytes=1 << 16)
VOCAB = 300  # the tiny models'
FIELDS = sorted(CompletionRequest.model_fields)


def fuzz(examples: int) -> settings:
    """Bounded runs, no example database (CI), no deadline (a loaded machine is not a bug)."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


# -------------------------------------------------------------------------------- generated JSON

_text = st.text(st.characters(codec=None), max_size=12)  # any code point, lone surrogates included
_numbers = (st.integers(-3, 400) | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 1e308, -0.0, 0.5]))
_scalars = st.none() | st.booleans() | _numbers | _text
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(_text, inner, max_size=4), max_leaves=12)
_ids = st.lists(st.integers(-2, 320) | st.sampled_from([5.0, 2**40, True]), min_size=0, max_size=6)

# plausible values get past the first checks, so the later ones are fuzzed too
PLAUSIBLE = {
    "model": st.sampled_from(["tiny", "tiny-random", "tiny-script", "nope", "", "../etc/passwd"]),
    "prompt": (st.text(min_size=0, max_size=20) | _ids | st.lists(_ids, max_size=3)
               | st.lists(st.text(max_size=8), max_size=3)),
    "max_tokens": st.integers(-2, 70), "min_tokens": st.integers(-1, 10),
    "n": st.integers(-1, 5), "best_of": st.integers(-1, 6),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 400),
    "min_p": st.floats(-0.5, 1.5), "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "stop": _text | st.lists(_text, max_size=20), "stop_token_ids": _ids,
    "logprobs": st.integers(-2, 25), "echo": st.booleans(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values,
                                                           "continuous_usage_stats": json_values}),
    "seed": st.integers(-(2**64), 2**64),
    "logit_bias": st.dictionaries(st.integers(-5, 400).map(str) | _text, _numbers | _text, max_size=4),
    "user": _text, "suffix": st.none() | _text, "ignore_eos": st.booleans(),
}
_field = {f: (PLAUSIBLE.get(f, st.nothing()) | json_values) for f in FIELDS}
VALID = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "tiny-script"]),
                               "prompt": st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)},
                              optional={"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
                                        "n": st.integers(1, 3), "stream": st.booleans(), "echo": st.booleans(),
                                        "logprobs": st.integers(0, 3), "seed": st.integers(0, 2**32)})
# a valid request with one or two fields replaced: most answers come from the deeper checks
nearly_valid = st.builds(lambda base, a, b: {**base, **a, **b}, VALID,
                         *[st.sampled_from(FIELDS).flatmap(lambda f: st.fixed_dictionaries({f: _field[f]}))] * 2)
requests = (nearly_valid
            | st.fixed_dictionaries({"prompt": _field["prompt"]},
                                    optional={f: v for f, v in _field.items() if f != "prompt"})
            | st.dictionaries(st.sampled_from(FIELDS) | _text, json_values, max_size=6))
bodies = requests | json_values  # not every body is an object


def assert_client_error(err: APIError, data) -> None:
    assert 400 <= err.status < 500, (err.status, err.message)
    assert isinstance(err.message, str) and err.message
    assert err.param is None or err.param in FIELDS or err.param == "body" or (
        isinstance(data, dict) and err.param in data), err.param


# -------------------------------------------------------------------------------- in process


def test_parse_completion_request_accepts_or_names_the_field():
    outcomes = []

    @fuzz(300)
    @given(data=bodies)
    def run(data):
        try:
            req = parse_completion_request(data, CAP)
            req.check()  # what the service checks next, against a model
            req.logit_bias_ids(VOCAB)
        except APIError as e:
            assert_client_error(e, data)
            outcomes.append(e.param)
            return
        prompts = req.prompts()
        assert prompts and all(isinstance(p, str) or all(type(t) is int for t in p) for p in prompts)
        assert len(prompts) * req.effective_best_of() * req.effective_max_tokens() <= CAP.max_generation_tokens
        outcomes.append("accepted")

    run()
    assert outcomes.count("accepted") >= 20 and len(set(outcomes)) >= 10, collections.Counter(outcomes)


# -------------------------------------------------------------------------------- the live endpoint


@pytest.fixture(scope="module")
def tiny(stack):
    return stack


@pytest.fixture(scope="module")
def capped(tiny):
    srv = ServerThread(build_app(tiny.registry, limits=CAP)).start()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c
    srv.stop()


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
        assert err["param"] is None or isinstance(err["param"], str)
        return
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [b.removeprefix("data: ") for b in r.text.split("\n\n") if b]
        assert events[-1] == "[DONE]"
        for e in map(json.loads, events[:-1]):
            if "error" in e:
                assert e["error"]["code"] < 500, e
            else:
                CompletionStreamResponse.model_validate(e)
    else:
        CompletionResponse.model_validate(r.json())


def test_live_endpoint_never_fails_on_generated_bodies(tiny, capped):
    statuses = []

    @fuzz(200)
    @given(data=bodies)
    def run(data):
        r = capped.post("/v1/completions", content=json.dumps(data).encode(),
                        headers={"content-type": "application/json"})
        check_answer(r)
        statuses.append(r.status_code)

    run()
    print(sorted(collections.Counter(statuses).items()))
    assert statuses.count(200) >= 10 and statuses.count(400) >= 10  # both paths were exercised
    wait_engines_clean(tiny.random_engine, tiny.script_engine)


def test_live_endpoint_never_fails_on_generated_bytes(capped):
    @fuzz(100)
    @given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
           | bodies.map(lambda d: json.dumps(d).encode()[:-1]))  # truncated JSON
    def run(raw):
        r = capped.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        check_answer(r)
        assert r.status_code == 400 or raw.strip()[:1] == b"{"

    run()


# -------------------------------------------------------------------------------- schemathesis

# the operations of a server with every router mounted (the live one below has the same routes)
OPERATIONS = [(path, method.upper())
              for path, ops in build_app(ModelRegistry(), review_queue=ReviewQueue(":memory:")).openapi()["paths"].items()
              for method in ops]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def secure(tiny, tmp_path_factory):
    s = SecureStack(tiny, tmp_path_factory.mktemp("review") / "review.sqlite3", limits=CAP,
                    shadow_fraction=0.1, score_fraction=0.2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def api_schema(secure):
    return schemathesis.openapi.from_url(f"{secure.server.url}/openapi.json")


def test_schema_describes_the_completion_request(api_schema):
    body = api_schema.raw_schema["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    request = api_schema.raw_schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(request["properties"]) == set(FIELDS) and request["required"] == ["prompt"]
    assert request["properties"]["n"]["maximum"] == 128


@pytest.mark.parametrize("path,method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_schemathesis(api_schema, secure, tiny, path, method):
    op = api_schema[path][method]
    headers = bearer(ADMIN if path.startswith(("/admin", "/v1/review")) else API_KEYS[0])
    strategy = op.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if op.body or op.path_parameters or op.query:
        strategy |= op.as_strategy(generation_mode=GenerationMode.NEGATIVE)

    statuses = []

    @fuzz(150 if path == "/v1/completions" else 40)
    @given(case=strategy)
    def run(case):
        response = case.call(headers=headers, timeout=60)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
    print(path, method, sorted(collections.Counter(statuses).items()))
    wait_engines_clean(tiny.random_engine, tiny.script_engine)
