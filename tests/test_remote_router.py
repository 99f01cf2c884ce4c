"""The canary router in front of remote variants: two real OpenAI-compatible servers (our own app over
real AsyncEngines, each on its own loopback port) as the original and the compressed backend, and the
router built by the same code as ``modegpt serve --original URL --compressed URL#ID``, driven with the
official ``openai`` client.

The pair: a llama-like tiny model with random weights whose head is sharpened (and restricted to
ASCII tokens, so generated text round-trips through the tokenizer and every top-k key is distinct)
like a trained LM's, and the same model with perturbed weights as the "compressed" one. The failure
tests stop a backend's server (connections refused) and start it again on the same port.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import random
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.parser import text_string_to_metric_families

from compressor.checkpoint import write_checkpoint
from server.api.app import build_app
from server.api.registry import ModelRegistry, ServedModel
from server.api.testing import ServerThread
from server.canary.divergence import divergence
from server.cli import add_serve_arguments, canary_config, load_engines
from server.engine.async_engine import AsyncEngine
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.testing import byte_tokenizer, llama_like_config, random_state_dict
from server.remote.backend import RemoteBackend, RemoteSpec, pick_model, sse_data
from server.remote.health import BackendHealth
from server.remote.scoring import LocalEchoScorer, RemoteEchoScorer, kl_lower_bound
from test_api_cli import start_serve, wait_health

ADMIN = "admin-key-remote"
CRIT = "critical-key-remote"
PUB = "tiny-pub"


# ------------------------------------------------------------------------------------------- pieces


def test_topk_kl_is_a_lower_bound_and_exact_on_the_full_support():
    rng = random.Random(0)
    for _ in range(200):
        V = rng.choice([5, 30, 100])
        lp = torch.randn(V, dtype=torch.float64) * rng.choice([0.5, 2.0, 5.0])
        lq = lp + torch.randn(V, dtype=torch.float64) * rng.choice([0.01, 0.3, 2.0])
        lp, lq = lp.log_softmax(-1), lq.log_softmax(-1)
        full = float((lp.exp() * (lp - lq)).sum())
        for k in (1, 3, 20, V):
            top = lambda x: {str(int(i)): float(x[i]) for i in x.topk(min(k, V)).indices}  # noqa: E731
            lb = kl_lower_bound(top(lp), top(lq))
            assert 0.0 <= lb <= full + 1e-9, (k, lb, full)
            if k == V:
                assert lb == pytest.approx(full, rel=1e-9, abs=1e-12)
    assert kl_lower_bound({"a": 0.0}, {"a": 0.0}) == 0.0
    assert kl_lower_bound({"a": -9999.0, "b": 0.0}, {"a": 0.0, "b": -9999.0}) > 1000  # disjoint mass


def test_model_discovery_sse_parsing_and_health_transitions():
    cards = [{"id": "base"}, {"id": "lora-x", "parent": "base"}]
    assert pick_model(cards, None, "u")["id"] == "base" and pick_model(cards, "lora-x", "u")["id"] == "lora-x"
    with pytest.raises(ValueError, match="name the one to use as u#MODEL_ID"):
        pick_model([{"id": "a"}, {"id": "b"}], None, "u")
    with pytest.raises(ValueError, match="does not serve model 'c'"):
        pick_model(cards, "c", "u")
    assert RemoteSpec.parse("http://h:1/v1/#m-1") == RemoteSpec("http://h:1/v1", "m-1")
    assert RemoteSpec.parse("https://h/v1").root == "https://h"
    assert RemoteSpec.parse("http://h:2/api").root == "http://h:2/api"
    with pytest.raises(ValueError):
        RemoteSpec.parse("/models/ckpt")

    async def events(lines):
        async def gen():
            for x in lines:
                yield x
        return [e async for e in sse_data(gen())]

    got = asyncio.run(events([": keep-alive", "", "data: {\"a\":1}", "", "event: x", "data: l1", "data: l2", "",
                              "data: [DONE]", ""]))
    assert got == ['{"a":1}', "l1\nl2", "[DONE]"]

    h = BackendHealth("b", eject_after=2, readmit_after=2)
    seen = []
    h.subscribe(lambda up, why: seen.append((up, why)))
    h.record_failure("x")
    h.record_success()  # resets the request streak
    h.record_failure("y")
    h.record_success(probe=True)  # a passing health check does not excuse failing requests
    assert h.up and not seen
    h.record_failure("z")
    assert not h.up and h.ejections == 1 and seen[-1][0] is False and "failed requests (last: z)" in seen[-1][1]
    h.record_success()  # a request that was in flight: re-admission is the prober's
    h.record_success(probe=True)
    h.record_failure("down again", probe=True)  # the streak of good checks restarts
    h.record_success(probe=True)
    assert not h.up
    h.record_success(probe=True)
    assert h.up and seen[-1][0] is True and len(seen) == 2
    for _ in range(2):
        h.record_failure("no answer", probe=True)
    assert not h.up and h.ejections == 2 and "failed probes" in seen[-1][1]


# ------------------------------------------------------------------------------------------- the pair


def sharpened_pair(tok):
    """(config, original weights, compressed weights): see the module docstring."""
    cfg = llama_like_config()
    sd = random_state_dict(cfg)
    special = set(tok.all_special_ids)
    keep = torch.tensor([i not in special and tok.decode([i]).isascii() for i in range(cfg["vocab_size"])])
    head = sd["lm_head.weight"] * 2.0
    head[~keep] = 0.0
    sd["lm_head.weight"] = head
    g = torch.Generator().manual_seed(11)
    comp = {k: v + torch.randn(v.shape, generator=g) * 0.05 * v.std() for k, v in sd.items()}
    return cfg, sd, comp


@pytest.fixture(scope="module")
def pair():
    tok = byte_tokenizer()
    cfg, sd, comp = sharpened_pair(tok)

    def engine(name, weights):
        e = AsyncEngine(name, cfg, weights, tok, dtype=torch.float32, kv_cache_bytes=8 << 20, max_model_len=64)
        e.start()
        return e

    p = {"tok": tok, "cfg": cfg, "sd": sd, "orig": engine("tiny-orig", sd), "comp": engine("tiny-comp", comp)}
    yield p
    p["orig"].shutdown()
    p["comp"].shutdown()


class Backend:
    """Our own server with one model on a loopback port. ``stop()`` kills the server (connections are
    refused); ``start()`` brings it back on the same port."""

    def __init__(self, engine):
        self.engine = engine
        self.port = 0
        self.thread: ServerThread | None = None

    def start(self) -> "Backend":
        registry = ModelRegistry()
        registry.add(ServedModel(self.engine.model_id, self.engine))
        registry.mark_ready()
        self.thread = ServerThread(build_app(registry), port=self.port).start()
        self.port = self.thread.port
        return self

    def stop(self) -> None:
        self.thread.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
def backends(pair):
    o, c = Backend(pair["orig"]).start(), Backend(pair["comp"]).start()
    yield o, c
    for b in (o, c):
        b.stop()


class Router:
    """``modegpt serve --original ORIGINAL --compressed COMPRESSED --name tiny-pub FLAGS``, in process
    (no comparisons unless FLAGS ask for them)."""

    def __init__(self, original: str, compressed: str, *flags: str):
        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        self.args = p.parse_args(["--original", original, "--compressed", compressed, "--name", PUB,
                                  "--admin-key", ADMIN, "--critical-key", CRIT, "--canary-seed", "1",
                                  "--remote-health-interval", "0.1", "--device", "cpu", "--kv-cache-gb", "0.01",
                                  "--shadow-fraction", "0", "--score-fraction", "0", *flags])
        cfg = canary_config(self.args)
        self.registry = ModelRegistry()
        self.app = build_app(self.registry, admin_keys=cfg.admin_keys)
        load_engines(self.args, self.registry, cfg, self.app.state.canary_metrics)
        assert self.registry.health_problem() is None, self.registry.load_error
        self.canary = self.registry.canary
        self.server = ServerThread(self.app).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="x", max_retries=0, timeout=60)

    def complete(self, **kw):
        """A completion through the openai client: (variant header, parsed completion)."""
        raw = self.client.completions.with_raw_response.create(**{"model": PUB, "prompt": "hello", "max_tokens": 2,
                                                                  **kw})
        c = raw.parse()
        return raw.headers["x-modegpt-variant"], c

    def stream(self, **kw):
        """A streamed completion: (variant header, chunks)."""
        raw = self.client.completions.with_raw_response.create(**{"model": PUB, "prompt": "hello", "max_tokens": 3,
                                                                  "stream": True, **kw})
        return raw.headers["x-modegpt-variant"], list(raw.parse())

    def admin(self, method, path, **kw):
        return self.http.request(method, f"/admin/canary{path}", headers={"authorization": f"Bearer {ADMIN}"}, **kw)

    def scrape(self) -> dict:
        out = {}
        for fam in text_string_to_metric_families(self.http.get("/metrics").text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def wait_shadow(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.canary.shadow.outstanding:
            assert time.monotonic() < deadline, "shadow worker did not drain"
            time.sleep(0.02)

    def wait_metric(self, key, value, timeout=15.0) -> None:
        wait_for(lambda: self.scrape().get(key) == value, timeout)

    def close(self):
        self.http.close()
        self.canary.stop()
        self.server.stop()
        for s in self.registry.served():
            s.shutdown()


def wait_for(condition, timeout=15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def up_key(variant, model):
    return ("modegpt_backend_up", (("model_name", model), ("variant", variant)))


def requests_key(variant, reason):
    return ("modegpt_requests_total", (("reason", reason), ("variant", variant)))


def finished(engine) -> int:
    return engine.stats().requests_finished_total


# ------------------------------------------------------------------------------------------- routing


def test_canary_split_by_weight_through_remote_backends(pair, backends):
    o, c = backends
    r = Router(o.url, c.url + "#tiny-comp", "--canary-weight", "0.3")  # the original's id is discovered
    try:
        cards = {m.id: m for m in r.client.models.list()}
        assert list(cards) == ["tiny-orig", "tiny-comp", PUB] and cards["tiny-comp"].max_model_len == 64
        assert cards["tiny-comp"].parent == "tiny-orig"
        done_o, done_c = finished(pair["orig"]), finished(pair["comp"])
        n = 160

        def one(i):
            v, comp = r.complete()
            assert comp.model == r.canary.served(v).name and comp.id.startswith("cmpl-")
            assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 2
            return v

        with ThreadPoolExecutor(6) as ex:
            variants = list(ex.map(one, range(n)))
        k = variants.count("compressed")
        assert abs(k - n * 0.3) <= 4 * math.sqrt(n * 0.3 * 0.7), k
        # each request was answered once, by the backend its header names
        assert (finished(pair["comp"]) - done_c, finished(pair["orig"]) - done_o) == (k, n - k)
        for u in (f"user-{i}" for i in range(12)):  # sticky: a user's variant is its hash bucket's
            want = r.canary.router.decide(PUB, user=u).variant
            assert {r.complete(user=u)[0] for _ in range(2)} == {want}
        # streamed: SSE relayed with our id on every chunk and the variant's id as model
        pinned = {"x-modegpt-variant": "compressed"}
        v, chunks = r.stream(prompt="the quick", max_tokens=6, temperature=0, extra_headers=pinned,
                             stream_options={"include_usage": True})
        assert v == "compressed" and len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
        assert {ch.model for ch in chunks} == {"tiny-comp"} and chunks[-1].usage.completion_tokens == 6
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        direct = openai.OpenAI(base_url=c.url, api_key="x", max_retries=0)
        assert text == direct.completions.create(model="tiny-comp", prompt="the quick", max_tokens=6,
                                                 temperature=0).choices[0].text
        # the backend's own 4xx reaches the client as it is, and is no failure of the canary
        with pytest.raises(openai.BadRequestError) as e:
            r.complete(model="tiny-comp", max_tokens=100)
        assert e.value.body["param"] == "max_tokens" and "maximum context length is 64" in e.value.body["message"]
        m = r.scrape()
        assert m[requests_key("compressed", "weight")] == k and m[requests_key("original", "weight")] == n - k
        assert m[up_key("original", "tiny-orig")] == 1 and m[up_key("compressed", "tiny-comp")] == 1
        assert m[("modegpt_variant_info", (("model_name", "tiny-comp"), ("variant", "compressed")))] == 1
        assert not [key for key in m if key[0].startswith("vllm:")]  # the backends export their own
        assert r.admin("GET", "").json()["state"] == "idle"
    finally:
        r.close()


# ------------------------------------------------------------------------------------------- divergence


def in_process_divergence(pair, prompt: str, text: str):
    """The in-process (full-vocabulary) measures of ``text`` after ``prompt``, on the tokens the echo
    scores: ``prompt + text`` tokenized, the tokens that start at or after the prompt's end."""
    tok = pair["tok"]
    ids = tok(prompt + text)["input_ids"]
    detok = IncrementalDetokenizer(tok, [], True)
    for t in ids:
        detok.step(t)
    rows = [i for i in range(1, len(ids)) if detok.text_offsets[i] >= len(prompt)]
    lo = pair["orig"].score_sync([ids], timeout=60)[0]
    lc = pair["comp"].score_sync([ids], timeout=60)[0]
    prev = torch.tensor(rows) - 1
    return divergence(lo[prev], lc[prev], [ids[i] for i in rows])


def check_against_in_process(pair, comparisons):
    for c in comparisons:
        assert c.shadow_variant and c.original_text and c.compressed_text
        assert c.exact_match == (c.original_text == c.compressed_text)
        for v, text in (("original", c.original_text), ("compressed", c.compressed_text)):
            ref = in_process_divergence(pair, c.prompt_text, text)
            d = c.per_output[v]
            assert d.n_positions == ref.n_positions > 0
            assert d.top1_agreement == ref.top1_agreement and d.first_divergence == ref.first_divergence
            assert d.logprob_gap == pytest.approx(ref.logprob_gap, abs=1e-4)
            assert d.kl_mean <= ref.kl_mean + 1e-5 and d.kl_max <= ref.kl_max + 1e-5  # lower bounds
            assert d.kl_mean == pytest.approx(ref.kl_mean, rel=0.05, abs=1e-3)
        assert 0 < c.kl_mean < 0.5


PROMPTS = ["hello world", "the quick brown", "a model", "continuous batching", "the lazy dog", "hello"]


def test_shadow_divergence_from_echo_logprobs_matches_in_process(pair, backends):
    o, c = backends
    r = Router(o.url, c.url + "#tiny-comp", "--canary-weight", "0.5", "--shadow-fraction", "1",
               "--score-fraction", "1")
    try:
        for i, p in enumerate(PROMPTS):
            r.complete(prompt=p, max_tokens=8, temperature=0, user=f"u{i}", extra_body={"ignore_eos": True})
        r.stream(prompt="hello bytes", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        r.wait_shadow()
        comps = r.canary.comparisons
        assert len(comps) == len(PROMPTS) + 1 and r.canary.shadow.errors == 0
        assert {x.served_variant for x in comps} == {"original", "compressed"}
        assert all(x.original_model == "tiny-orig" and x.compressed_model == "tiny-comp" for x in comps)
        check_against_in_process(pair, comps)
        m = r.scrape()
        assert m[("modegpt_comparisons_total", ())] == len(comps)
        assert m[("modegpt_shadow_runs_total", (("result", "ok"),))] == len(comps)
        assert m[("modegpt_divergence_kl_mean_count", ())] == len(comps)
        assert m[("modegpt_divergence_top_k", ())] == 20
        helps = {f.name: f.documentation for f in text_string_to_metric_families(r.http.get("/metrics").text)}
        assert "lower bound" in helps["modegpt_divergence_kl_mean"] and "top-k" in helps["modegpt_divergence_kl_mean"]
        assert r.admin("GET", "").json()["divergence_top_k"] == 20
    finally:
        r.close()


def test_mixed_local_original_and_remote_compressed(pair, backends, tmp_path):
    o, c = backends
    tok_dir = tmp_path / "tokenizer"
    pair["tok"].save_pretrained(str(tok_dir))
    ckpt = write_checkpoint(tmp_path / "tiny-orig", pair["cfg"], pair["sd"], tok_dir, {"kind": "test"})
    # float32 like the backends: the local scores are compared with the remote ones at 1e-4 (the CPU
    # default is bf16 on CPUs with native bf16)
    r = Router(str(ckpt), c.url + "#tiny-comp", "--canary-weight", "0.5", "--shadow-fraction", "1",
               "--score-fraction", "1", "--max-model-len", "64", "--dtype", "float32")
    try:
        local = r.canary.served("original")
        assert local.remote is None and r.canary.served("compressed").remote is not None
        # the local side of a mixed pair is scored like the echo request answers it
        text = "the quick brown fox"
        remote_scores = asyncio.run(RemoteEchoScorer(RemoteBackend(RemoteSpec.parse(o.url + "#tiny-orig")), 20)(text))

        async def local_scores():
            return await LocalEchoScorer(local.engine, 20)(text)

        mine = asyncio.run(local_scores())
        assert (mine.tokens, mine.offsets) == (remote_scores.tokens, remote_scores.offsets)
        assert mine.logprobs[0] is None and mine.logprobs[1:] == pytest.approx(remote_scores.logprobs[1:], abs=1e-4)
        for a, b in zip(mine.top[1:], remote_scores.top[1:]):
            assert a.keys() == b.keys() and [a[k] for k in a] == pytest.approx([b[k] for k in a], abs=1e-4)
        for i, p in enumerate(PROMPTS[:4]):
            r.complete(prompt=p, max_tokens=6, temperature=0, user=f"m{i}", extra_body={"ignore_eos": True})
        r.wait_shadow()
        comps = r.canary.comparisons
        assert len(comps) == 4 and r.canary.shadow.errors == 0
        check_against_in_process(pair, comps)
        m = r.scrape()
        assert ("vllm:generation_tokens_total", (("model_name", "tiny-orig"), ("variant", "original"))) in m
        assert not [key for key in m if key[0].startswith("vllm:") and ("model_name", "tiny-comp") in key[1]]
    finally:
        r.close()


# ------------------------------------------------------------------------------------------- failures


def test_dead_compressed_backend_is_ejected_without_failing_a_request_then_readmitted(pair, backends):
    o, c = backends
    r = Router(o.url, c.url + "#tiny-comp", "--canary-weight", "1", "--remote-retries", "1",
               "--remote-eject-after", "2", "--remote-readmit-after", "2", "--max-consecutive-errors", "3")
    try:
        assert r.complete()[0] == "compressed"
        changes = []
        r.canary.served("compressed").remote.health.subscribe(lambda up, why: changes.append((time.monotonic(), up)))
        c.stop()
        t_kill = time.monotonic()
        latencies = []
        for i in range(16):
            t0 = time.monotonic()
            if i % 2:
                v, chunks = r.stream()
                assert all(ch.model == "tiny-orig" for ch in chunks) and chunks[-1].choices[0].finish_reason
            else:
                v, comp = r.complete()
                assert comp.model == "tiny-orig"
            latencies.append(time.monotonic() - t0)
            assert v == "original"
        wait_for(lambda: changes)
        (t_eject, up), = changes
        assert up is False and r.scrape()[up_key("compressed", "tiny-comp")] == 0
        st = r.admin("GET", "").json()
        assert st["state"] == "rolled_back" and st["rollback_kind"] == "engine_failure" and not st["compressed_up"]
        m = r.scrape()
        assert m[("modegpt_backend_ejections_total", (("variant", "compressed"),))] == 1
        assert m[("modegpt_rollbacks_total", (("reason", "engine_failure"),))] == 1
        assert m[requests_key("original", "fallback")] >= 14 and m[requests_key("compressed", "fallback")] == 0
        # even a request naming the ejected model: refused at once, then answered by the original like
        # every failed compressed attempt
        t0 = time.monotonic()
        assert r.complete(model="tiny-comp")[0] == "original" and time.monotonic() - t0 < 1
        print(f"\nfailover: first request after the kill {latencies[0] * 1000:.0f} ms, the next ones median "
              f"{statistics.median(latencies[1:]) * 1000:.0f} ms; ejected {t_eject - t_kill:.2f} s after the kill")

        c.start()  # back on the same port
        t_back = time.monotonic()
        wait_for(lambda: len(changes) == 2)
        assert [up for _, up in changes] == [False, True] and r.scrape()[up_key("compressed", "tiny-comp")] == 1
        print(f"re-admitted {changes[1][0] - t_back:.2f} s after the backend came back")
        assert r.complete(model="tiny-comp")[0] == "compressed"
        assert r.admin("GET", "").json()["compressed_up"]
        assert r.complete()[0] == "original"  # the split stays rolled back until an operator acts
        assert r.admin("POST", "/weight", json={"weight": 1.0}).json()["state"] == "idle"
        assert r.complete()[0] == "compressed"
    finally:
        r.close()


def test_dead_original_backend_fails_over_to_the_compressed(pair, backends):
    o, c = backends
    r = Router(o.url, c.url + "#tiny-comp", "--canary-weight", "0", "--remote-retries", "1",
               "--remote-eject-after", "2")
    try:
        assert r.complete()[0] == "original"
        o.stop()
        for i in range(8):
            v, comp = (r.stream() if i % 2 else r.complete())
            assert v == "compressed"
        r.wait_metric(up_key("original", "tiny-orig"), 0)
        for i in range(4):
            assert r.complete(user=f"sticky-{i}")[0] == "compressed"
        # critical and pinned requests never fail over: they fail
        crit = openai.OpenAI(base_url=f"{r.server.url}/v1", api_key=CRIT, max_retries=0, timeout=30)
        for client, model in ((crit, PUB), (r.client, "tiny-orig")):
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model=model, prompt="hello", max_tokens=2)
            assert e.value.status_code == 503
        m = r.scrape()
        assert m[requests_key("compressed", "failover")] == 12
        assert r.admin("GET", "").json()["state"] == "idle"  # not a canary failure

        o.start()
        r.wait_metric(up_key("original", "tiny-orig"), 1)
        assert r.complete()[0] == "original"
    finally:
        r.close()


def hanging_backend(model_id: str) -> ServerThread:
    """An OpenAI-compatible server that is healthy and lists its model but never answers a completion."""
    app = FastAPI()

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model"}]})

    @app.post("/v1/completions")
    async def completions():
        await asyncio.sleep(3)  # far past the read timeout; ends within the test server's graceful stop

    return ServerThread(app).start()


def test_a_hanging_compressed_backend_times_out_and_is_retried_on_the_original(pair, backends):
    o, _ = backends
    hung = hanging_backend("tiny-comp")
    # its health checks pass (and would re-admit it at once): probe rarely
    r = Router(o.url, f"{hung.url}/v1", "--canary-weight", "1", "--remote-read-timeout", "0.5",
               "--stall-timeout", "5", "--remote-eject-after", "3", "--max-consecutive-errors", "10",
               "--remote-health-interval", "60")
    try:
        for i in range(3):
            t0 = time.monotonic()
            v, _ = r.stream() if i % 2 else r.complete()
            assert v == "original" and time.monotonic() - t0 < 3  # read timeout, then the original
        m = r.scrape()
        assert m[up_key("compressed", "tiny-comp")] == 0  # three timeouts in a row: ejected
        assert m[("modegpt_backend_retries_total", (("variant", "compressed"),))] == 0  # timeouts are not retried
        st = r.admin("GET", "").json()
        assert st["rollback_kind"] == "engine_failure" and "failed requests" in st["reason"]
    finally:
        r.close()
        hung.stop()


def test_a_backend_down_at_startup_starts_ejected(pair, backends):
    o, _ = backends
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = Router(o.url, f"http://127.0.0.1:{port}/v1#tiny-comp", "--canary-weight", "1")
    try:
        assert r.scrape()[up_key("compressed", "tiny-comp")] == 0
        assert r.complete()[0] == "original"  # the first compressed decision disables the canary
        assert r.admin("GET", "").json()["rollback_kind"] == "engine_failure"
    finally:
        r.close()


# ------------------------------------------------------------------------------------------- the CLI


def test_modegpt_serve_with_remote_variants(backends):
    o, c = backends
    srv = start_serve("--original", o.url, "--compressed", c.url + "#tiny-comp", "--name", PUB,
                      "--canary-weight", "1", "--remote-health-interval", "0.5")
    try:
        wait_health(srv.url, 200)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny-orig", "tiny-comp", PUB]
        raw = client.completions.with_raw_response.create(model=PUB, prompt="hello", max_tokens=3)
        assert raw.headers["x-modegpt-variant"] == "compressed" and raw.parse().model == "tiny-comp"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'modegpt_backend_up{model_name="tiny-comp",variant="compressed"} 1.0' in metrics
    finally:
        code = srv.stop()
    assert code in (0, 130), srv.output
    assert "Traceback" not in srv.output
