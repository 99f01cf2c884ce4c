"""Request limits and hostile bodies against the real server (uvicorn on loopback, real engines): every
case is a 4xx OpenAI error naming the offending field, and a barrage of them leaves the engines exactly
as they were (same answers, no running or waiting sequences, every KV block free).

Field types and ranges are in ``tests/test_api_errors.py``; this file adds the limits (stop strings,
logit_bias, the generated-token budget, body size), non-finite numbers, invalid Unicode and nesting.
"""
from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_api_errors import BASE, FIELD_CASES, assert_error

from server.api.app import build_app
from server.api.body_limit import DRAIN_BYTES
from server.api.protocol import (DEFAULT_MAX_BODY_BYTES, MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                                 RequestLimits)
from server.api.testing import ServerThread, wait_engines_clean

CAP_TOKENS = 64
CAP_BYTES = 4096



@pytest.fixture(scope="module")
def capped(stack):
    """The same engines behind an app with small limits: 64 generated tokens, 4 KiB bodies."""
    srv = ServerThread(build_app(stack.registry, limits=RequestLimits(CAP_TOKENS, CAP_BYTES))).start()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c
    srv.stop()


def post_raw(client: httpx.Client, body: bytes, **headers) -> httpx.Response:
    return client.post("/v1/completions", content=body, headers={"content-type": "application/json", **headers})


# ----------------------------------------------------------------------------------- limits on fields

LIMIT_CASES = [
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, "stop"),
    ({"stop": [None]}, "stop"),
    ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"logit_bias": {"5_0": 1}}, "logit_bias"),  # int() would read 50
    ({"logit_bias": {"+5": 1}}, "logit_bias"),
    ({"logit_bias": {" 5": 1}}, "logit_bias"),
    ({"logit_bias": {"": 1}}, "logit_bias"),
    ({"logit_bias": {"12345678901": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"),
    ({"logit_bias": {"5": None}}, "logit_bias"),
    ({"logit_bias": {"5": [1]}}, "logit_bias"),
    ({"prompt": [2**70]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": ["a"] * 1025}, "prompt"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"model": "tiny-script", "n": 128, "max_tokens": 4000}, "n"),  # 512 000 > the default 65 536
    ({"model": "tiny-script", "best_of": 20, "max_tokens": 4000}, "best_of"),
]


@pytest.mark.parametrize("overrides,param", LIMIT_CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(LIMIT_CASES)])
def test_limit_violation_is_400_with_param(http, overrides, param):
    assert_error(http.post("/v1/completions", json={**BASE, **overrides}), 400, param)
    assert_error(http.post("/v1/completions", json={**BASE, **overrides, "stream": True}), 400, param)


def test_limits_are_inclusive(http):
    stops = ["\x01" * (MAX_STOP_CHARS - 1) + chr(0x41 + i) for i in range(MAX_STOP_STRINGS)]
    r = http.post("/v1/completions", json={**BASE, "stop": stops, "logit_bias": {str(i): -1 for i in range(300)},
                                           "prompt": [5.0, 6], "stop_token_ids": [7.0]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


@pytest.mark.parametrize("overrides,param", [
    ({"model": "tiny-script", "n": 5, "max_tokens": 13}, "n"),  # 65 > 64
    ({"model": "tiny-script", "best_of": 3, "max_tokens": 22}, "best_of"),
    ({"model": "tiny-script", "prompt": ["a", "b", "c"], "max_tokens": 22}, "prompt"),
    ({"model": "tiny-script", "prompt": [[5], [6]], "n": 2, "max_tokens": 17}, "n"),
    ({"model": "tiny-script", "max_tokens": CAP_TOKENS + 1}, "max_tokens"),
])
def test_generated_token_budget(capped, overrides, param):
    """prompts x max(n, best_of) x max_tokens is capped per request (``--max-generation-tokens``)."""
    err = assert_error(capped.post("/v1/completions", json={**BASE, **overrides}), 400, param)
    assert f"limit is {CAP_TOKENS}" in err["message"]


def test_generated_token_budget_at_the_limit(capped):
    r = capped.post("/v1/completions", json={**BASE, "model": "tiny-script", "prompt": [[5], [6]], "n": 2,
                                             "max_tokens": CAP_TOKENS // 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == CAP_TOKENS


# ----------------------------------------------------------------------------------- hostile bodies

RAW_CASES = [
    (rb'{"model": "tiny", "prompt": "hi", "temperature": 1e400}', "temperature"),  # inf after parsing
    (rb'{"model": "tiny", "prompt": "hi", "top_p": -1e400}', "top_p"),
    (rb'{"model": "tiny", "prompt": "hi", "logit_bias": {"5": 1e400}}', "logit_bias"),
    (rb'{"model": "tiny", "prompt": "hi", "presence_penalty": 1e999}', "presence_penalty"),
    (rb'{"model": "tiny", "prompt": "\ud800"}', "prompt"),  # a lone surrogate: valid JSON, invalid text
    (rb'{"model": "tiny", "prompt": ["ok", "\udfff x"]}', "prompt"),
    (rb'{"model": "tiny", "prompt": "hi", "user": "\ud83d"}', "user"),  # the canary hashes `user`
    (rb'{"model": "tiny", "prompt": "hi", "stop": ["\udc00"]}', "stop"),
    (rb'{"model": "\ud800", "prompt": "hi"}', "model"),
    (rb'{"model": "tiny", "prompt": "hi", "extra": {"a": ["\ud800"]}}', "extra"),
    (rb'{"model": "tiny", "prompt": "hi", "\ud800": 1}', "body"),
    (b'{"model": "tiny", "prompt": "\xff"}', "body"),  # invalid UTF-8 inside a string
    (b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', "body"),  # an encoded surrogate (CESU-8)
    (b'{"model": "tiny", "prompt": "\xc0\xaf"}', "body"),  # an overlong encoding
    (b"[" * 100_000 + b"]" * 100_000, "body"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "body"),
    (b'{"model": "tiny", "prompt": "hi", "n": ' + b"9" * 5000 + b"}", "body"),  # past Python's int digits
    (b'{"model": "tiny", "prompt": "hi", "n": 1, "n": 2.5}', "n"),  # duplicate keys: the last wins
    (b'{"model": "tiny", "prompt": "hi"} trailing', "body"),
    (b'\xef\xbb\xbf{"model": "tiny", "prompt": "hi"}', "body"),  # a byte-order mark
    ('{"model": "tiny", "prompt": "hi"}'.encode("utf-16"), "body"),  # JSON is UTF-8 only
]


@pytest.mark.parametrize("body,param", RAW_CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(RAW_CASES)])
def test_hostile_body_is_400_with_param(http, body, param):
    r = post_raw(http, body)
    assert_error(r, 400, param)
    assert len(r.content) < 4096  # the error does not echo the body


def test_body_over_the_limit_is_413(capped):
    """Over the limit by less than ``DRAIN_BYTES``: the rest is read and dropped, then the 413."""
    body = json.dumps({**BASE, "prompt": "x" * (CAP_BYTES + 200_000)}).encode()
    err = assert_error(post_raw(capped, body), 413, "body", "RequestTooLargeError")
    assert str(CAP_BYTES) in err["message"]
    # chunked (no content-length): counted while read
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    assert_error(post_raw(capped, iter(chunks)), 413, "body", "RequestTooLargeError")
    # every route, before auth or parsing
    r = capped.post("/admin/canary/weight", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, "body", "RequestTooLargeError")
    # at the limit: read and parsed as usual
    fits = json.dumps({**BASE, "prompt": "hello", "user": ""}).encode()
    fits = fits.replace(b'"user": ""', b'"user": "' + b"u" * (CAP_BYTES - len(fits)) + b'"')
    assert len(fits) == CAP_BYTES
    r = post_raw(capped, fits)
    assert r.status_code == 200, r.text
    r = post_raw(capped, iter([fits[:2000], fits[2000:]]))
    assert r.status_code == 200, r.text


def test_default_body_limit_refuses_before_reading(stack):
    """A Content-Length far over the default limit (16 MiB) is answered at once, the body never sent."""
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {DEFAULT_MAX_BODY_BYTES + DRAIN_BYTES + 1}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), data
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["param"] == "body" and body["error"]["code"] == 413


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10"])
def test_malformed_content_length_is_refused(stack, length):
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {length}\r\n\r\n".encode())
        status = s.recv(65536).partition(b"\r\n")[0]
    assert status.split()[1].startswith(b"4"), status  # uvicorn (h11) or our middleware: a 4xx either way


# ----------------------------------------------------------------------------------- no lasting damage


def _goldens(http) -> list[dict]:
    """Answers that depend only on the weights and the request: greedy, seeded sampling, scoring."""
    reqs = [
        {"model": "tiny-script", "prompt": "hello", "max_tokens": 12, "temperature": 0},
        {"model": "tiny-random", "prompt": "hello", "max_tokens": 8, "n": 3, "seed": 7, "temperature": 1.0},
        {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 0, "echo": True, "logprobs": 2},
        {"model": "tiny-random", "prompt": ["ab", "cd"], "max_tokens": 5, "temperature": 0, "logprobs": 1,
         "logit_bias": {"100": 5}, "stop": ["zz"]},
    ]
    out = []
    for body in reqs:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        d = r.json()
        out.append({"choices": d["choices"], "usage": d["usage"]})
    return out


def test_bad_request_barrage_leaves_the_engines_as_they_were(stack, http):
    before = _goldens(http)
    bodies = [json.dumps({**BASE, **o}).encode() for o, _ in FIELD_CASES + LIMIT_CASES]
    bodies += [json.dumps({**BASE, **o, "stream": True}).encode() for o, _ in LIMIT_CASES]
    bodies += [b for b, _ in RAW_CASES]

    def fire(body: bytes) -> int:
        return post_raw(http, body).status_code  # httpx.Client is thread-safe (one connection pool)

    with ThreadPoolExecutor(8) as pool:
        # good streaming requests run on both engines while the bad ones arrive
        good = [pool.submit(http.post, "/v1/completions", json={**BASE, "model": m, "max_tokens": 30,
                                                                "stream": True})
                for m in ("tiny-script", "tiny-random")]
        statuses = list(pool.map(fire, bodies * 2))
        assert all(f.result().status_code == 200 for f in good)
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    wait_engines_clean(stack.random_engine, stack.script_engine)
    assert _goldens(http) == before
    wait_engines_clean(stack.random_engine, stack.script_engine)
