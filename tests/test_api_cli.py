"""``modegpt serve`` as a user runs it: a subprocess serving two real checkpoints on a loopback port."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from compressor.checkpoint import write_checkpoint
from server.api.testing import SCRIPT, scripted_model
from server.engine.testing import byte_tokenizer, llama_like_config, random_state_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tok = byte_tokenizer()
    tok_dir = root / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    cfg = llama_like_config()
    orig = write_checkpoint(root / "tiny-orig", cfg, random_state_dict(cfg), tok_dir, {"kind": "test"})
    scfg, ssd, _ = scripted_model(tok, SCRIPT)
    comp = write_checkpoint(root / "tiny-comp", scfg, ssd, tok_dir, {"kind": "test"})
    return orig, comp


class Served:
    """A running ``modegpt serve`` subprocess; its output is drained in a thread (kept in ``lines``)."""

    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines
        self._drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        self._drain.start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._drain.join(5)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def start_serve(*args: str) -> Served:
    cmd = [sys.executable, "-m", "compressor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
           "--kv-cache-gb", "0.01", "--log-level", "warning", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return Served(proc, m.group(1), lines)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"server did not announce its address; exit code {proc.wait()}")


def wait_health(url: str, want: int, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == want:
                return r
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"/health never answered {want}"
        time.sleep(0.1)


def test_serve_original_and_compressed(checkpoints):
    orig, comp = checkpoints
    srv = start_serve("--original", str(orig), "--compressed", str(comp), "--name", "pub", "--max-model-len", "128")
    url = srv.url
    try:
        wait_health(url, 200)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        cards = {m.id: m for m in client.models.list()}
        assert list(cards) == ["tiny-orig", "tiny-comp", "pub"]
        assert cards["tiny-comp"].parent == "tiny-orig" and cards["pub"].parent == "tiny-orig"
        assert cards["tiny-orig"].max_model_len == 128 and cards["tiny-comp"].root == str(comp)
        a = client.completions.create(model="pub", prompt="the quick", max_tokens=6, temperature=0)
        b = client.completions.create(model="tiny-orig", prompt="the quick", max_tokens=6, temperature=0)
        assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 6
        c = client.completions.create(model="tiny-comp", prompt="hello", max_tokens=11, temperature=0)
        assert c.choices[0].text == " é漢🙂!"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vllm:generation_tokens_total{model_name="tiny-comp",variant="compressed"} 11.0' in metrics
        assert 'vllm:generation_tokens_total{model_name="tiny-orig",variant="original"} 12.0' in metrics
    finally:
        code = srv.stop()
    assert code in (0, 130), srv.output  # 130: SIGINT, re-raised by uvicorn after a graceful shutdown
    assert "Traceback" not in srv.output


def test_serve_reports_a_failed_load_on_health(checkpoints, tmp_path):
    orig, _ = checkpoints
    srv = start_serve("--original", str(orig), "--compressed", str(tmp_path / "missing"))
    url = srv.url
    try:
        r = wait_health(url, 503)
        deadline = time.monotonic() + 120
        while "failed" not in r.json()["error"]["message"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "missing" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-orig", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    finally:
        code = srv.stop()
    assert code in (0, 130), srv.output
    assert "model loading failed" in srv.output
