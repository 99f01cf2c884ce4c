"""Where one decode step's time goes: the whole ``LLMEngine.step()`` against its parts, at a given batch (default 1).

``python -m server.engine.profile_step MODEL [--device cuda] [--steps 50]`` prints and returns (JSON) the
mean milliseconds of: a full engine step; the model forward alone (the CUDA-graph replay on CUDA, the
eager forward elsewhere); the sampler on that step's logits; and the host-side rest (scheduling, input
preparation, bookkeeping) as the difference, with the scheduler's and the runner's input preparation also
timed alone (``schedule_ms``, ``prepare_ms``). The gap between a step and its forward is what bounds the
fraction of the bandwidth roofline a decode step can reach (docs/BENCHMARKS.md).

``--trace`` adds the forward's kernels (torch.profiler over the graph replays): per kernel name its
launches and device microseconds per step, the kernel count per step, and the idle time between
kernels (forward minus the sum of kernel times), which is the launch overhead left inside the graph.
``--compile`` builds the engine with ``torch.compile`` on the decode forward. ``--timeline PATH`` profiles
whole engine steps (graph replay, the copies around it, the sampler) and adds each GPU operation's share of
the step's critical path (``server.engine.timeline``), writing the Chrome trace to PATH.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compressor.loading import load_modegpt
from server.engine.engine import LLMEngine
from server.engine.timeline import profile_timeline
from server.engine.types import GenerationRequest, SamplingParams


def _timed(fn, n: int, sync) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return 1000 * (time.perf_counter() - t) / n


def kernel_breakdown(fn, steps: int, top: int = 30) -> dict:
    """Device time per step of the CUDA kernels `fn` launches (run `steps` times under torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us and e.count:
            rows.append({"kernel": e.key[:120], "launches_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernels_per_step": sum(r["launches_per_step"] for r in rows),
            "kernel_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows[:top]}


def profile_step(spec: str, device: str, steps: int = 50, dtype: torch.dtype | None = None,
                 trace: bool = False, compile: bool = False, batch: int = 1, kv_cache_gb: float = 4.0,
                 timeline: str | None = None) -> dict:
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    loaded = load_modegpt(spec, device, dtype)
    eng = LLMEngine(loaded.config, loaded.state_dict, device=device, dtype=dtype,
                    kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
                    max_num_seqs=batch, max_model_len=64 + 4 * steps + 16, eos_token_id=None, compile=compile)
    vocab = int(loaded.config["vocab_size"])
    for i in range(batch):
        eng.add_request(GenerationRequest(f"p{i}", [10 + (i * 131 + j) % (vocab - 10) for j in range(64)],
                                          SamplingParams(max_tokens=4 * steps, temperature=0.0, ignore_eos=True)))
    while eng.scheduler.waiting or any(s.num_computed < 64 for s in eng.scheduler.running):
        eng.step()
    for _ in range(3):
        eng.step()  # warm
    r = {"model": spec, "device": device, "dtype": str(dtype), "graphs": eng.runner.use_graphs,
         "kernels": bool(eng.runner.kernels), "compile": compile, "batch": batch,
         "async_scheduling": eng.async_scheduling}
    r["step_ms"] = _timed(eng.step, steps, sync)
    if timeline:
        r["timeline"] = profile_timeline(eng.step, steps, sync, timeline)
    eng.flush()  # the parts below run on the host's current state
    if eng.runner.use_graphs:
        tables = [eng.runner.kv.allocator.table(s.request_id) for s in eng.scheduler.running]
        b, w = eng.runner.graph_for(batch, max(len(t) for t in tables))
        g, logits = eng.runner.graphs[b][w]
        r["graph"] = {"batch_bucket": b, "table_width": w}
        r["forward_ms"] = _timed(g.replay, steps, sync)
        if trace:
            r["trace"] = kernel_breakdown(g.replay, steps)
            r["trace"]["idle_us_per_step"] = 1000 * r["forward_ms"] - r["trace"]["kernel_us_per_step"]
    else:
        out = eng.scheduler.schedule()
        r["forward_ms"] = _timed(lambda: eng.runner.execute(out), steps, sync)
        logits = eng.runner.execute(out).logits
    seqs = eng.scheduler.running[:batch]
    r["sampler_ms"] = _timed(lambda: eng.sampler(logits[:batch].clone(), seqs), steps, sync)
    # with async scheduling the host's work overlaps the next forward, so this can be ~0 or below
    r["host_rest_ms"] = r["step_ms"] - r["forward_ms"] - r["sampler_ms"]
    # two parts of the host rest, each timed alone: in a decode-only steady state both are idempotent
    # (medians of 7 repeats: a fraction of a millisecond each, easily disturbed by another process)
    out = eng.scheduler.schedule()
    r["schedule_ms"] = statistics.median(_timed(eng.scheduler.schedule, steps, lambda: None) for _ in range(7))
    r["prepare_ms"] = statistics.median(_timed(lambda: eng.runner.prepare(out), steps, lambda: None) for _ in range(7))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--trace", action="store_true", help="per-kernel device time of the graph replay")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode forward")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--kv-cache-gb", type=float, default=4.0,
                   help="KV cache budget; each sequence holds 64 + 4 x steps tokens (batch 256 of LLaMA-2-7B: ~26 GB)")
    p.add_argument("--timeline", default=None, metavar="TRACE_JSON",
                   help="critical-path shares of whole engine steps; the Chrome trace is written here")
    a = p.parse_args(argv)
    r = profile_step(a.model, a.device, a.steps, trace=a.trace, compile=a.compile, batch=a.batch,
                     kv_cache_gb=a.kv_cache_gb, timeline=a.timeline)
    print(json.dumps(r, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
