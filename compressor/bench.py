"""``modegpt bench``: benchmarks that write results files.

- ``bench compress``: wall time and peak memory of compressing one or more models.
- ``bench quality``: the quality table of ``docs/COMPRESSION.md``: the original, MoDeGPT (BI and
  uniform allocation) and the two baselines at several ratios, evaluated with ``modegpt eval``'s
  harness, written as JSON and Markdown.
- ``bench engine`` (``server/bench_engine.py``): decode/prefill throughput of models in our engine.
- ``bench serve`` (``server/bench.py``): a load generator against a running server, like ``vllm bench serve``.
"""
from __future__ import annotations

import json
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path


def _hardware(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores (CPU)"


def run_bench_compress(args) -> int:
    from .pipeline import CompressOptions, compress

    rows = []
    for spec in args.models:
        out = Path(args.workdir) / (spec.replace(":", "-").replace("/", "_") + f"-{round(args.ratio * 100)}")
        opts = CompressOptions(ratio=args.ratio, device=args.device, calib_samples=args.calib_samples,
                               calib_seqlen=args.calib_seqlen, progress=not args.quiet)
        t = time.perf_counter()
        report = compress(spec, out, opts, overwrite=True)
        rows.append({
            "model": spec, "ratio": args.ratio, "wall_s": time.perf_counter() - t,
            "timings": report["timings"], "peak_device_memory_gb": (report["peak_device_memory_bytes"] or 0) / 1e9,
            "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "calibration": f"{opts.calib_samples} x {opts.calib_seqlen}",
            "block_linear_ratio": report["block_linear_ratio"], "whole_model_ratio": report["whole_model_ratio"],
        })
        print(json.dumps(rows[-1], indent=2), flush=True)
    _write(args.json, {"bench": "compress", "device": _hardware(args.device), "rows": rows})
    return 0


def _write(path: Path, payload: dict) -> None:
    payload["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def run_bench_quality(args) -> int:
    from .cli import load_for_eval
    from .evaluate import average_accuracy, evaluate

    tasks = args.tasks.split(",")
    work = Path(args.workdir)
    results = json.loads(args.json.read_text()) if args.json.is_file() and args.resume else {"rows": []}
    done = {(r["method"], r["ratio"]) for r in results["rows"]}

    def record(method: str, ratio: float, spec: str, report: dict | None) -> None:
        model, tok = load_for_eval(spec, args.device)
        res = {}
        if "wikitext2" in tasks:
            res.update(evaluate(model, tok, ["wikitext2"], limit=args.ppl_limit, batch_size=args.batch_size,
                                seqlen=args.seqlen, progress=not args.quiet))
        mc = [t for t in tasks if t != "wikitext2"]
        if mc:
            res.update(evaluate(model, tok, mc, limit=args.limit, batch_size=args.batch_size, seqlen=args.seqlen,
                                progress=not args.quiet))
        row = {"method": method, "ratio": ratio, "params": sum(p.numel() for p in model.parameters()), "results": res}
        if mc:
            row.update(avg_acc=average_accuracy(res, "acc"), avg_acc_norm=average_accuracy(res, "acc_norm"))
        if report:
            row.update(block_linear_ratio=report["block_linear_ratio"], whole_model_ratio=report["whole_model_ratio"],
                       compress_s=report["timings"]["total_s"])
            if report.get("lm_head"):
                row["lm_head"] = report["lm_head"]
        results["rows"].append(row)
        _write(args.json, {**results, "bench": "quality", "model": args.model, "tasks": tasks, "limit": args.limit,
                           "ppl_limit": args.ppl_limit, "device": _hardware(args.device)})

    if ("original", 0.0) not in done:
        record("original", 0.0, args.model, None)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            if (method, ratio) in done:
                continue
            out = work / f"{method.replace(':', '-').replace('=', '').replace(',', '-')}-{round(ratio * 100)}"
            record(method, ratio, str(out), build_method(method, args.model, ratio, out, not args.quiet, args.device))
    return 0


def build_method(method: str, model: str, ratio: float, out: Path, progress: bool, device: str = "cpu") -> dict:
    """Build a checkpoint for ``method``: ``modegpt-bi``, ``modegpt-uniform``, ``svd-llm`` or ``prune-norm``,
    optionally with option overrides, e.g. ``modegpt-bi:sequential=0:align=1:ridge=1e-4``."""
    from .baselines import compress_baseline
    from .pipeline import CompressOptions, compress

    import torch

    name, *overrides = method.split(":")
    # float32 throughout: the quality table compares the math, and the original is evaluated in float32
    opts = CompressOptions(ratio=ratio, progress=progress, device=device, dtype=torch.float32)
    for item in overrides:
        key, _, value = item.partition("=")
        if not hasattr(opts, key):
            raise ValueError(f"unknown option {key!r} in method {method!r}")
        current = getattr(opts, key)
        if current is None or isinstance(current, (int, float, bool)):
            number = float(value)
            kind = type(current) if current is not None else (int if number.is_integer() else float)
            setattr(opts, key, kind(number))
        else:
            setattr(opts, key, value)
    if name == "modegpt-bi":
        return compress(model, out, opts, True)
    if name == "modegpt-uniform":
        opts.allocation = "uniform"
        return compress(model, out, opts, True)
    if name in ("svd-llm", "prune-norm"):
        return compress_baseline("svd" if name == "svd-llm" else "prune", model, out, opts, True)
    raise ValueError(f"unknown method {name!r}")


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write results files")
    bsub = bench.add_subparsers(dest="bench", required=True)

    c = bsub.add_parser("compress", help="compression wall time and peak memory")
    c.add_argument("models", nargs="+")
    c.add_argument("--ratio", type=float, default=0.3)
    c.add_argument("--device", default="cpu")
    c.add_argument("--calib-samples", type=int, default=None)
    c.add_argument("--calib-seqlen", type=int, default=None)
    c.add_argument("--workdir", default="runs/bench-compress")
    c.add_argument("--json", type=Path, default=Path("runs/bench-compress.json"))
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=run_bench_compress)

    q = bsub.add_parser("quality", help="MoDeGPT vs baselines: perplexity and zero-shot accuracy")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--ratios", default="0.15,0.25,0.35")
    q.add_argument("--methods", default="modegpt-bi,modegpt-uniform,svd-llm,prune-norm")
    q.add_argument("--tasks", default="wikitext2,piqa,arc_easy,arc_challenge")
    q.add_argument("--limit", type=int, default=None, help="items per multiple-choice task")
    q.add_argument("--ppl-limit", type=int, default=None, help="WikiText-2 windows")
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--device", default="cpu")
    q.add_argument("--workdir", default="runs/quality")
    q.add_argument("--json", type=Path, default=Path("runs/quality.json"))
    q.add_argument("--resume", action="store_true", help="skip rows already in --json")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=run_bench_quality)

    from kernels.bench import add_kernel_bench

    add_kernel_bench(bsub)
    try:
        from server.bench import add_serve_bench
        from server.bench_engine import add_engine_bench
    except ImportError:  # the server's dependencies are missing
        return
    add_engine_bench(bsub)
    add_serve_bench(bsub)


__all__ = ["add_bench_parser"]
