"""``modegpt serve`` with canary flags, as a user runs it (a subprocess on a loopback port)."""
from __future__ import annotations

import subprocess
import sys

import httpx

from test_api_cli import REPO, checkpoints, start_serve, wait_health  # noqa: F401 (fixture)


def test_serve_with_canary_flags(checkpoints, tmp_path):  # noqa: F811
    orig, comp = checkpoints
    cfg = tmp_path / "canary.yaml"
    cfg.write_text("public_name: ignored-by-name-flag\nshadow_fraction: 0\nrollout: {steps: [0.5, 1.0]}\n")
    srv = start_serve("--original", str(orig), "--compressed", str(comp), "--name", "pub", "--max-model-len", "128",
                      "--canary-config", str(cfg), "--canary-weight", "1", "--admin-key", "adm",
                      "--critical-key", "crit")
    try:
        wait_health(srv.url, 200)
        body = {"model": "pub", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-modegpt-variant"] == "compressed"
        assert r.json()["model"] == "tiny-comp"
        r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"authorization": "Bearer crit"}, timeout=60)
        assert r.headers["x-modegpt-variant"] == "original" and r.json()["model"] == "tiny-orig"
        assert httpx.get(f"{srv.url}/admin/canary").status_code == 401
        st = httpx.get(f"{srv.url}/admin/canary", headers={"authorization": "Bearer adm"}).json()
        assert st["weight"] == 1.0 and st["steps"] == [0.5, 1.0] and st["public_id"] == "pub"
        assert "modegpt_canary_weight 1.0" in httpx.get(f"{srv.url}/metrics").text
    finally:
        code = srv.stop()
    assert code in (0, 130), srv.output
    assert "Traceback" not in srv.output and "adm" not in srv.output.replace("admin", "")


def test_serve_rejects_a_bad_canary_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("weight: 3\n")
    p = subprocess.run([sys.executable, "-m", "compressor.cli", "serve", "--canary-config", str(cfg), "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "weight: must be between 0 and 1, got 3" in p.stderr and str(cfg) in p.stderr
