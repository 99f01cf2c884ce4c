"""A load generator for an OpenAI-compatible server, measuring what ``vllm bench serve`` measures.

Every request is a ``/v1/completions`` call with ``ignore_eos``, so that the server generates exactly
``max_tokens`` tokens; by default all are streamed (SSE, ``stream_options.include_usage``), and a
``stream_fraction`` below 1 makes a seeded share of them plain JSON requests instead (a mixed load).
Requests arrive as a seeded Poisson process at ``request_rate`` req/s, or all at once (``inf``);
``max_concurrency`` caps how many are in flight, so ``inf`` with a cap is a fixed-concurrency load.

Per request: the HTTP status, E2E (send to the end of the response), the token counts of the usage
object and the variant that answered (the ``x-modegpt-variant`` header of a canary-routed request, and
the response's ``model``); for a streamed one also TTFT (send to the first chunk with non-empty text),
ITL (gaps between consecutive non-empty chunks) and TPOT ((E2E - TTFT) / (output tokens - 1)). A
request fails on a non-200 status, an error event in the stream, a stream without a usage chunk or
``[DONE]``, a response without a finish reason or with fewer tokens than asked for (incomplete), a
connection error or its timeout.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

HEADER = "============ Serving Benchmark Result ============"
PERCENTILES = (50, 90, 99)
LATENCY_METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                   ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))


# ---------------------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (a prompt of exactly len(prompt) tokens)
    output_len: int
    stream: bool = True


def with_streaming(requests: list[BenchRequest], stream_fraction: float, seed: int = 0) -> list[BenchRequest]:
    """``requests`` where a seeded ``stream_fraction`` of them stream (the others are plain requests)."""
    if not 0.0 <= stream_fraction <= 1.0:
        raise ValueError("--stream-fraction must be between 0 and 1")
    rng = random.Random(f"stream-{seed}")
    return [BenchRequest(r.prompt, r.output_len, rng.random() < stream_fraction) for r in requests]


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int = 1000,
                    seed: int = 0, low: int = 100) -> list[BenchRequest]:
    """``num`` token-id prompts of exactly ``input_len`` ids drawn uniformly from [low, vocab_size)."""
    if not 0 <= low < vocab_size:
        raise ValueError(f"--vocab-size must exceed {low}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    rng = random.Random(f"prompts-{seed}")
    return [BenchRequest([rng.randrange(low, vocab_size) for _ in range(input_len)], output_len)
            for _ in range(num)]


def dataset_requests(path: str | Path, num: int, default_output_len: int) -> list[BenchRequest]:
    """The first ``num`` lines of a JSONL file of ``{"prompt": str, "output_len": int}`` (the file is
    cycled when shorter); ``output_len`` defaults to ``default_output_len``."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, out_len = row["prompt"], int(row.get("output_len", default_output_len))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str, \"output_len\": int}}: {e}") from None
        if not isinstance(prompt, str) or not prompt or out_len < 1:
            raise ValueError(f"{path}:{lineno}: need a non-empty prompt string and output_len >= 1")
        rows.append(BenchRequest(prompt, out_len))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(num)]


def arrival_times(num: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds: all 0 for an infinite rate, else a seeded Poisson process (the first
    request at 0, exponential gaps of mean 1/rate)."""
    if request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], 0.0
    for i in range(num):
        if i:
            t += rng.expovariate(request_rate)
        times.append(t)
    return times


# ---------------------------------------------------------------------------------------- requests

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    stream: bool = True
    status: int | None = None  # HTTP status (None: no response)
    variant: str | None = None  # the x-modegpt-variant header
    model: str | None = None  # the response's model field
    start: float = 0.0  # send time, seconds after the benchmark start
    ttft: float | None = None  # seconds (streamed requests)
    e2e: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def completion_body(model: str | None, req: BenchRequest, temperature: float,
                    extra_body: dict | None = None) -> dict:
    body = {"prompt": req.prompt, "max_tokens": req.output_len, "temperature": temperature,
            "ignore_eos": True, "stream": req.stream, **(extra_body or {})}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if model is not None:
        body["model"] = model
    return body


async def _read_stream(resp: httpx.Response, t0: float, out: RequestResult) -> None:
    """Fill ``out`` from an SSE completion stream; raise ``RuntimeError`` on a malformed stream."""
    last = None
    first_any = None  # the first chunk with choices, the TTFT when no chunk carries text
    done = usage = finished = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments
        data = line[len("data:"):].strip()
        now = time.perf_counter()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            raise RuntimeError(f"error event: {err.get('message', err) if isinstance(err, dict) else err}")
        choices = event.get("choices") or []
        if choices and first_any is None:
            first_any = now
            out.model = event.get("model")
        finished = finished or any(c.get("finish_reason") for c in choices)
        if any(c.get("text") for c in choices):
            if last is None:
                out.ttft = now - t0
            else:
                out.itl.append(now - last)
            last = now
        if event.get("usage"):
            usage = True
            out.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
            out.output_tokens = int(event["usage"].get("completion_tokens") or 0)
    out.e2e = time.perf_counter() - t0
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if not usage:
        raise RuntimeError("no usage chunk")
    if not finished:
        raise RuntimeError("incomplete: no finish_reason")
    if last is None:
        out.ttft = (first_any - t0) if first_any is not None else out.e2e


def _read_json(data: bytes, out: RequestResult) -> None:
    """Fill ``out`` from a plain completion response; raise ``RuntimeError`` when it is incomplete."""
    resp = json.loads(data)
    choices = resp.get("choices") or []
    usage = resp.get("usage") or {}
    if not choices or not all(c.get("finish_reason") for c in choices):
        raise RuntimeError("incomplete: no finish_reason")
    if not usage:
        raise RuntimeError("no usage")
    out.model = resp.get("model")
    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    out.output_tokens = int(usage.get("completion_tokens") or 0)


async def send_request(client: httpx.AsyncClient, url: str, body: dict, timeout: float,
                       bench_start: float) -> RequestResult:
    """One completion, streamed or not as ``body`` says; never raises (a failure is ``ok=False`` with
    ``error``)."""
    out = RequestResult(stream=bool(body.get("stream")))
    t0 = time.perf_counter()
    out.start = t0 - bench_start
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as resp:
                out.status = resp.status_code
                out.variant = resp.headers.get("x-modegpt-variant")
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    raise RuntimeError(f"HTTP {resp.status_code}: {text}")
                if out.stream:
                    await _read_stream(resp, t0, out)
                else:
                    _read_json(await resp.aread(), out)
                    out.e2e = time.perf_counter() - t0
        if out.output_tokens != body["max_tokens"]:
            raise RuntimeError(f"incomplete: {out.output_tokens} of {body['max_tokens']} tokens")
        out.ok = True
    except TimeoutError:
        out.error = f"timeout after {timeout:g} s"
    except (httpx.HTTPError, RuntimeError, ValueError, OSError) as e:
        out.error = str(e) or type(e).__name__
    if not out.ok:
        out.e2e = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------- the load

@dataclass
class LoadResult:
    results: list[RequestResult]
    duration: float  # seconds, from the first send to the last completion


async def run_load(base_url: str, model: str | None, requests: list[BenchRequest],
                   request_rate: float = math.inf, max_concurrency: int | None = None,
                   seed: int = 0, timeout: float = 300.0, temperature: float = 0.0,
                   extra_body: dict | None = None) -> LoadResult:
    """Send every request at its arrival time (at most ``max_concurrency`` in flight) and wait for all;
    ``extra_body``: more request fields for every request."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if timeout <= 0:
        raise ValueError("--timeout must be positive")
    url = base_url.rstrip("/") + "/v1/completions"
    arrivals = arrival_times(len(requests), request_rate, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or max(len(requests), 1), max_keepalive_connections=None)
    http_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))

    async with httpx.AsyncClient(limits=limits, timeout=http_timeout) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            body = completion_body(model, req, temperature, extra_body)
            if gate is None:
                return await send_request(client, url, body, timeout, start)
            async with gate:
                return await send_request(client, url, body, timeout, start)

        tasks = []
        for req, at in zip(requests, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return LoadResult(results, duration)


def fetch_model_id(base_url: str, timeout: float = 10.0) -> str | None:
    """The first id of ``/v1/models``, or None when the server does not answer with one."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
        r.raise_for_status()
        data = r.json()["data"]
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError):
        return None


# ---------------------------------------------------------------------------------------- reporting

def _stats_ms(values: list[float]) -> dict[str, float | None]:
    """mean, median, std and PERCENTILES of ``values`` (seconds) in ms; None for an empty list."""
    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES]
    if not values:
        return dict.fromkeys(keys)
    a = np.asarray(values, dtype=np.float64) * 1000.0
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return out


def summarize(load: LoadResult) -> dict:
    """vLLM's ``BenchmarkMetrics``: counts, throughputs and latency statistics (ms)."""
    done = [r for r in load.results if r.ok]
    streamed = [r for r in done if r.stream]
    dur = load.duration
    inp = sum(r.prompt_tokens for r in done)
    outp = sum(r.output_tokens for r in done)
    summary = {
        "completed": len(done), "failed": len(load.results) - len(done), "duration_s": dur,
        "total_input_tokens": inp, "total_output_tokens": outp,
        "request_throughput": len(done) / dur if dur > 0 else 0.0,
        "output_throughput": outp / dur if dur > 0 else 0.0,
        "total_token_throughput": (inp + outp) / dur if dur > 0 else 0.0,
        "streamed": len(streamed), "non_streamed": len(done) - len(streamed),
        "http_status": _counts(str(r.status) if r.status is not None else "none" for r in load.results),
        "by_variant": _counts(r.variant or "unattributed" for r in done),
    }
    series = {"ttft": [r.ttft for r in streamed], "tpot": [r.tpot for r in streamed if r.tpot is not None],
              "itl": [g for r in streamed for g in r.itl], "e2el": [r.e2e for r in done]}
    for name, values in series.items():
        summary[f"{name}_ms"] = _stats_ms(values)
    summary["e2el_ms_by_variant"] = {v: _stats_ms([r.e2e for r in done if (r.variant or "unattributed") == v])
                                     for v in summary["by_variant"]}
    return summary


def _counts(keys) -> dict[str, int]:
    return dict(sorted(Counter(keys).items()))


def format_report(summary: dict, max_concurrency: int | None = None, request_rate: float = math.inf) -> str:
    def row(label: str, value, fmt: str = "{:.2f}") -> str:
        return f"{label:<40}{'-' if value is None else fmt.format(value):<10}"

    lines = [HEADER,
             row("Successful requests:", summary["completed"], "{}"),
             row("Failed requests:", summary["failed"], "{}"),
             row("Maximum request concurrency:", max_concurrency, "{}"),
             row("Request rate configured (RPS):", request_rate),
             row("Benchmark duration (s):", summary["duration_s"]),
             row("Total input tokens:", summary["total_input_tokens"], "{}"),
             row("Total generated tokens:", summary["total_output_tokens"], "{}"),
             row("Request throughput (req/s):", summary["request_throughput"]),
             row("Output token throughput (tok/s):", summary["output_throughput"]),
             row("Total token throughput (tok/s):", summary["total_token_throughput"]),
             row("Streamed / non-streamed requests:", f"{summary['streamed']} / {summary['non_streamed']}", "{}"),
             row("HTTP status counts:", ", ".join(f"{k}: {v}" for k, v in summary["http_status"].items()), "{}")]
    if set(summary["by_variant"]) != {"unattributed"}:
        lines.append(row("Answered by variant:", ", ".join(f"{k}: {v}" for k, v in summary["by_variant"].items()),
                         "{}"))
    for name, title in LATENCY_METRICS:
        stats = summary[f"{name}_ms"]
        lines.append(f"{title:-^50}")
        lines.append(row(f"Mean {name.upper()} (ms):", stats["mean"]))
        lines.append(row(f"Median {name.upper()} (ms):", stats["median"]))
        lines.extend(row(f"P{p} {name.upper()} (ms):", stats[f"p{p}"]) for p in PERCENTILES[1:])
    lines.append("=" * 50)
    return "\n".join(lines)


def per_request_records(load: LoadResult) -> list[dict]:
    """The per-request measurements in ms, for the JSON file."""
    out = []
    for r in load.results:
        d = asdict(r)
        d.update(start_ms=r.start * 1000, ttft_ms=None if r.ttft is None else r.ttft * 1000, e2e_ms=r.e2e * 1000,
                 itl_ms=[g * 1000 for g in r.itl], tpot_ms=None if r.tpot is None else r.tpot * 1000)
        for k in ("start", "ttft", "e2e", "itl"):
            del d[k]
        out.append(d)
    return out


__all__ = ["HEADER", "BenchRequest", "RequestResult", "LoadResult", "random_requests", "dataset_requests",
           "with_streaming", "arrival_times", "run_load", "fetch_model_id", "summarize", "format_report", "per_request_records"]
