"""The built-in dashboard (``GET /dashboard``) in a real headless Chromium against a real server on
loopback: tiny AsyncEngines, the canary on (a staged rollout in progress), a review queue filled by the
shadow comparisons.

Needs Debian's chromium and the ``playwright`` package (never ``playwright install``)::

    apt-get update && apt-get install -y --no-install-recommends chromium
    pip install playwright

Without them the browser test skips; the JSON endpoint test always runs. Set
``MODEGPT_DASHBOARD_SCREENSHOT=/some/file.png`` to keep a copy of the screenshot.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.api.app import build_app
from server.api.registry import ModelRegistry, ServedModel
from server.api.testing import ServerThread
from server.canary.canary import Canary
from server.canary.config import CanaryConfig
from server.canary.review import ReviewQueue
from server.engine.async_engine import AsyncEngine
from server.engine.testing import byte_tokenizer, llama_like_config, random_state_dict

ADMIN = "dash-admin-key-789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HINT = ("apt-get update && apt-get install -y --no-install-recommends chromium; pip install playwright "
        "(do not run `playwright install`)")
PROMPTS = ["hello world", "the quick brown", "a model", "the lazy dog", "continuous batching", "hello"]


def _chromium() -> str:
    for cand in (os.environ.get("MODEGPT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.exists(cand):
            return cand
    pytest.skip(f"chromium not installed ({HINT})")


def _wait_js(page, expr: str, timeout: float = 20.0) -> None:
    """Poll ``expr`` in the page until truthy (``page.wait_for_function`` evals a string inside the page,
    which the dashboard's Content-Security-Policy forbids; CDP evaluation is not subject to it)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expr):
        assert time.monotonic() < deadline, f"timed out waiting for {expr}"
        time.sleep(0.1)


def _perturbed(sd, scale, seed=11):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale * v.std() for k, v in sd.items()}


class DashStack:
    """original + mildly perturbed "compressed" engine, canary at a progressing rollout step, every
    comparison with KL > 0 queued for review."""

    def __init__(self, tmp_path: Path):
        tok = byte_tokenizer()
        cfg = llama_like_config()
        sd = random_state_dict(cfg)
        self.engines = []
        for name, weights in (("tiny-orig", sd), ("tiny-comp", _perturbed(sd, 0.05))):
            e = AsyncEngine(name, cfg, weights, tok, dtype=torch.float32, kv_cache_bytes=8 << 20, max_model_len=64)
            e.start()
            self.engines.append(e)
        self.config = CanaryConfig.from_dict({
            "public_name": "tiny-pub", "weight": 0.0, "shadow_fraction": 1.0, "score_fraction": 1.0, "seed": 1,
            "admin_keys": [ADMIN], "review": {"kl_threshold": 0.0},
            "rollout": {"steps": [0.25, 0.5, 1.0], "interval_s": 3600}})
        self.queue = ReviewQueue(tmp_path / "review.sqlite3")
        self.registry = ModelRegistry()
        o = self.registry.add(ServedModel("tiny-orig", self.engines[0], variant="original"))
        c = self.registry.add(ServedModel("tiny-comp", self.engines[1], parent=o.name, variant="compressed"))
        self.registry.add_alias("tiny-pub", o.name)
        self.app = build_app(self.registry, admin_keys=self.config.admin_keys, review_queue=self.queue)
        self.canary = Canary(self.config, o, c, metrics=self.app.state.canary_metrics, review_queue=self.queue)
        self.registry.set_canary(self.canary)
        self.registry.mark_ready()
        self.server = ServerThread(self.app).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)
        self.auth = {"authorization": f"Bearer {ADMIN}"}
        self._stop = threading.Event()
        self._traffic: threading.Thread | None = None

    def post(self, i: int) -> None:
        r = self.http.post("/v1/completions", json={"model": "tiny-pub", "prompt": PROMPTS[i % len(PROMPTS)],
                                                    "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                                    "user": f"user-{i}"})
        assert r.status_code == 200, r.text

    def wait_pending(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.canary.shadow.outstanding or self.queue.count("pending") < n:
            assert time.monotonic() < deadline, f"fewer than {n} pending review items"
            time.sleep(0.05)

    def start_traffic(self, period_s: float = 0.25) -> None:
        """A trickle of requests in the background, so the charts' rates move while the page is open."""
        def loop():
            i = 100
            while not self._stop.wait(period_s):
                try:
                    self.post(i)
                except Exception:  # noqa: BLE001 - stopping mid-request is fine
                    pass
                i += 1

        self._traffic = threading.Thread(target=loop, name="dash-traffic", daemon=True)
        self._traffic.start()

    def close(self) -> None:
        self._stop.set()
        if self._traffic is not None:
            self._traffic.join(10)
        self.http.close()
        self.canary.stop()
        self.server.stop()
        self.queue.close()
        for e in self.engines:
            e.shutdown()


@pytest.fixture
def stack(tmp_path):
    s = DashStack(tmp_path)
    try:
        r = s.http.post("/admin/canary/resume", headers=s.auth)  # progressing, step 0 (weight 0.25)
        assert r.status_code == 200 and r.json()["state"] == "progressing", r.text
        for i in range(8):
            s.post(i)
        s.wait_pending(3)
        s.canary.review_rules.kl_threshold = 1e9  # the queue holds still from here on (traffic goes on)
        yield s
    finally:
        s.close()


def test_dashboard_page_and_data_are_public_and_hold_no_private_data(stack):
    r = stack.http.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    assert "<canvas" in html and "sessionStorage" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external asset

    r = stack.http.get("/dashboard/data")
    assert r.status_code == 200
    d = r.json()
    assert d["canary"] == {"public_id": "tiny-pub", "original": "tiny-orig", "compressed": "tiny-comp",
                           "rollback_kind": None, "steps": [0.25, 0.5, 1.0]}
    assert d["weight"] == 0.25 and d["state"] == "progressing" and d["step"] == 0
    assert sum(d["requests"]["original"].values()) + sum(d["requests"]["compressed"].values()) == 8
    assert d["comparisons"] == 8 and d["shadow"]["ok"] == 8 and d["kl_mean"]["count"] == 8
    assert 0 < d["kl_mean"]["sum"] / d["kl_mean"]["count"] < 0.5
    assert d["review"]["depth"] == stack.queue.count("pending") >= 3
    models = {m["model_name"]: m for m in d["models"]}
    assert {n: m["variant"] for n, m in models.items()} == {"tiny-orig": "original", "tiny-comp": "compressed"}
    assert all(m["generation_tokens"] > 0 for m in models.values())
    text = r.text
    for secret in [ADMIN, *PROMPTS]:
        assert secret not in text, secret
    assert '"prompt"' not in text and "output" not in text
    # the admin data stays behind the key
    assert stack.http.get("/admin/canary").status_code == 401
    assert stack.http.get("/v1/review/items").status_code == 401


def test_dashboard_in_headless_chromium(stack, tmp_path):
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"playwright not installed ({HINT})")

    stack.start_traffic()
    errors: list[str] = []
    shot = tmp_path / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(f"{stack.server.url}/dashboard")
            # without a key: the public aggregates render, the queue asks for the key
            _wait_js(page, "Number(document.body.dataset.polls || 0) >= 1", 20)
            assert "Enter the admin key" in page.inner_text("#queue-msg")
            assert page.get_attribute("#state", "data-value") == "progressing"

            page.fill("#admin-key", ADMIN)
            page.click("#key-save")
            assert page.evaluate("sessionStorage.getItem('modegpt.adminKey')") == ADMIN
            page.wait_for_selector("#queue .item", timeout=20000)
            for chart in ("c-traffic", "c-kl", "c-agree", "c-gen"):  # two polls at least: rates exist
                _wait_js(page, f"Number(document.getElementById('{chart}').getAttribute('data-points') || 0) >= 2", 30)

            status = stack.http.get("/admin/canary", headers=stack.auth).json()
            _wait_js(page, "document.getElementById('state-sub').textContent.includes('canary enabled')")
            assert float(page.get_attribute("#weight", "data-value")) == status["weight"] == 0.25
            assert page.get_attribute("#state", "data-value") == status["state"] == "progressing"
            assert int(page.get_attribute("#step", "data-value")) == status["step"] == 0
            assert page.inner_text("#weight") == "25.0 %"
            assert page.inner_text("#step") == "1 / 3"

            # the queue shows what the API holds: the oldest pending item's prompt and both outputs
            listed = stack.http.get("/v1/review/items?status=pending&limit=50", headers=stack.auth).json()["data"]
            first = listed[0]
            card = page.locator(f'#queue .item[data-id="{first["id"]}"]')
            assert card.locator("pre.prompt").inner_text() == first["prompt"]
            assert card.locator("pre.original").inner_text() == first["original_output"]
            assert card.locator("pre.compressed").inner_text() == first["compressed_output"]
            assert f'{first["divergence"]["kl_mean"]:.4f}' in card.inner_text()
            assert page.locator("#queue .item").count() == len(listed)

            page.fill("#reviewer", "browser-test")
            card.locator("input.note").fill("looks fine")
            card.locator('button[data-action="approve"]').click()
            page.wait_for_selector(f'#queue .item[data-id="{first["id"]}"]', state="detached", timeout=10000)
            item = stack.http.get(f"/v1/review/items/{first['id']}", headers=stack.auth).json()
            assert item["status"] == "approved" and item["reviewer"] == "browser-test" and item["note"] == "looks fine"
            _wait_js(page, "document.getElementById('queue-msg').textContent.includes('approved')")
            # the rest are still pending, and the page knows
            pending = stack.http.get("/v1/review/items?status=pending", headers=stack.auth).json()["data"]
            assert first["id"] not in [i["id"] for i in pending]
            _wait_js(page, f"document.querySelectorAll('#queue .item').length >= {len(pending)}")

            page.wait_for_timeout(2500)  # one more refresh for the screenshot
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MODEGPT_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["MODEGPT_DASHBOARD_SCREENSHOT"])
    assert not errors, errors
    # the key never went into the URL or the data endpoint
    assert ADMIN not in json.dumps(stack.http.get("/dashboard/data").json())
