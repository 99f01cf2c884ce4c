"""Real faults in the compressed engine, end to end through the canary (uvicorn on loopback, real
AsyncEngines): a step that raises and a step that hangs, injected through the engine's test-only
``fault`` hook (``AsyncEngine.fault``, run in the engine thread before each step), so the failure takes
the engine's own error path (every request in flight ends with ``finish_reason="error"``) or really
stalls the engine thread. The user must never see it: answers come from the original, byte-identical
to what the original says, and a failing or stalled shadow run changes neither the answer nor its
latency. (A stopped engine thread is covered in ``test_canary_server``.)"""
from __future__ import annotations

import json
import threading
import time

import pytest
from test_canary_server import Stack, check_variant, engines, post  # noqa: F401 (fixture)


def _step_fails() -> None:
    raise RuntimeError("injected step failure")


def _stream_text(text: str) -> str:
    assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text
    chunks = [json.loads(b[len("data: "):]) for b in text.split("\n\n")[:-2]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def _wait_idle(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().num_running or engine.stats().num_waiting or engine.stats().kv_cache_usage:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


BODY = {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def comp(engines):  # noqa: F811
    e = engines["comp"]
    yield e
    e.fault = None


def test_compressed_step_failure_is_invisible_and_disables_the_canary(engines, comp):  # noqa: F811
    s = Stack(engines["orig"], comp, weight=1.0,
              rollout={"failure": {"max_consecutive_errors": 2, "stall_timeout_s": 30}})
    try:
        want = post(s, model="tiny-orig", **BODY).json()["choices"][0]["text"]
        assert check_variant(s, post(s, **BODY)) == "compressed"
        comp.fault = _step_fails
        r = post(s, **BODY)  # routed to compressed; its step raises; retried on the original
        assert check_variant(s, r) == "original"
        assert r.json()["choices"][0]["text"] == want and r.json()["choices"][0]["finish_reason"] == "length"
        r = s.http.post("/v1/completions", json={"model": "tiny-pub", **BODY, "stream": True})
        assert r.status_code == 200 and r.headers["x-modegpt-variant"] == "original"
        assert _stream_text(r.text) == want
        st = s.admin("GET", "").json()  # two failures in a row: the canary turned itself off
        assert st["state"] == "rolled_back" and st["rollback_kind"] == "engine_failure" and st["weight"] == 0.0
        assert "injected" not in r.text and "Internal" not in r.text
        m = s.scrape()
        assert m[("modegpt_rollbacks_total", (("reason", "engine_failure"),))] == 1
        assert m[("vllm:request_success_total", (("finished_reason", "error"), ("model_name", "tiny-comp"),
                                                 ("variant", "compressed")))] == 2
        comp.fault = None  # the engine survived its failed steps and serves again
        _wait_idle(comp)
        assert check_variant(s, post(s, model="tiny-comp", **BODY)) == "compressed"
    finally:
        s.close()


def test_compressed_engine_stall_is_retried_on_the_original(engines, comp):  # noqa: F811
    s = Stack(engines["orig"], comp, weight=1.0,
              rollout={"failure": {"max_consecutive_errors": 3, "stall_timeout_s": 0.5}})
    release = threading.Event()
    try:
        want = post(s, model="tiny-orig", **BODY).json()["choices"][0]["text"]
        comp.fault = lambda: release.wait(30)  # the engine thread hangs inside its step
        for stream in (False, True):
            t0 = time.monotonic()
            r = s.http.post("/v1/completions", json={"model": "tiny-pub", **BODY, "stream": stream})
            assert r.status_code == 200 and r.headers["x-modegpt-variant"] == "original"
            assert (_stream_text(r.text) if stream else r.json()["choices"][0]["text"]) == want
            assert 0.5 <= time.monotonic() - t0 < 3.0  # the stall timeout, then the original's answer
        assert comp.stats().num_running + comp.stats().num_waiting >= 1  # still stuck in the hung step
        release.set()
        comp.fault = None
        _wait_idle(comp)  # the abandoned attempts were aborted and their KV blocks freed
        total = s.admin("GET", "").json()["counts"]["total"]  # both stalls counted as compressed failures
        assert total["retries"] == 2 and total["errors"]["compressed"] == 2
    finally:
        release.set()
        s.close()


def test_failing_or_stalled_shadow_never_touches_the_users_request(engines, comp):  # noqa: F811
    s = Stack(engines["orig"], comp, weight=0.0, shadow_fraction=1.0, score_fraction=1.0)
    prompts = ["hello world", "the quick brown", "a model", "hello"]
    release = threading.Event()

    def ask(prompt: str) -> tuple[str, float]:
        t0 = time.monotonic()
        r = post(s, **{**BODY, "prompt": prompt, "max_tokens": 6})
        assert check_variant(s, r) == "original"
        return r.json()["choices"][0]["text"], time.monotonic() - t0

    try:
        baseline = [ask(p) for p in prompts]
        s.wait_shadow()
        assert s.canary.shadow.shadow_runs == len(prompts) and s.canary.shadow.errors == 0

        comp.fault = _step_fails  # every shadow run on the compressed engine fails
        failing = [ask(p) for p in prompts]
        s.wait_shadow()
        assert [t for t, _ in failing] == [t for t, _ in baseline]
        assert s.canary.shadow.errors == len(prompts)
        assert s.scrape()[("modegpt_shadow_runs_total", (("result", "error"),))] == len(prompts)

        comp.fault = lambda: release.wait(30)  # every shadow run hangs in the compressed engine
        slow_base = max(dt for _, dt in baseline)
        stalled = [ask(p) for p in prompts]
        assert [t for t, _ in stalled] == [t for t, _ in baseline]
        assert max(dt for _, dt in stalled) < slow_base + 1.0, (stalled, baseline)
        assert s.canary.shadow.outstanding >= 1  # the shadow work is still stuck while users are served

        st = s.admin("GET", "").json()  # shadow failures are not the user's: the canary stays as it was
        assert st["state"] == "idle" and st["weight"] == 0.0 and st["compressed_up"]
        release.set()
        comp.fault = None
        s.wait_shadow()
        _wait_idle(comp)
    finally:
        release.set()
        s.close()
