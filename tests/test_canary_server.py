"""The canary end to end: the app under uvicorn on loopback, real AsyncEngines over tiny ModeGPT models
(an "original" with random weights, a "compressed" one = the original with perturbed weights, and a
"far" one with unrelated weights), driven by the official ``openai`` client and httpx."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import build_app
from server.api.registry import ModelRegistry, ServedModel
from server.api.testing import ServerThread
from server.canary.canary import Canary
from server.canary.config import CanaryConfig
from server.engine.async_engine import AsyncEngine
from server.engine.testing import byte_tokenizer, llama_like_config, random_state_dict

ADMIN = "admin-secret-123"
CRIT = "critical-key-456"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def perturbed(sd, scale, seed=11):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale * v.std() for k, v in sd.items()}


@pytest.fixture(scope="module")
def engines():
    tok = byte_tokenizer()
    cfg = llama_like_config()
    sd = random_state_dict(cfg)

    def make(name, weights):
        e = AsyncEngine(name, cfg, weights, tok, dtype=torch.float32, kv_cache_bytes=8 << 20, max_model_len=64)
        e.start()
        return e

    es = {"orig": make("tiny-orig", sd), "comp": make("tiny-comp", perturbed(sd, 0.05)),
          "far": make("tiny-far", random_state_dict(cfg, seed=5)), "tok": tok}
    yield es
    for k, e in es.items():
        if k != "tok":
            e.shutdown()


class Stack:
    def __init__(self, original, compressed, clock=time.monotonic, **cfg):
        cfg = {"public_name": "tiny-pub", "weight": 0.0, "shadow_fraction": 0.0, "score_fraction": 0.0,
               "seed": 1, "admin_keys": [ADMIN], "critical": {"api_keys": [CRIT]}, **cfg}
        self.config = CanaryConfig.from_dict(cfg)
        self.registry = ModelRegistry()
        o = self.registry.add(ServedModel(original.model_id, original))
        c = self.registry.add(ServedModel(compressed.model_id, compressed, parent=o.name))
        self.registry.add_alias("tiny-pub", o.name)
        self.app = build_app(self.registry, admin_keys=self.config.admin_keys)
        self.canary = Canary(self.config, o, c, metrics=self.app.state.canary_metrics, clock=clock)
        self.registry.set_canary(self.canary)
        self.registry.mark_ready()
        self.server = ServerThread(self.app).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="x", max_retries=0, timeout=60)

    def wait_shadow(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self.canary.shadow.outstanding:
            assert time.monotonic() < deadline, "shadow worker did not drain"
            time.sleep(0.02)

    def admin(self, method, path, key=ADMIN, **kw):
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        return self.http.request(method, f"/admin/canary{path}", headers=headers, **kw)

    def scrape(self):
        out = {}
        for fam in text_string_to_metric_families(self.http.get("/metrics").text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def close(self):
        self.http.close()
        self.canary.stop()
        self.server.stop()


def post(stack, headers=None, **body):
    r = stack.http.post("/v1/completions", json={"model": "tiny-pub", "prompt": "hello", "max_tokens": 1, **body},
                        headers=headers)
    assert r.status_code == 200, r.text
    return r


def finished(engine) -> int:
    return engine.stats().requests_finished_total


def check_variant(stack, r):
    v = r.headers["x-modegpt-variant"]
    assert r.json()["model"] == stack.canary.served(v).name
    return v


# ------------------------------------------------------------------------------------------- routing


def test_http_split_sticky_and_metrics(engines):
    s = Stack(engines["orig"], engines["comp"], weight=0.25)
    try:
        comp0 = finished(engines["comp"])
        n = 300
        with ThreadPoolExecutor(6) as ex:
            variants = list(ex.map(lambda _: check_variant(s, post(s)), range(n)))
        k = variants.count("compressed")
        assert abs(k - n * 0.25) <= 4 * math.sqrt(n * 0.25 * 0.75), k
        # the same user always lands on the same variant, the one its hash bucket says
        users = [f"user-{i}" for i in range(20)]
        for u in users:
            got = {check_variant(s, post(s, user=u)) for _ in range(3)}
            want = s.canary.router.decide("tiny-pub", user=u).variant
            assert got == {want}
        assert finished(engines["comp"]) - comp0 == k + sum(
            s.canary.router.decide("tiny-pub", user=u).variant == "compressed" for u in users) * 3
        m = s.scrape()
        assert m[("modegpt_requests_total", (("reason", "weight"), ("variant", "compressed")))] == k
        assert m[("modegpt_requests_total", (("reason", "weight"), ("variant", "original")))] == n - k
        assert m[("modegpt_canary_weight", ())] == 0.25
        # the vLLM-named metrics carry the variant beside model_name
        assert m[("vllm:generation_tokens_total", (("model_name", "tiny-comp"), ("variant", "compressed")))] > 0
        assert m[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny-orig"),
                                                 ("variant", "original")))] >= n - k
        assert not [key for key in m if key[0].startswith("vllm:") and dict(key[1]).get("variant") not in
                    ("original", "compressed")]
        # streaming: the header names the variant too, and the chunks' model field agrees
        r = s.http.post("/v1/completions", json={"model": "tiny-pub", "prompt": "hello", "max_tokens": 3,
                                                 "stream": True, "user": users[0]})
        v = r.headers["x-modegpt-variant"]
        assert v == s.canary.router.decide("tiny-pub", user=users[0]).variant
        assert f'"model":"{s.canary.served(v).name}"' in r.text and r.text.endswith("data: [DONE]\n\n")
    finally:
        s.close()


def test_pinning_and_critical_never_reach_compressed(engines):
    s = Stack(engines["orig"], engines["comp"], weight=1.0, shadow_fraction=1.0, score_fraction=1.0)
    try:
        r = s.client.completions.with_raw_response.create(model="tiny-comp", prompt="hello", max_tokens=2)
        assert r.headers["x-modegpt-variant"] == "compressed" and r.parse().model == "tiny-comp"
        r = s.client.completions.with_raw_response.create(model="tiny-pub", prompt="hello", max_tokens=2,
                                                          extra_headers={"x-modegpt-variant": "original"})
        assert r.headers["x-modegpt-variant"] == "original" and r.parse().model == "tiny-orig"
        s.canary.router.set_weight(0.0)
        r = post(s, headers={"x-modegpt-variant": "compressed"})
        assert check_variant(s, r) == "compressed"
        s.canary.router.set_weight(1.0)
        s.wait_shadow()
        comp0 = finished(engines["comp"])
        crit = openai.OpenAI(base_url=f"{s.server.url}/v1", api_key=CRIT, max_retries=0, timeout=60)
        for model in ("tiny-pub", "tiny-comp"):
            for pin in ({}, {"x-modegpt-variant": "compressed"}):
                r = crit.completions.with_raw_response.create(model=model, prompt="hello", max_tokens=2,
                                                              extra_headers=pin)
                assert r.headers["x-modegpt-variant"] == "original" and r.parse().model == "tiny-orig"
                r = post(s, headers={"x-modegpt-critical": "true", **pin}, model=model, user="u1")
                assert check_variant(s, r) == "original"
        s.wait_shadow()  # critical requests are neither compared nor shadowed
        assert finished(engines["comp"]) == comp0
        m = s.scrape()
        assert m[("modegpt_requests_total", (("reason", "critical"), ("variant", "original")))] == 8
        assert m[("modegpt_requests_total", (("reason", "critical"), ("variant", "compressed")))] == 0
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- comparisons


def _reference(engines, prompt_ids, tokens):
    """Plain torch: score prompt+tokens under both models, per-position KL / argmax / gap."""
    seq = prompt_ids + tokens
    lo = engines["orig"].score_sync([seq], timeout=60)[0][len(prompt_ids) - 1:len(seq) - 1].double()
    lc = engines["comp"].score_sync([seq], timeout=60)[0][len(prompt_ids) - 1:len(seq) - 1].double()
    kl = (lo.exp() * (lo - lc)).sum(-1)
    agree = lo.argmax(-1) == lc.argmax(-1)
    idx = torch.tensor(tokens)
    gap = lo[torch.arange(len(tokens)), idx] - lc[torch.arange(len(tokens)), idx]
    first = next((i for i, a in enumerate(agree.tolist()) if not a), None)
    return kl, agree, gap, first


def test_shadow_comparisons_match_independent_recomputation(engines):
    s = Stack(engines["orig"], engines["comp"], weight=0.5, shadow_fraction=1.0, score_fraction=1.0)
    try:
        prompts = ["hello world", "the quick brown", "a model", "continuous batching", "the lazy dog", "hello"]
        for i, p in enumerate(prompts):
            post(s, prompt=p, max_tokens=6, temperature=0, user=f"u{i}", ignore_eos=True)
        r = s.http.post("/v1/completions", json={"model": "tiny-pub", "prompt": "hello bytes", "max_tokens": 6,
                                                 "temperature": 0, "stream": True, "ignore_eos": True})
        assert r.status_code == 200
        s.wait_shadow()
        comps = s.canary.comparisons
        assert len(comps) == len(prompts) + 1 and s.canary.shadow.errors == 0
        assert {c.served_variant for c in comps} == {"original", "compressed"}
        tok = engines["tok"]
        for c in comps:
            assert c.shadow_variant and c.original_text is not None and c.compressed_text is not None
            assert c.exact_match == (c.original_text == c.compressed_text)
            assert c.original_model == "tiny-orig" and c.compressed_model == "tiny-comp"
            prompt_ids = tok(c.prompt_text)["input_ids"]
            served_first = c.served_variant
            outs = {"original": c.original_token_ids, "compressed": c.compressed_token_ids}
            order = [served_first, "compressed" if served_first == "original" else "original"]
            kls, agrees, gaps = [], [], []
            for v in order:
                kl, agree, gap, first = _reference(engines, prompt_ids, outs[v])
                d = c.per_output[v]
                assert d.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
                assert d.kl_max == pytest.approx(float(kl.max()), rel=1e-4, abs=1e-6)
                assert d.top1_agreement == pytest.approx(float(agree.double().mean()))
                assert d.logprob_gap == pytest.approx(float(gap.mean()), rel=1e-4, abs=1e-6)
                assert d.first_divergence == first
                kls.append(kl), agrees.append(agree), gaps.append(gap)
            assert c.kl_mean == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4, abs=1e-6)
            assert c.kl_max == pytest.approx(float(torch.cat(kls).max()), rel=1e-4, abs=1e-6)
            assert c.top1_agreement == pytest.approx(float(torch.cat(agrees).double().mean()))
            assert c.logprob_gap == pytest.approx(float(torch.cat(gaps).mean()), rel=1e-4, abs=1e-6)
            assert c.first_divergence_position == c.per_output[served_first].first_divergence
            assert 0 < c.kl_mean < 0.5  # a mildly perturbed "compressed" model
        m = s.scrape()
        assert m[("modegpt_comparisons_total", ())] == len(comps)
        assert m[("modegpt_shadow_runs_total", (("result", "ok"),))] == len(comps)
        assert m[("modegpt_exact_match_total", ())] == sum(bool(c.exact_match) for c in comps)
        assert m[("modegpt_divergence_kl_mean_count", ())] == len(comps)
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- rollout


def test_staged_rollout_rolls_back_on_divergence_without_failing_requests(engines):
    clock = FakeClock()
    s = Stack(engines["orig"], engines["far"], clock=clock, shadow_fraction=1.0, score_fraction=1.0,
              rollout={"steps": [0.5, 1.0], "interval_s": 10,
                       "thresholds": {"max_kl_mean": 0.5, "min_comparisons": 4, "max_latency_ratio": 100}})
    try:
        r = s.admin("POST", "/resume")  # idle -> the staged rollout starts at step 0
        assert r.status_code == 200 and r.json()["state"] == "progressing" and r.json()["weight"] == 0.5
        with ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(lambda i: post(s, prompt="the quick", max_tokens=4, user=f"r{i}"), range(12)))
        assert {check_variant(s, r) for r in rs} == {"original", "compressed"}
        s.wait_shadow()
        st = s.admin("GET", "").json()
        assert st["state"] == "progressing" and st["counts"]["step"]["comparisons"] == 12
        clock.advance(11)  # the hold is over: the next event runs the analysis
        for i in range(12, 24):
            check_variant(s, post(s, prompt="the quick", max_tokens=4, user=f"r{i}"))
        st = s.admin("GET", "").json()
        assert st["state"] == "rolled_back" and st["weight"] == 0.0 and st["rollback_kind"] == "kl"
        assert "kl_mean" in st["reason"] and "> 0.5" in st["reason"], st["reason"]
        assert st["last_analysis"]["values"]["kl_mean"] > 0.5
        for i in range(24, 34):  # after the rollback every unpinned request answers from the original
            r = post(s, user=f"r{i}")
            assert check_variant(s, r) == "original"
        m = s.scrape()
        assert m[("modegpt_rollbacks_total", (("reason", "kl"),))] == 1
        assert m[("modegpt_rollout_state", (("state", "rolled_back"),))] == 1
        assert m[("modegpt_canary_weight", ())] == 0.0
        assert m[("modegpt_requests_total", (("reason", "fallback"), ("variant", "original")))] >= 10
    finally:
        s.close()


def test_admin_api_requires_a_key_and_drives_the_rollout(engines, caplog):
    s = Stack(engines["orig"], engines["comp"])
    caplog.set_level(logging.DEBUG)
    try:
        for key, hdr in ((None, None), ("wrong", None), (None, "Basic " + ADMIN), (None, ADMIN)):
            headers = {"authorization": hdr} if hdr else ({"authorization": f"Bearer {key}"} if key else {})
            for method, path in (("GET", ""), ("POST", "/weight"), ("POST", "/promote"), ("POST", "/rollback")):
                r = s.http.request(method, f"/admin/canary{path}", headers=headers, json={"weight": 1})
                assert r.status_code == 401, (key, hdr, path)
                err = r.json()["error"]
                assert err["type"] == "AuthenticationError" and err["code"] == 401 and err["message"]
        assert s.canary.router.weight == 0.0
        st = s.admin("GET", "").json()
        assert st["state"] == "idle" and st["weight"] == 0.0 and st["step"] == -1 and "counts" in st
        r = s.admin("POST", "/weight", json={"weight": 0.3})
        assert r.status_code == 200 and r.json()["weight"] == 0.3 and s.canary.router.weight == 0.3
        for bad in ({"weight": 2}, {"weight": "x"}, {}):
            r = s.admin("POST", "/weight", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "weight"
        assert s.admin("POST", "/pause").status_code == 409  # nothing to pause while idle
        r = s.admin("POST", "/resume")
        assert r.json()["state"] == "progressing" and r.json()["weight"] == 0.01 and r.json()["step"] == 0
        assert s.admin("POST", "/pause").json()["state"] == "paused"
        assert s.admin("POST", "/resume").json()["state"] == "progressing"
        r = s.admin("POST", "/promote").json()
        assert r["state"] == "promoted" and r["weight"] == 1.0
        assert check_variant(s, post(s)) == "compressed"
        r = s.admin("POST", "/rollback", json={"reason": "bad answers"}).json()
        assert r["state"] == "rolled_back" and r["weight"] == 0.0 and "bad answers" in r["reason"]
        assert r["rollback_kind"] == "manual"
        assert check_variant(s, post(s)) == "original"
        assert s.admin("POST", "/rollback").status_code == 200  # no body is fine
        m = s.scrape()
        assert m[("modegpt_rollbacks_total", (("reason", "manual"),))] == 2
        assert ADMIN not in caplog.text
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- failures


def test_compressed_engine_failure_falls_back_without_user_errors(engines):
    tok = engines["tok"]
    cfg = engines["comp"].engine.config
    broken = AsyncEngine("tiny-broken", cfg, perturbed(random_state_dict(cfg), 0.05), tok, dtype=torch.float32,
                         kv_cache_bytes=8 << 20, max_model_len=64)
    broken.start()
    s = Stack(engines["orig"], broken, weight=1.0,
              rollout={"failure": {"max_consecutive_errors": 2, "stall_timeout_s": 0.5}})
    real_generate = broken.generate
    try:
        assert check_variant(s, post(s)) == "compressed"

        async def failing(req):
            raise RuntimeError("simulated engine failure")
            yield  # pragma: no cover

        broken.generate = failing
        r = post(s, max_tokens=3)  # retried on the original: invisible to the user
        assert check_variant(s, r) == "original" and r.json()["choices"][0]["finish_reason"] == "length"
        r = s.http.post("/v1/completions", json={"model": "tiny-pub", "prompt": "hello", "max_tokens": 3,
                                                 "stream": True})
        assert r.status_code == 200 and r.headers["x-modegpt-variant"] == "original"
        assert '"error"' not in r.text and '"model":"tiny-orig"' in r.text
        st = s.admin("GET", "").json()  # two failures in a row: the canary is off
        assert st["state"] == "rolled_back" and st["rollback_kind"] == "engine_failure" and st["weight"] == 0.0
        assert check_variant(s, post(s)) == "original"

        async def stalling(req):
            await asyncio.sleep(60)
            yield  # pragma: no cover

        s.admin("POST", "/weight", json={"weight": 1.0})
        broken.generate = stalling
        t0 = time.monotonic()
        assert check_variant(s, post(s)) == "original"  # no first token within 0.5 s: retried
        assert time.monotonic() - t0 < 10
        broken.generate = real_generate

        s.admin("POST", "/weight", json={"weight": 1.0})
        assert check_variant(s, post(s)) == "compressed"
        broken.shutdown()  # a stopped engine: the canary is disabled at the next request
        for _ in range(5):
            assert check_variant(s, post(s)) == "original"
        st = s.admin("GET", "").json()
        assert st["state"] == "rolled_back" and "not running" in st["reason"] and not st["compressed_up"]
        assert not broken.is_running  # nothing restarted it
        m = s.scrape()
        assert m[("modegpt_rollbacks_total", (("reason", "engine_failure"),))] == 2
        assert m[("modegpt_requests_total", (("reason", "fallback"), ("variant", "original")))] >= 5
    finally:
        broken.generate = real_generate
        s.close()
        broken.shutdown()
