"""Graceful shutdown of a real ``modegpt serve`` subprocess (``server.api.lifecycle``): SIGTERM while
long requests stream, as Kubernetes or ``docker stop`` sends it."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from test_api_cli import checkpoints, start_serve, wait_health  # noqa: F401 (fixture)


class Request:
    """A completion request on its own thread; ``started`` is set once its first event (or, without
    streaming, its admission: the server's in-flight gauge counts it) is in."""

    def __init__(self, url: str, body: dict):
        self.url, self.body = url, body
        self.started = threading.Event()
        self.status: int | None = None
        self.text = ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=600) as c, c.stream("POST", f"{self.url}/v1/completions", json=self.body) as r:
            self.status = r.status_code
            for chunk in r.iter_text():
                self.text += chunk
                self.started.set()
        self.started.set()

    def join(self) -> Request:
        self.thread.join(600)
        assert not self.thread.is_alive()
        return self

    def events(self) -> list[dict]:
        assert self.text.endswith("data: [DONE]\n\n"), self.text[-300:]
        return [json.loads(b[len("data: "):]) for b in self.text.split("\n\n")[:-2]]


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("modegpt_http_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def _serve(checkpoints, *extra: str):  # noqa: F811
    orig, comp = checkpoints
    srv = start_serve("--original", str(orig), "--compressed", str(comp), "--name", "pub",
                      "--max-model-len", "4096", "--log-level", "info", *extra)
    wait_health(srv.url, 200)
    return srv


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(checkpoints):  # noqa: F811
    srv = _serve(checkpoints, "--shutdown-timeout", "600")  # the drain, not this deadline, ends it
    url = srv.url
    body = {"model": "tiny-comp", "prompt": "hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    try:
        streams = [Request(url, {**body, "stream": True}) for _ in range(3)]
        for s in streams:
            assert s.started.wait(60) and s.status == 200
        plain = Request(url, body)  # non-streaming: nothing comes back until it is done
        deadline = time.monotonic() + 30
        while _in_flight(url) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (h := httpx.get(f"{url}/health")).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
            time.sleep(0.02)
        assert "shutting down" in h.json()["error"]["message"]
        for new in ({**body, "max_tokens": 4}, {**body, "max_tokens": 4, "stream": True}):
            r = httpx.post(f"{url}/v1/completions", json=new, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] and r.headers["connection"] == "close"
            assert r.json()["error"]["type"] == "ServiceUnavailableError"
        assert all(s.thread.is_alive() for s in streams)  # the drain really overlapped them

        for s in streams:
            events = s.join().events()
            assert all("error" not in e for e in events), [e for e in events if "error" in e]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 100
        assert plain.join().status == 200
        resp = json.loads(plain.text)
        assert resp["usage"]["completion_tokens"] == 1000 and resp["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    srv._drain.join(5)
    assert "draining 4 request(s)" in srv.output and "drained; shutting down" in srv.output, srv.output
    assert "Traceback" not in srv.output


def _long_stream(srv) -> "Request":
    """A streaming request that runs for minutes, once its first bytes have arrived."""
    body = {"model": "tiny-comp", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    s = Request(srv.url, body)
    assert s.started.wait(60) and s.status == 200
    return s


def test_shutdown_timeout_ends_what_is_left_and_still_exits_0(checkpoints):  # noqa: F811
    srv = _serve(checkpoints, "--shutdown-timeout", "1")
    try:
        s = _long_stream(srv)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        events = s.join().events()
        assert 1.0 <= time.monotonic() - t0 < 5
        assert events[-1]["error"]["code"] == 503 and "shutting down" in events[-1]["error"]["message"]
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    srv._drain.join(5)
    assert "ending 1 request(s) still in flight" in srv.output, srv.output


def test_bad_limits_are_refused_at_start(capsys):
    from server.cli import main

    for flag, value, msg in (("--max-pending", "-1", "--max-pending must be >= 0, got -1"),
                             ("--request-timeout", "nan", "--request-timeout must be >= 0, got nan"),
                             ("--shutdown-timeout", "inf", "--shutdown-timeout must be a finite number")):
        assert main(["--port", "0", "--no-canary", flag, value]) == 2
        assert msg in capsys.readouterr().err


def test_a_second_signal_stops_at_once(checkpoints):  # noqa: F811
    srv = _serve(checkpoints, "--shutdown-timeout", "600")
    try:
        s = _long_stream(srv)
        srv.proc.send_signal(signal.SIGTERM)
        wait_health(srv.url, 503, timeout=10)  # draining
        srv.proc.send_signal(signal.SIGTERM)  # not waiting for the 600 s drain
        events = s.join().events()
        assert events[-1]["error"]["code"] == 503
        assert srv.proc.wait(30) == -signal.SIGTERM  # not a clean exit: the drain was cut short
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
