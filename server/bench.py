"""The serving benchmarks of ``modegpt bench``.

- ``bench serve``: load a running OpenAI-compatible server with streamed completions and report
  throughput, TTFT, TPOT, ITL and end-to-end latency like ``vllm bench serve`` (``server/loadgen.py``).
"""
from __future__ import annotations

import asyncio
import json
import math
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path


def run_serve_bench(args) -> int:
    from . import loadgen

    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.dataset is not None:
        requests = loadgen.dataset_requests(args.dataset, args.num_prompts, args.output_len)
    else:
        requests = loadgen.random_requests(args.num_prompts, args.input_len, args.output_len,
                                           vocab_size=args.vocab_size, seed=args.seed)
    requests = loadgen.with_streaming(requests, args.stream_fraction, args.seed)
    model = args.model or loadgen.fetch_model_id(args.base_url, timeout=min(args.timeout, 10.0))
    if model is None:
        print(f"warning: no model id from {args.base_url}/v1/models; sending requests without one",
              file=sys.stderr)
    load = asyncio.run(loadgen.run_load(args.base_url, model, requests, request_rate=args.request_rate,
                                        max_concurrency=args.max_concurrency, seed=args.seed,
                                        timeout=args.timeout, temperature=args.temperature))
    summary = loadgen.summarize(load)
    print(loadgen.format_report(summary, args.max_concurrency, args.request_rate))
    errors = sorted({r.error for r in load.results if not r.ok})
    if errors:
        print(f"{summary['failed']} failed; errors: " + "; ".join(errors[:5]), file=sys.stderr)
    if args.json is not None:
        record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
            "base_url": args.base_url, "model": model,
            "num_prompts": args.num_prompts,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "max_concurrency": args.max_concurrency, "seed": args.seed, "timeout_s": args.timeout,
            "temperature": args.temperature,
            "dataset": str(args.dataset) if args.dataset is not None else None,
            "input_len": None if args.dataset is not None else args.input_len,
            "output_len": args.output_len, "stream_fraction": args.stream_fraction,
            **summary,
            "errors": errors,
            "requests": loadgen.per_request_records(load),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if summary["completed"] and not (args.strict and summary["failed"]) else 1


def add_serve_bench(bsub) -> None:
    p = bsub.add_parser("serve", help="load a running OpenAI-compatible server (like vllm bench serve)",
                        description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the first id of /v1/models)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals at R req/s; inf (default) sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random token-id prompts)")
    p.add_argument("--output-len", type=int, default=128,
                   help="tokens generated per request (ignore_eos); with --dataset, for lines without output_len")
    p.add_argument("--vocab-size", type=int, default=1000, help="random prompt ids are drawn from [100, V)")
    p.add_argument("--dataset", type=Path, default=None,
                   help='JSONL file of {"prompt": str, "output_len": int} (instead of random prompts)')
    p.add_argument("--stream-fraction", type=float, default=1.0, metavar="F",
                   help="share of requests streamed (default 1: all); the rest are plain JSON requests")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the random prompts and the arrivals")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit, seconds")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--strict", action="store_true", help="exit 1 when any request failed (CI)")
    p.set_defaults(func=run_serve_bench)


__all__ = ["add_serve_bench", "run_serve_bench"]
