"""Decode speed of two models in one process, measured in alternating rounds (A B B A A B ...).

    python -m server.engine.bench_ab ORIGINAL COMPRESSED [--device cpu] [--dtype bfloat16] [--batch 8]

`modegpt bench engine` times one model after the other. On a shared machine whose speed drifts (this
project's 2-core CPU VM drifted by up to 30 % within minutes, docs/BENCHMARKS.md) that ordering biases
the ratio; alternating rounds and taking medians cancels a slow drift. Each round decodes `--steps`
greedy steps for `--batch` sequences of `--prompt-len` token prompts (the prefill is not timed).
Prints the per-round milliseconds per step and the median ratio; `--json` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from compressor.loading import load_modegpt
from server.engine.dtypes import default_dtype
from server.engine.engine import LLMEngine
from server.engine.types import GenerationRequest, SamplingParams


def decode_ms_per_step(engine: LLMEngine, batch: int, prompt_len: int, steps: int, tag: str) -> float:
    for i in range(batch):
        prompt = [100 + (i * 7 + j) % 1000 for j in range(prompt_len)]
        engine.add_request(GenerationRequest(f"{tag}-{i}", prompt,
                                             SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)))
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
        engine.step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t, n = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        n += 1
    sync()
    return (time.perf_counter() - t) / max(n, 1) * 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="the baseline: MODEL spec or checkpoint")
    ap.add_argument("b", help="the model compared with it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per model")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    specs = {"a": args.a, "b": args.b}
    engines = {}
    for role, spec in specs.items():
        loaded = load_modegpt(spec, args.device, dtype)
        engines[role] = LLMEngine(loaded.config, loaded.state_dict, device=args.device, dtype=dtype,
                                  kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), max_num_seqs=max(16, args.batch),
                                  max_model_len=args.prompt_len + args.steps + 16)
    for eng in engines.values():  # warm-up: allocator, oneDNN primitives, graphs
        decode_ms_per_step(eng, args.batch, args.prompt_len, 4, "warm")
    rounds: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for role in (("a", "b") if r % 2 == 0 else ("b", "a")):
            rounds[role].append(decode_ms_per_step(engines[role], args.batch, args.prompt_len, args.steps, f"r{r}"))
    med = {role: statistics.median(v) for role, v in rounds.items()}
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "dtype": str(dtype),
              "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps, "models": specs,
              "ms_per_step": rounds, "median_ms_per_step": med, "speedup_b_over_a": med["a"] / med["b"]}
    for role, v in rounds.items():
        print(f"{role} = {specs[role]}: {' '.join(f'{x:.1f}' for x in v)} ms/step (median {med[role]:.1f})")
    print(f"b is {result['speedup_b_over_a']:.2f}x a at batch {args.batch} ({dtype})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
