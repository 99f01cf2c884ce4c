"""Decode speed of two or more model variants in one process, measured in rotating rounds (A B, B A, ...).

    python -m server.engine.bench_ab ORIGINAL COMPRESSED [--device cpu] [--dtype bfloat16] [--batch 8 ...]
    python -m server.engine.bench_ab CKPT CKPT@MODEGPT_PDL=0 --device cuda --batch 1 64   # an env A/B

`modegpt bench engine` times one model after the other. On a shared machine whose speed drifts (this
project's 2-core CPU VM drifted by up to 30 % within minutes, docs/BENCHMARKS.md) that ordering biases
the ratio; alternating rounds and taking medians cancels a slow drift. Each round decodes `--steps`
greedy steps for `--batch` sequences of `--prompt-len` token prompts (the prefill is not timed).
A variant `SPEC@KEY=VAL,...` runs its engine under those environment variables (construction, graph
capture and its rounds), so one process can compare kernel settings of one model as well.
Variants that differ only in host-side settings (`MODEGPT_ASYNC_SCHEDULING`) share one engine, which
takes the setting per round: the A/B then compares one set of graphs and kernel picks.
Prints the per-round milliseconds per step and each variant's median speedup over the first;
`--json` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from compressor.loading import load_modegpt
from server.engine.dtypes import default_dtype
from server.engine.engine import LLMEngine, async_scheduling_enabled
from server.engine.timing import prefill_then_decode
from server.engine.types import GenerationRequest, SamplingParams


def decode_ms_per_step(engine: LLMEngine, batch: int, prompt_len: int, steps: int, tag: str) -> float:
    for i in range(batch):
        prompt = [100 + (i * 7 + j) % 1000 for j in range(prompt_len)]
        engine.add_request(GenerationRequest(f"{tag}-{i}", prompt,
                                             SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)))
    return prefill_then_decode(engine).ms_per_decode_step


HOST_SETTINGS = ("MODEGPT_ASYNC_SCHEDULING",)  # read per round, not at construction


def build_key(spec: str, env: dict[str, str]) -> tuple:
    """What an engine's construction depends on: variants with one key share an engine."""
    return spec, tuple(sorted((k, v) for k, v in env.items() if k not in HOST_SETTINGS))


def parse_variant(arg: str) -> tuple[str, dict[str, str]]:
    """``SPEC`` or ``SPEC@KEY=VAL[,KEY=VAL...]``: a model and the environment its engine runs under
    (set around its construction, graph capture and every round; e.g. ``MODEGPT_PDL=0``)."""
    spec, _, env = arg.partition("@")
    pairs = [kv for kv in env.split(",") if kv]
    bad = [kv for kv in pairs if "=" not in kv or not kv.split("=", 1)[0]]
    if not spec or bad:
        raise SystemExit(f"bench_ab: {arg!r} is not SPEC or SPEC@KEY=VAL[,KEY=VAL]")
    return spec, dict(kv.split("=", 1) for kv in pairs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="SPEC[@KEY=VAL,...]",
                    help="two or more variants; the first is the baseline: a MODEL spec or checkpoint, optionally "
                         "with environment variables for its engine (e.g. /ckpt@MODEGPT_PDL=0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per variant and batch size")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the engines' context limit, which sizes the decode graphs' block tables (default: "
                         "prompt + steps + 16, as runs before session 7 used; a server runs with 4096 or more)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if len(args.models) < 2:
        ap.error("give at least two variants")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    variants = [parse_variant(m) for m in args.models]
    names = list(args.models)
    engines = []
    t0 = time.perf_counter()

    def progress(what: str) -> None:  # a run cut short by a time limit still says where its time went
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    max_model_len = args.max_model_len or args.prompt_len + args.steps + 16
    built: dict[tuple, LLMEngine] = {}
    for name, (spec, env) in zip(names, variants):
        key = build_key(spec, env)
        if key not in built:
            with mock.patch.dict(os.environ, env):
                loaded = load_modegpt(spec, args.device, dtype)
                built[key] = LLMEngine(loaded.config, loaded.state_dict, device=args.device, dtype=dtype,
                                       kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                                       max_num_seqs=max(16, *args.batch), max_model_len=max_model_len)
                del loaded
            progress(f"built {name} (loaded, warmed up, graphs captured)")
        engines.append(built[key])

    async_used = [False] * len(engines)

    def run(i: int, batch: int, steps: int, tag: str) -> float:
        eng = engines[i]
        with mock.patch.dict(os.environ, variants[i][1]):
            eng.async_scheduling = async_used[i] = async_scheduling_enabled(None, eng.runner)
            return decode_ms_per_step(eng, batch, args.prompt_len, steps, tag)

    runs = []
    for batch in args.batch:
        for i in range(len(engines)):  # warm-up: allocator, oneDNN primitives, graphs
            run(i, batch, 4, "warm")
        progress(f"warmed up b={batch}")
        rounds: list[list[float]] = [[] for _ in engines]
        for r in range(args.rounds):  # rotate the order each round: A B C, B C A, C A B, ...
            for k in range(len(engines)):
                i = (k + r) % len(engines)
                rounds[i].append(run(i, batch, args.steps, f"r{r}"))
        med = [statistics.median(v) for v in rounds]
        runs.append({"batch": batch, "ms_per_step": dict(zip(names, rounds)), "median_ms_per_step": dict(zip(names, med)),
                     "speedup_over_first": dict(zip(names, (med[0] / m for m in med)))})
        for name, v, m in zip(names, rounds, med):
            print(f"b={batch:<4} {name}: {' '.join(f'{x:.2f}' for x in v)} ms/step (median {m:.2f}, "
                  f"x{med[0] / m:.3f} of the first)", flush=True)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "dtype": str(dtype),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds, "variants": names,
              "async_scheduling": dict(zip(names, async_used)),
              "max_model_len": max_model_len,
              "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
