"""``modegpt bench serve`` (``server/loadgen.py``) against our real server on a loopback port.

``tiny-random`` (max_model_len 64, vocabulary 300) takes token-id prompts; ``tiny-script`` (max_model_len
4096) takes the text prompts of a JSONL dataset. ``ignore_eos`` makes every request generate exactly
its output length, which the usage chunk reports.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import time

import httpx
import pytest

from server.api.testing import TinyStack
from server.bench import add_serve_bench
from server.loadgen import (HEADER, BenchRequest, LoadResult, arrival_times, dataset_requests, random_requests,
                            run_load, summarize)

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@pytest.fixture(scope="module")
def stack():
    s = TinyStack()
    yield s
    s.close()


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="modegpt bench")
    add_serve_bench(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["serve", *argv])
    return args.func(args)


def assert_ordered_percentiles(summary: dict) -> None:
    for name in METRICS:
        s = summary[name]
        assert 0 <= s["median"] <= s["p90"] <= s["p99"], (name, s)
        assert s["mean"] > 0, (name, s)


def max_in_flight(records: list[dict]) -> int:
    """The most requests whose [send, end] intervals overlap (from the per-request JSON records)."""
    edges = sorted([(r["start_ms"], 1) for r in records] + [(r["start_ms"] + r["e2e_ms"], -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fixed_concurrency_cli(stack, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = bench(["--base-url", stack.url, "--num-prompts", "20", "--max-concurrency", "4", "--input-len", "16",
                "--output-len", "8", "--vocab-size", "300", "--seed", "3", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert HEADER in printed and "Successful requests:" in printed and "P99 TTFT (ms):" in printed

    res = json.loads(out.read_text())
    first_id = httpx.get(f"{stack.url}/v1/models").json()["data"][0]["id"]
    assert res["model"] == first_id and res["base_url"] == stack.url and res["date"] and res["command"]
    assert res["request_rate"] == "inf" and res["max_concurrency"] == 4
    assert (res["completed"], res["failed"], res["errors"]) == (20, 0, [])
    assert res["total_input_tokens"] == 20 * 16 and res["total_output_tokens"] == 20 * 8
    assert res["request_throughput"] == pytest.approx(20 / res["duration_s"])
    assert res["output_throughput"] == pytest.approx(160 / res["duration_s"])
    assert res["total_token_throughput"] == pytest.approx((320 + 160) / res["duration_s"])
    assert_ordered_percentiles(res)

    reqs = res["requests"]
    assert len(reqs) == 20
    for r in reqs:
        assert r["ok"] and r["error"] == ""
        assert (r["prompt_tokens"], r["output_tokens"]) == (16, 8)
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 7)
        assert all(g >= 0 for g in r["itl_ms"]) and sum(r["itl_ms"]) <= r["e2e_ms"] - r["ttft_ms"] + 1e-6
    assert max_in_flight(reqs) <= 4
    assert max(r["start_ms"] for r in reqs) > 0  # the cap queued some requests behind others


def test_poisson_rate_with_dataset(stack, tmp_path):
    rows = [("hello", 3), ("abc def", 5), ("the quick brown fox", 7), ("x", 1)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_len": n}) + "\n" for p, n in rows))
    requests = dataset_requests(path, 12, default_output_len=4)
    assert [(r.prompt, r.output_len) for r in requests] == [rows[i % 4] for i in range(12)]

    rate, seed = 25.0, 7
    load = asyncio.run(run_load(stack.url, "tiny-script", requests, request_rate=rate, seed=seed, timeout=60))
    arrivals = arrival_times(12, rate, seed)
    for req, res, at in zip(requests, load.results, arrivals):
        assert res.ok, res.error
        assert res.output_tokens == req.output_len
        assert res.prompt_tokens == len(stack.tokenizer(req.prompt)["input_ids"])
        assert 0 < res.ttft <= res.e2e
        assert res.start >= at - 1e-3  # never sent before its Poisson arrival time
        assert (res.tpot is None) == (req.output_len == 1)
    assert load.duration >= arrivals[-1]
    summary = summarize(load)
    assert (summary["completed"], summary["failed"]) == (12, 0)
    assert summary["total_output_tokens"] == 3 * (3 + 5 + 7 + 1)
    assert_ordered_percentiles(summary)


def test_arrival_times_are_seeded_poisson():
    a = arrival_times(4000, 50.0, seed=1)
    assert a == arrival_times(4000, 50.0, seed=1) and a != arrival_times(4000, 50.0, seed=2)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert a[0] == 0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.1)
    assert arrival_times(5, math.inf) == [0.0] * 5
    prompts = random_requests(3, 16, 8, vocab_size=300, seed=5)
    assert prompts == random_requests(3, 16, 8, vocab_size=300, seed=5)
    assert all(len(p.prompt) == 16 and all(100 <= t < 300 for t in p.prompt) for p in prompts)


def test_dead_server_fails_every_request_quickly(tmp_path):
    out = tmp_path / "dead.json"
    t0 = time.monotonic()
    rc = bench(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "10", "--max-concurrency", "2",
                "--input-len", "4", "--output-len", "4", "--timeout", "5", "--json", str(out)])
    assert time.monotonic() - t0 < 10
    assert rc == 1
    res = json.loads(out.read_text())
    assert (res["completed"], res["failed"], res["model"]) == (0, 10, None)
    assert res["total_output_tokens"] == 0 and res["request_throughput"] == 0
    assert all(v is None for name in METRICS for v in res[name].values())
    assert all(not r["ok"] and r["error"] for r in res["requests"])


def test_timeouts_and_rejections_count_as_failures(stack):
    # 3000 tokens take seconds on the tiny model; a 0.3 s limit cuts every stream short.
    t0 = time.monotonic()
    slow = asyncio.run(run_load(stack.url, "tiny-script", [BenchRequest("hello", 3000)] * 2, timeout=0.3))
    assert time.monotonic() - t0 < 5
    assert [r.error for r in slow.results] == ["timeout after 0.3 s"] * 2
    # prompt + max_tokens over tiny-random's 64-token context: the server answers 400.
    too_long = random_requests(3, 60, 8, vocab_size=300)
    rejected = asyncio.run(run_load(stack.url, "tiny-random", too_long, max_concurrency=2, timeout=30))
    assert all(not r.ok and r.error.startswith("HTTP 400") for r in rejected.results)
    summary = summarize(LoadResult(slow.results + rejected.results, slow.duration + rejected.duration))
    assert (summary["completed"], summary["failed"]) == (0, 5)


def test_mixed_streaming_and_plain_requests(stack, tmp_path):
    out = tmp_path / "mixed.json"
    rc = bench(["--base-url", stack.url, "--model", "tiny-random", "--num-prompts", "30", "--max-concurrency", "6",
                "--input-len", "8", "--output-len", "5", "--vocab-size", "300", "--stream-fraction", "0.5",
                "--strict", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and (res["completed"], res["failed"], res["stream_fraction"]) == (30, 0, 0.5)
    assert res["streamed"] + res["non_streamed"] == 30 and 5 < res["streamed"] < 25
    assert res["http_status"] == {"200": 30}
    assert res["by_variant"] == {"unattributed": 30}  # no canary in front of tiny-random
    for r in res["requests"]:
        assert r["ok"] and r["status"] == 200 and r["model"] == "tiny-random" and r["output_tokens"] == 5
        if r["stream"]:
            assert 0 < r["ttft_ms"] <= r["e2e_ms"] and r["tpot_ms"] is not None
        else:
            assert r["ttft_ms"] is None and r["tpot_ms"] is None and r["itl_ms"] == []
    assert res["e2el_ms"]["mean"] > 0 and res["ttft_ms"]["mean"] > 0


def test_an_incomplete_answer_is_a_failure(stack):
    # a stop token the scripted model reaches after 3 tokens: 200 OK, but fewer tokens than asked for
    body_ids = stack.tokenizer("hello", add_special_tokens=False)["input_ids"]
    third = stack.chain[(stack.chain.index(body_ids[-1]) + 3) % len(stack.chain)]
    load = asyncio.run(run_load(stack.url, "tiny-script", [BenchRequest("hello", 8), BenchRequest("hello", 8, False)],
                                timeout=30, extra_body={"stop_token_ids": [third]}))
    assert [r.error for r in load.results] == ["incomplete: 3 of 8 tokens"] * 2
    assert [r.status for r in load.results] == [200, 200]
