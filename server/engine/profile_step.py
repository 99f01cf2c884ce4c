"""Where one decode step's time goes: the whole ``LLMEngine.step()`` against its parts, at batch 1.

``python -m server.engine.profile_step MODEL [--device cuda] [--steps 50]`` prints and returns (JSON) the
mean milliseconds of: a full engine step; the model forward alone (the CUDA-graph replay on CUDA, the
eager forward elsewhere); the sampler on that step's logits; and the host-side rest (scheduling, input
preparation, bookkeeping) as the difference. The gap between a step and its forward is what bounds the
fraction of the bandwidth roofline a decode step can reach (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from compressor.loading import load_modegpt
from server.engine.engine import LLMEngine
from server.engine.types import GenerationRequest, SamplingParams


def _timed(fn, n: int, sync) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return 1000 * (time.perf_counter() - t) / n


def profile_step(spec: str, device: str, steps: int = 50, dtype: torch.dtype | None = None) -> dict:
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    loaded = load_modegpt(spec, device, dtype)
    eng = LLMEngine(loaded.config, loaded.state_dict, device=device, dtype=dtype, kv_cache_bytes=1 << 30,
                    max_num_seqs=1, max_model_len=64 + 4 * steps + 16, eos_token_id=None)
    eng.add_request(GenerationRequest("p", list(range(10, 74)),
                                      SamplingParams(max_tokens=4 * steps, temperature=0.0, ignore_eos=True)))
    while eng.scheduler.running == [] or eng.scheduler.running[0].num_computed < 64:
        eng.step()
    for _ in range(3):
        eng.step()  # warm
    r = {"model": spec, "device": device, "dtype": str(dtype), "graphs": eng.runner.use_graphs,
         "kernels": bool(eng.runner.kernels)}
    r["step_ms"] = _timed(eng.step, steps, sync)
    if eng.runner.use_graphs:
        g, logits = eng.runner.graphs[1]
        r["forward_ms"] = _timed(g.replay, steps, sync)
    else:
        out = eng.scheduler.schedule()
        r["forward_ms"] = _timed(lambda: eng.runner.execute(out), steps, sync)
        logits = eng.runner.execute(out).logits
    seq = eng.scheduler.running[0]
    r["sampler_ms"] = _timed(lambda: eng.sampler(logits[:1].clone(), [seq]), steps, sync)
    r["host_rest_ms"] = r["step_ms"] - r["forward_ms"] - r["sampler_ms"]
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = profile_step(a.model, a.device, a.steps)
    print(json.dumps(r, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
