"""Overload, deadlines and disconnects end to end (``server.api.admission``): uvicorn on a loopback port
over real AsyncEngines (``TinyStack``); what is asserted is what a client sees and what the engine holds
(running sequences, KV-cache blocks) afterwards.

``tiny-script`` generates a few hundred tokens per second here, so a request for thousands of tokens
is still running seconds later."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from server.api.admission import Admission, Limits
from server.api.testing import TinyStack

LONG = {"model": "tiny-script", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack():
    s = TinyStack(admission=Admission())
    yield s
    s.close()


@pytest.fixture
def limits(stack):
    """Set the stack's admission limits for one test (back to the defaults afterwards)."""
    adm: Admission = stack.app.state.admission

    def set_limits(**kw) -> Admission:
        adm.limits = Limits(**kw)
        return adm

    yield set_limits
    adm.limits = Limits()


def metric(stack, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{stack.url}/metrics").text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def engine_busy(engine) -> bool:
    st = engine.stats()
    return bool(st.num_running or st.num_waiting or st.kv_cache_usage)


def wait_engine(engine, busy: bool, timeout: float) -> float:
    """Seconds until the engine is busy (or idle: no running/waiting sequence, no KV block in use)."""
    t0 = time.monotonic()
    while engine_busy(engine) != busy:
        assert time.monotonic() - t0 < timeout, f"engine not {'busy' if busy else 'idle'} after {timeout} s: " \
                                                f"{engine.stats()}"
        time.sleep(0.005)
    return time.monotonic() - t0


class OpenStream:
    """A streamed request held open in a thread until ``close()``; ``first`` is set at its first event."""

    def __init__(self, url: str, body: dict):
        self.first = threading.Event()
        self.status: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.first.set()
                if self._stop.is_set():
                    return  # leaving the block closes the connection mid-stream

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


# ------------------------------------------------------------------------------------------ overload


def test_over_capacity_is_refused_at_once_with_retry_after(stack, limits):
    adm = limits(max_pending=2, request_timeout_s=0)
    rejected0 = metric(stack, "modegpt_http_rejected_total", reason="overloaded")
    streams = [OpenStream(stack.url, LONG) for _ in range(2)]
    try:
        for s in streams:
            assert s.first.wait(30) and s.status == 200
        assert adm.in_flight == 2 and metric(stack, "modegpt_http_requests_in_flight") == 2
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            for body in ({**LONG, "max_tokens": 4}, {**LONG, "max_tokens": 4, "stream": True}):
                t0 = time.monotonic()
                r = c.post("/v1/completions", json=body)
                assert time.monotonic() - t0 < 1.0  # never queued, never hangs
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                err = r.json()["error"]
                assert err["type"] == "TooManyRequestsError" and err["code"] == 429 and "limit is 2" in err["message"]
            assert c.get("/health").status_code == 200 and c.get("/v1/models").status_code == 200
            assert metric(stack, "modegpt_http_rejected_total", reason="overloaded") == rejected0 + 2
            streams[0].close()  # one slot frees up: the same client connection gets in
            deadline = time.monotonic() + 5
            while adm.in_flight > 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = c.post("/v1/completions", json={**LONG, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        for s in streams:
            s.close()
    wait_engine(stack.script_engine, busy=False, timeout=5)
    assert adm.in_flight == 0


# ------------------------------------------------------------------------------------------ deadlines


def test_request_timeout_answers_504_and_frees_the_engine(stack, limits):
    limits(request_timeout_s=0.5)
    expired0 = metric(stack, "modegpt_http_deadline_exceeded_total", reason="timeout")
    t0 = time.monotonic()
    r = httpx.post(f"{stack.url}/v1/completions", json=LONG, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504 and 0.5 <= elapsed < 1.5, (r.status_code, elapsed)
    err = r.json()["error"]
    assert err["type"] == "GatewayTimeoutError" and err["code"] == 504 and "0.5 s" in err["message"]
    assert wait_engine(stack.script_engine, busy=False, timeout=1.0) < 1.0  # aborted, KV blocks freed
    assert metric(stack, "modegpt_http_deadline_exceeded_total", reason="timeout") == expired0 + 1


def test_streaming_timeout_ends_with_an_error_event_then_done(stack, limits):
    limits(request_timeout_s=0.5)
    r = httpx.post(f"{stack.url}/v1/completions", json={**LONG, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(b[len("data: "):]) for b in r.text.split("\n\n")[:-2]]
    assert len(events) > 10 and all(e["choices"][0]["text"] for e in events[:-1])  # it was generating
    assert events[-1]["error"]["code"] == 504 and events[-1]["error"]["type"] == "GatewayTimeoutError"
    assert wait_engine(stack.script_engine, busy=False, timeout=1.0) < 1.0


def test_requests_within_the_deadline_are_untouched(stack, limits):
    limits(request_timeout_s=5)
    r = httpx.post(f"{stack.url}/v1/completions", json={**LONG, "max_tokens": 50}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 50


# ------------------------------------------------------------------------------------------ disconnects


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_sequences_and_kv_blocks_at_once(stack, limits, stream):
    limits(request_timeout_s=0)
    engine = stack.script_engine
    wait_engine(engine, busy=False, timeout=5)
    base = engine.stats()
    if stream:
        s = OpenStream(stack.url, LONG)
        assert s.first.wait(30)
        wait_engine(engine, busy=True, timeout=5)
        t0 = time.monotonic()
        s.close()
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
            httpx.post(f"{stack.url}/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
        t0 = time.monotonic()
    freed = wait_engine(engine, busy=False, timeout=1.0)
    assert freed < 1.0, freed
    after = engine.stats()
    assert (after.num_running, after.num_waiting, after.kv_cache_usage) == (0, 0, base.kv_cache_usage)
    assert after.requests_finished_total == base.requests_finished_total + 1  # ended (aborted), not leaked
    assert after.generation_tokens_total - base.generation_tokens_total < LONG["max_tokens"]
    assert time.monotonic() - t0 < 1.5


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a POST /v1/completions on a bare socket (no reading): closing it is a client disconnect."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_canary_stream_left_before_its_first_event_leaves_the_queue_at_once():
    """A canary stream holds its response until the first event (it names the answering variant); a
    client that leaves while the request still waits in the engine's queue must not stay queued."""
    from test_canary_server import Stack

    from server.api.testing import SCRIPT, scripted_model
    from server.engine.async_engine import AsyncEngine
    from server.engine.testing import byte_tokenizer

    tok = byte_tokenizer()
    cfg, sd, _ = scripted_model(tok, SCRIPT)
    kw = {"dtype": torch.float32, "kv_cache_bytes": 8 << 20, "max_model_len": 4096}
    one = AsyncEngine("one-slot", cfg, sd, tok, max_num_seqs=1, **kw)  # a second request must wait
    other = AsyncEngine("other", cfg, sd, tok, **kw)
    one.start(), other.start()
    s = Stack(one, other, weight=0.0)
    busy = OpenStream(s.server.url, {**LONG, "model": "one-slot"})
    try:
        assert busy.first.wait(30)
        sock = _raw_request(s.server.url, {**LONG, "model": "tiny-pub", "stream": True})
        deadline = time.monotonic() + 10
        while one.stats().num_waiting != 1:
            assert time.monotonic() < deadline, one.stats()
            time.sleep(0.005)
        t0 = time.monotonic()
        sock.close()
        while one.stats().num_waiting:
            assert time.monotonic() - t0 < 1.0, "the abandoned request is still queued"
            time.sleep(0.005)
        assert one.stats().num_running == 1  # the other request is untouched
    finally:
        busy.close()
        s.close()
        one.shutdown(), other.shutdown()
