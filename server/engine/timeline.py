"""Which GPU operations a decode step waits on: the critical path of a profiled stretch of engine steps.

A kernel's own duration says little once launches overlap (programmatic dependent launch starts a kernel
while its predecessor still runs) or leave gaps (host-launched copies, the graph launch). What sets the
step time is how far each operation moves the *frontier*, the latest end time of anything on the GPU so
far. Walking the operations in start order:
- ``gap``: idle time before the operation, when it starts after the frontier (nothing was running);
- ``advance``: how far its end moves the frontier past ``max(frontier, start)``.
Their sum over a stretch is the stretch's span, so each operation's ``gap + advance`` is its share of the
step time. :func:`critical_path` computes it from (name, start, duration) triples; :func:`gpu_ops` reads
those from a Chrome trace written by ``torch.profiler``; :func:`summarise` groups the shares by operation
name (and, for matmuls, by launch grid, which tells the projections apart). ``profile_step --timeline``
runs it over whole engine steps (the CUDA-graph replay, the copies around it and the sampler).
:func:`projection_efficiency` puts each projection kind's share of one step next to the time its weights
take to stream at the bandwidth ceiling, :func:`attention_efficiency` decode attention's share next to its
K/V reads; ``python -m server.engine.timeline TRACE --config CONFIG [--batch B --context N]`` prints them
for a saved trace.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class Op:
    name: str
    start: float  # microseconds
    dur: float
    grid: tuple = ()


@dataclass(frozen=True)
class Share:
    op: Op
    gap: float  # idle before it
    advance: float  # how far it moved the frontier


def critical_path(ops: Iterable[Op]) -> list[Share]:
    """Each operation's idle gap and frontier advance, in start order (ties: the longer first)."""
    out: list[Share] = []
    frontier = None
    for op in sorted(ops, key=lambda o: (o.start, -o.dur)):
        end = op.start + op.dur
        if frontier is None:
            out.append(Share(op, 0.0, op.dur))
            frontier = end
            continue
        gap = max(0.0, op.start - frontier)
        advance = max(0.0, end - max(frontier, op.start))
        out.append(Share(op, gap, advance))
        frontier = max(frontier, end)
    return out


def short_name(name: str) -> str:
    """A kernel name without template arguments and signatures (cuBLAS and ATen names run to hundreds of
    characters); Triton kernel names are already short."""
    for cut in ("<", "("):
        if cut in name and not name.startswith(("Memcpy", "Memset")):
            name = name.split(cut, 1)[0]
    return name.replace("void ", "").strip()[:80]


def gpu_ops(trace_path: str) -> list[Op]:
    """The GPU operations (kernels, copies, memsets) of a ``torch.profiler`` Chrome trace."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ops = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _GPU_CATEGORIES:
            grid = tuple((e.get("args") or {}).get("grid", ()))
            ops.append(Op(short_name(e["name"]), float(e["ts"]), float(e.get("dur", 0.0)), grid))
    return ops


def summarise(shares: list[Share], steps: int, by_grid: tuple[str, ...] = ("_skinny_kernel",)) -> dict:
    """Per step: the span, the idle total, and per operation name (names in ``by_grid`` split by grid) the
    count, summed duration, gap and advance, largest share first."""
    rows: dict[str, dict] = defaultdict(lambda: {"count": 0, "dur_us": 0.0, "gap_us": 0.0, "advance_us": 0.0})
    for s in shares:
        key = s.op.name + (f" grid={list(s.op.grid)}" if s.op.name in by_grid and s.op.grid else "")
        r = rows[key]
        r["count"] += 1
        r["dur_us"] += s.op.dur
        r["gap_us"] += s.gap
        r["advance_us"] += s.advance
    table = []
    for k, r in rows.items():
        table.append({"op": k, "per_step": r["count"] / steps, "dur_us": r["dur_us"] / steps,
                      "gap_us": r["gap_us"] / steps, "advance_us": r["advance_us"] / steps,
                      "share_us": (r["gap_us"] + r["advance_us"]) / steps})
    table.sort(key=lambda r: -r["share_us"])
    span = sum(s.gap + s.advance for s in shares)
    return {"steps": steps, "span_us_per_step": span / steps,
            "idle_us_per_step": sum(s.gap for s in shares) / steps,
            "ops_per_step": len(shares) / steps, "ops": table}


def profile_timeline(fn, steps: int, sync, trace_path: str) -> dict:
    """Run ``fn`` ``steps`` times under ``torch.profiler`` (CUDA activity only, so the host is not slowed by
    CPU-op recording), write the Chrome trace to ``trace_path`` and summarise its critical path."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    prof.export_chrome_trace(trace_path)
    return summarise(critical_path(gpu_ops(trace_path)), steps)


# --------------------------------------------------------------------------------------- projections

_PROJECTIONS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("o", ("self_attn.o_proj",)),
                ("gate_up", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",)))


def _is_matmul(name: str) -> bool:
    return name.startswith(("_skinny_kernel", "nvjet")) or "gemm" in name.lower() or "gemv" in name.lower()


def one_step(shares: list[Share], index: int | None = None) -> list[Share]:
    """The shares of one whole engine step: steps end with the copy of the sampled tokens to the host
    (``Memcpy DtoH``); by default the middle one of those between two such copies."""
    ends = [i for i, s in enumerate(shares) if s.op.name.startswith("Memcpy DtoH")]
    if len(ends) < 2:
        raise ValueError("fewer than two token copies to the host in the trace: not whole engine steps")
    k = len(ends) // 2 if index is None else index
    return shares[ends[k - 1] + 1:ends[k] + 1]


def projection_efficiency(step: list[Share], config: dict, bandwidth: float = 4.3e12, itemsize: int = 2) -> dict:
    """Per projection kind of a dense decoder (q/k/v fused, o, gate/up fused, down, then the LM head),
    summed over the layers of one decode step: its share of the step (us), the time its weight takes to
    stream at ``bandwidth`` bytes/s, and their ratio. Matmul launches are taken in step order, four per
    layer and the LM head last (a cuBLAS split-K reduce counts with its matmul); a step of another shape
    (factorized linears, a prefill) is a ValueError."""
    from compressor.schema import all_weights

    weights = all_weights(config)
    layers = int(config["num_hidden_layers"])
    launches: list[list] = []
    for s in step:
        if "splitKreduce" in s.op.name and launches:
            launches[-1][1] += s.gap + s.advance
        elif _is_matmul(s.op.name):
            launches.append([s.op.name, s.gap + s.advance])
    if len(launches) != 4 * layers + 1:
        raise ValueError(f"{len(launches)} matmul launches in the step, expected {4 * layers + 1} "
                         f"(4 per layer for {layers} layers, then the LM head)")

    def ideal_us(names: list[str]) -> float:
        return sum(math.prod(weights[n]) for n in names) * itemsize / bandwidth * 1e6

    out = {kind: {"us": 0.0, "ideal_us": 0.0} for kind, _ in _PROJECTIONS}
    for layer in range(layers):
        for j, (kind, parts) in enumerate(_PROJECTIONS):
            out[kind]["us"] += launches[4 * layer + j][1]
            out[kind]["ideal_us"] += ideal_us([f"model.layers.{layer}.{p}.weight" for p in parts])
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"  # tied embeddings
    out["lm_head"] = {"us": launches[-1][1], "ideal_us": ideal_us([head])}
    for r in out.values():
        r["efficiency"] = r["ideal_us"] / r["us"] if r["us"] else 0.0
    return out


def kv_bytes_per_step(config: dict, batch: int, context: int, itemsize: int = 2) -> int:
    """Bytes of K and V that decode attention reads in one step: ``batch`` sequences of ``context`` cached
    positions, each layer's KV heads at its own ``qk_dim`` and ``v_dim``."""
    hkv = int(config["num_key_value_heads"])
    return sum(batch * context * hkv * (int(layer["qk_dim"]) + int(layer["v_dim"])) * itemsize
               for layer in config["layers"])


def attention_efficiency(step: list[Share], config: dict, batch: int, context: int, bandwidth: float = 4.3e12,
                         itemsize: int = 2) -> dict:
    """Decode attention's share of one step (every kernel whose name has ``attn``: the partition kernel and a
    separate combine, if any) against the time its K/V reads take at ``bandwidth`` (:func:`kv_bytes_per_step`).
    At short contexts the kernel is latency-bound, and a checkpoint with smaller head dims gains nothing
    unless this ratio rises."""
    us = sum(s.gap + s.advance for s in step if "attn" in s.op.name)
    ideal = kv_bytes_per_step(config, batch, context, itemsize) / bandwidth * 1e6
    return {"us": us, "ideal_us": ideal, "efficiency": ideal / us if us else 0.0, "batch": batch, "context": context}


def _config(spec: str) -> dict:
    if spec.startswith("random:"):
        from compressor.families import modegpt_config
        from compressor.sources import PRESETS

        return modegpt_config(dict(PRESETS[spec.split(":", 1)[1]]))
    with open(spec) as f:
        return json.load(f)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Critical-path shares of a profiled engine run (profile_step --timeline), "
                                            "and per projection the share of a decode step against its weight stream.")
    p.add_argument("trace", help="Chrome trace written by `python -m server.engine.profile_step ... --timeline`")
    p.add_argument("--config", help="the model's config.json, or random:<preset>: adds the projection table")
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s of the weight stream (H200: ~4.3e12)")
    p.add_argument("--batch", type=int, default=None, help="with --context and --config: adds the attention row")
    p.add_argument("--context", type=int, default=None,
                   help="cached positions per sequence at the profiled step (profile_step: about 64 + 4 + 1.5 x steps)")
    a = p.parse_args(argv)
    if (a.batch is None) != (a.context is None) or (a.batch is not None and not a.config):
        p.error("--batch and --context go together, with --config")
    shares = critical_path(gpu_ops(a.trace))
    step = one_step(shares)
    r = {"step_us": sum(s.gap + s.advance for s in step), "ops": summarise(step, 1)["ops"]}
    if a.config:
        r["projections"] = projection_efficiency(step, _config(a.config), a.bandwidth)
    if a.batch is not None:
        r["attention"] = attention_efficiency(step, _config(a.config), a.batch, a.context, a.bandwidth)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
