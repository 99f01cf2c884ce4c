"""The acceptance load test (issue 7): the embedded default as a user starts it (``modegpt serve`` with no
model arguments: SmolLM2-135M original + its cached 25% ModeGPT checkpoint, canary weight 0.1, shadow
fraction 0.2) under ``modegpt bench serve`` on loopback: 2,000 requests at concurrency 64, half of them
streamed, short prompts and 8 new tokens each.

Every request must come back 200, complete (finish reason, usage, exactly the tokens asked for; a
stream ends with ``[DONE]``) and attributed to a variant (``x-modegpt-variant`` and the variant's model
id); no 5xx, nothing lost; the canary keeps running (no engine-failure rollback) while comparisons and
shadow runs happen beside the load. The first run compresses the model (minutes on 2 cores; cached in
``~/.cache/modegpt``). The same command, run by hand, gives ``docs/results/bench-serve-cpu-canary-load-run*.json``
(``docs/BENCHMARKS.md``)."""
from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from test_api_cli import start_serve, wait_health
from test_loadgen import bench

pytestmark = pytest.mark.slow

ADMIN = "load-test-admin-key"
NUM, CONCURRENCY = 2000, 64


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    from compressor.default import ensure_default_checkpoint

    ensure_default_checkpoint(progress=False)  # the first slow test that needs it makes it, once
    review_db = tmp_path_factory.mktemp("load") / "review.sqlite3"
    srv = start_serve("--admin-key", ADMIN, "--review-db", str(review_db), "--kv-cache-gb", "1")
    try:
        wait_health(srv.url, 200, timeout=600)
        yield srv
    finally:
        code = srv.stop()
        assert code in (0, 130), srv.output
        assert "Traceback" not in srv.output, srv.output


def test_default_server_under_mixed_load(default_server, tmp_path):
    url = default_server.url
    out = tmp_path / "load.json"
    t0 = time.monotonic()
    rc = bench(["--base-url", url, "--model", "modegpt", "--num-prompts", str(NUM), "--max-concurrency",
                str(CONCURRENCY), "--input-len", "8", "--output-len", "8", "--vocab-size", "49152",
                "--stream-fraction", "0.5", "--timeout", "120", "--strict", "--json", str(out)])
    took = time.monotonic() - t0
    res = json.loads(out.read_text())
    assert rc == 0, res["errors"]
    assert (res["completed"], res["failed"], res["errors"]) == (NUM, 0, [])  # nothing lost
    assert res["http_status"] == {"200": NUM}  # no 5xx (and no 429: the load is under --max-pending)
    assert res["total_output_tokens"] == NUM * 8  # every response complete
    assert abs(res["streamed"] - NUM / 2) < 5 * math.sqrt(NUM / 4)

    # every response names its variant, and the model id agrees with it
    assert set(res["by_variant"]) == {"original", "compressed"}
    n_comp = res["by_variant"]["compressed"]
    assert abs(n_comp - 0.1 * NUM) < 5 * math.sqrt(NUM * 0.1 * 0.9), res["by_variant"]
    ids = {(r["variant"], r["model"]) for r in res["requests"]}
    assert ids == {("original", "smollm2-135m"), ("compressed", "smollm2-135m-modegpt-25")}, ids

    # the canary stayed on and compared answers beside the load
    st = httpx.get(f"{url}/admin/canary", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert st["state"] == "idle" and st["weight"] == 0.1 and st["compressed_up"], st
    assert st["shadow"]["shadow_runs"] > 0 and st["shadow"]["compared"] > 0, st["shadow"]
    assert st["counts"]["total"]["errors"] == {"original": 0, "compressed": 0}
    metrics = httpx.get(f"{url}/metrics").text
    assert 'modegpt_http_rejected_total{reason="overloaded"} 0.0' in metrics
    assert 'modegpt_http_deadline_exceeded_total{reason="timeout"} 0.0' in metrics
    print(f"\nload test: {NUM} requests in {res['duration_s']:.1f} s ({took:.1f} s with setup), "
          f"{res['request_throughput']:.1f} req/s, e2e p50/p99 {res['e2el_ms']['median']:.0f}/"
          f"{res['e2el_ms']['p99']:.0f} ms, by variant {res['by_variant']}")
