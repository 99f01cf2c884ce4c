"""Benchmark the Triton kernels against the PyTorch sequences they replace (CUDA only).

Usage (on the GPU machine)::

    modegpt bench kernels [--only skinny lowrank ...] [--budget 270] [--json runs/bench-kernels.json]
    modegpt bench kernels --attention-sweep     # decode attention under every launch configuration

What is timed:

* ``lowrank``: ``lowrank_linear_triton`` vs two cuBLAS matmuls ``(x @ A.T) @ B.T`` (and, for
  context, the dense ``x @ W.T`` the factorization replaces) at LLaMA-2-7B / 13B MLP shapes
  (hidden 4096 / 5120, MLP 11008 / 13824, both directions), ranks 25 / 50 / 75 % of
  ``min(in, out)``, tokens 1, 16, 64, 256, 2048, 8192.
* ``attention``: ``decode_attention_triton`` vs gather-through-the-block-table + SDPA, 32 heads,
  (d_qk, d_v) from full 128/128 down to 46/38, batch 1..256, contexts 1024 / 4096.
* ``rope``: ``rope_gather_triton_`` (keys into the paged cache with the values; queries in place)
  vs separate torch rope ops + ``index_copy_`` into the caches, tokens 1..8192.
* ``skinny``: the decode-sized dense linear (``kernels.skinny_linear``) vs cuBLAS ``F.linear`` at
  every matmul shape of LLaMA-2-7B and of three layers of its 30 % checkpoint, 1 / 4 / 16 tokens.
* ``rope_qkv``: the one-launch layer op vs the two ``rope_gather_`` launches it replaced.
* ``attention_short``: batch-1 decode attention over short contexts, the split heuristic vs one
  partition per KV head.
* ``run_attention_sweep`` (separately): decode attention under 18 launch configurations (key tile,
  warps, stages) against the default, batch 16-256, (d_qk, d_v) 128 / 112 / 96, contexts 128 / 1024.

How: decode sizes (tokens / batch <= 256) are captured in a CUDA graph and timed over graph
replays (what a graph-captured engine sees: no Python, launch gaps inside the graph included);
each graph cycles through enough copies of the weights / KV cache to exceed the 60 MB L2, so
repeated calls do not run from cache. Prefill sizes use ``triton.testing.do_bench`` (median, it
flushes L2 between calls). Every case records the median time per call in microseconds, achieved
TB/s (bytes that must move: inputs once + outputs once) and TFLOP/s, the fraction of the ceilings
(4.3 TB/s copy bandwidth, 750 TFLOP/s bf16 matmul, measured on this H200), the speedup over the
baseline and the relative difference between the two outputs. A case that fails records its error
and the run goes on; cases past the time budget are recorded as skipped. Autotuning happens on a
case's first call, before any capture. The remaining budget runs ``run_lowrank_sweep`` (split-K
and per-stage timings of the low-rank decode path against cuBLAS's two stages), stored under
``lowrank_sweep``. On the H200 the main cases took ~60 s, so the default budget leaves the sweep
about 3 minutes.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

BW_CEILING = 4.3e12  # bytes/s, device-to-device copy (read + write) on the H200
FLOP_CEILING = 750e12  # bf16 matmul 8192^3
L2_DEFEAT_BYTES = 200e6  # > 3x the H200's 60 MB L2
DECODE_MAX = 256
MODELS = {"llama2-7b": (4096, 11008), "llama2-13b": (5120, 13824)}
TOKENS = [1, 16, 64, 256, 2048, 8192]
RANK_FRACTIONS = [0.25, 0.5, 0.75]
# budgets (MiB per launch, MODEGPT_L2_PREFETCH) at which the low-rank skinny pair is also timed (session 10
# timed 16 and 64: slower than none in 9 of 12 cases, so by default none)
L2_PREFETCH_MIB = tuple(int(v) for v in os.environ.get("MODEGPT_BENCH_L2_PREFETCH_MIB", "").split(",") if v)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _time_graph(calls: list[Callable[[], object]], replays: int = 20, repeats: int = 7) -> float:
    """Median microseconds per call over replays of one CUDA graph that runs every call once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    del graph
    return statistics.median(samples)


def _time_eager(call: Callable[[], object]) -> float:
    import triton.testing

    call()  # compile / autotune outside the timed region
    return triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median") * 1e3


def _time(calls: list[Callable[[], object]], graph: bool) -> float:
    return _time_graph(calls) if graph else _time_eager(calls[0])


def _copies(bytes_per_set: float, graph: bool) -> int:
    return max(2, min(8, math.ceil(L2_DEFEAT_BYTES / max(bytes_per_set, 1.0)))) if graph else 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _rates(us: float, nbytes: float, flops: float) -> dict:
    s = us * 1e-6
    return {"TBps": nbytes / s / 1e12, "TFLOPs": flops / s / 1e12,
            "pct_bw_ceiling": 100 * nbytes / s / BW_CEILING, "pct_flop_ceiling": 100 * flops / s / FLOP_CEILING,
            "roofline_pct": 100 * max(nbytes / BW_CEILING, flops / FLOP_CEILING) / s}


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def _lowrank_decode_timings(x: torch.Tensor, As: list, Bs: list, y_ref: torch.Tensor, base: float, nbytes: float,
                            flops: float) -> dict:
    """Decode sizes only (graph-timed, same weight copies as the baseline): the one-launch fused kernel
    (``lowrank_decode_triton``, M <= 64), the skinny pair ``skinny(skinny(x, A), B)`` (M <= 16, also
    without PDL and with the L2 prefetch budgets of ``L2_PREFETCH_MIB``), the split pair
    ``skinny(shrink_split(x, A), B)`` and what dispatch picks (``auto``).
    A failure is recorded under ``*_error`` and does not lose the rest of the case."""
    from . import lowrank
    from .skinny_linear import MAX_M as SKINNY_MAX_M
    from . import dispatch
    from .skinny_linear import lowrank_pick, skinny_linear_triton

    M, n = x.shape[0], len(As)
    out: dict = {}
    if M <= lowrank.FUSED_MAX_M:
        try:
            y = lowrank.lowrank_decode_triton(x, As[0], Bs[0])  # autotunes here, outside any capture
            cfg = getattr(lowrank._fused_decode, "best_config", None)
            out["fused_decode_config"] = str(cfg) if cfg is not None else None
            out["rel_diff_fused_decode_vs_baseline"] = _rel(y, y_ref)
            us = _time([lambda i=i: lowrank.lowrank_decode_triton(x, As[i], Bs[i]) for i in range(n)], True)
            out.update(fused_decode_us=us, fused_decode=_rates(us, nbytes, flops),
                       speedup_fused_decode_vs_baseline=base / us,
                       fused_decode_stuck_waits=lowrank.fused_stuck_count(x.device))  # 0 unless broken
        except Exception as exc:  # noqa: BLE001 - record and go on
            out["fused_decode_error"] = repr(exc)[:500]
            torch.cuda.synchronize()
    if M <= SKINNY_MAX_M:
        try:
            y = skinny_linear_triton(skinny_linear_triton(x, As[0]), Bs[0])
            out["rel_diff_skinny_pair_vs_baseline"] = _rel(y, y_ref)
            us = _time([lambda i=i: skinny_linear_triton(skinny_linear_triton(x, As[i]), Bs[i]) for i in range(n)],
                       True)
            out.update(skinny_pair_us=us, skinny_pair=_rates(us, nbytes, flops),
                       speedup_skinny_pair_vs_baseline=base / us)
            # the same pair without programmatic dependent launch
            with mock.patch.dict(os.environ, {"MODEGPT_PDL": "0"}):
                us = _time([lambda i=i: skinny_linear_triton(skinny_linear_triton(x, As[i]), Bs[i])
                            for i in range(n)], True)
            out.update(skinny_pair_nopdl_us=us, skinny_pair_nopdl=_rates(us, nbytes, flops),
                       speedup_skinny_pair_nopdl_vs_baseline=base / us)
            # the shrink split over K, then the skinny expand
            y = skinny_linear_triton(lowrank.shrink_split_triton(x, As[0]), Bs[0])  # tunes outside the capture
            out["rel_diff_split_pair_vs_baseline"] = _rel(y, y_ref)
            us = _time([lambda i=i: skinny_linear_triton(lowrank.shrink_split_triton(x, As[i]), Bs[i])
                        for i in range(n)], True)
            out.update(split_pair_us=us, split_pair=_rates(us, nbytes, flops),
                       speedup_split_pair_vs_baseline=base / us)
            # the same pair with each launch prefetching part of its weight into the L2 before its wait
            for mib in L2_PREFETCH_MIB:
                with mock.patch.dict(os.environ, {"MODEGPT_L2_PREFETCH": str(mib)}):
                    y = skinny_linear_triton(skinny_linear_triton(x, As[0]), Bs[0])  # tunes outside the capture
                    out[f"rel_diff_skinny_pair_pf{mib}_vs_baseline"] = _rel(y, y_ref)
                    us = _time([lambda i=i: skinny_linear_triton(skinny_linear_triton(x, As[i]), Bs[i])
                                for i in range(n)], True)
                out.update({f"skinny_pair_pf{mib}_us": us, f"skinny_pair_pf{mib}": _rates(us, nbytes, flops),
                            f"speedup_skinny_pair_pf{mib}_vs_baseline": base / us})
            # what ships: kernels.lowrank_linear in auto mode (per-shape pick of the pair, timed in graphs)
            with mock.patch.dict(os.environ, {"MODEGPT_KERNELS": "auto"}):
                y = dispatch.lowrank_linear(x, As[0], Bs[0])
                out["rel_diff_auto_vs_baseline"] = _rel(y, y_ref)
                out["auto_pick"] = list(lowrank_pick(x, As[0], Bs[0], None))
                us = _time([lambda i=i: dispatch.lowrank_linear(x, As[i], Bs[i]) for i in range(n)], True)
            out.update(auto_us=us, auto=_rates(us, nbytes, flops), speedup_auto_vs_baseline=base / us)
        except Exception as exc:  # noqa: BLE001
            out["skinny_pair_error"] = repr(exc)[:500]
            torch.cuda.synchronize()
    return out


def _lowrank_case(model: str, direction: str, frac: float, M: int, dtype: torch.dtype) -> dict:
    """Two-launch Triton vs two cuBLAS matmuls (and dense); at decode sizes also the fused one-launch
    kernel and the skinny pair (``_lowrank_decode_timings``)."""
    from .lowrank import lowrank_linear_triton, split_k

    hidden, mlp = MODELS[model]
    K, N = (hidden, mlp) if direction == "up" else (mlp, hidden)
    R = int(round(frac * min(K, N) / 64)) * 64
    dev = torch.device("cuda")
    esz = torch.finfo(dtype).bits // 8
    wbytes = (R * K + N * R) * esz
    graph = M <= DECODE_MAX
    n = _copies(wbytes, graph)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    As = [torch.randn(R, K, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n)]
    Bs = [torch.randn(N, R, device=dev, dtype=dtype) * R ** -0.5 for _ in range(n)]
    nbytes = wbytes + (M * K + M * N) * esz
    flops = 2.0 * M * R * (K + N)
    y_tri = lowrank_linear_triton(x, As[0], Bs[0])
    y_ref = torch.matmul(torch.matmul(x, As[0].t()), Bs[0].t())
    case = {"kernel": "lowrank", "model": model, "linear": direction, "in": K, "out": N, "rank": R,
            "rank_fraction": frac, "tokens": M, "dtype": str(dtype), "timing": "cuda_graph" if graph else "do_bench",
            "split_k": split_k(M, R, K, dev), "bytes": nbytes, "flops": flops, "rel_diff_vs_baseline": _rel(y_tri, y_ref)}
    tri = _time([lambda i=i: lowrank_linear_triton(x, As[i], Bs[i]) for i in range(n)], graph)
    base = _time([lambda i=i: torch.matmul(torch.matmul(x, As[i].t()), Bs[i].t()) for i in range(n)], graph)
    if graph:
        case.update(_lowrank_decode_timings(x, As, Bs, y_ref, base, nbytes, flops))
    del As, Bs
    dense_n = _copies(N * K * esz, graph)
    Ws = [torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5 for _ in range(dense_n)]
    dense = _time([lambda i=i: torch.matmul(x, Ws[i].t()) for i in range(dense_n)], graph)
    # the most any kernel could gain over the two cuBLAS calls: all bytes at the ceiling bandwidth
    case["best_possible_speedup_vs_baseline"] = base / (nbytes / BW_CEILING * 1e6)
    case["ceiling_fraction_needed_for_1_3x"] = 1.3 * nbytes / (base * 1e-6) / BW_CEILING
    case.update(triton_us=tri, baseline_us=base, dense_us=dense, speedup_vs_baseline=base / tri,
                speedup_vs_dense=dense / tri, triton=_rates(tri, nbytes, flops), baseline=_rates(base, nbytes, flops))
    return case


def _gather_sdpa(q, kc, vc, tables, lens, scale):
    """The torch sequence decode attention replaces: gather the paged cache, then SDPA."""
    B, H, dqk = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    L = tables.shape[1] * bs
    k = kc[tables.long()].reshape(B, L, hkv, -1).transpose(1, 2)
    v = vc[tables.long()].reshape(B, L, hkv, -1).transpose(1, 2)
    mask = torch.arange(L, device=q.device)[None, :] < lens[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=hkv != H)[:, :, 0]


def _attention_inputs(dims: tuple[int, int], B: int, ctx: int, dtype: torch.dtype, ragged: bool = False):
    """32 heads (MHA) over a paged cache of block size 16, with enough block tables over distinct
    blocks to defeat L2: ``(q, k_cache, v_cache, tables, lens, bytes moved, flops)``. ``ragged``:
    context lengths ``ctx - i % 16`` (an engine's batch; its last key tile is partly empty) instead
    of ``ctx`` for every sequence."""
    H = hkv = 32
    dqk, dv = dims
    bs = 16
    dev = torch.device("cuda")
    esz = torch.finfo(dtype).bits // 8
    kv_bytes = B * ctx * hkv * (dqk + dv) * esz
    n = _copies(kv_bytes, True)
    blocks = ctx // bs
    kc = torch.randn(n * B * blocks, bs, hkv, dqk, device=dev, dtype=dtype)
    vc = torch.randn(n * B * blocks, bs, hkv, dv, device=dev, dtype=dtype)
    perm = torch.randperm(n * B * blocks, device=dev).int()
    tables = [perm[i * B * blocks:(i + 1) * B * blocks].view(B, blocks) for i in range(n)]
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    if ragged:
        lens -= torch.arange(B, device=dev, dtype=torch.int32) % bs
        kv_bytes = int(lens.sum()) * hkv * (dqk + dv) * esz
    q = torch.randn(B, H, dqk, device=dev, dtype=dtype)
    keys = int(lens.sum())
    return q, kc, vc, tables, lens, kv_bytes + B * H * (dqk + dv) * esz, 2.0 * H * keys * (dqk + dv)


def _attention_case(dims: tuple[int, int], B: int, ctx: int, dtype: torch.dtype) -> dict:
    from .decode_attention import decode_attention_triton, plan_splits

    H = hkv = 32
    dqk, dv = dims
    bs = 16
    dev = torch.device("cuda")
    q, kc, vc, tables, lens, nbytes, flops = _attention_inputs(dims, B, ctx, dtype)
    n = len(tables)
    scale = 128 ** -0.5
    o_tri = decode_attention_triton(q, kc, vc, tables[0], lens, scale)
    case = {"kernel": "decode_attention", "heads": H, "kv_heads": hkv, "d_qk": dqk, "d_v": dv, "batch": B,
            "context": ctx, "block_size": bs, "dtype": str(dtype), "timing": "cuda_graph",
            "num_splits": plan_splits(B, hkv, ctx, 64, dev)[0], "bytes": nbytes, "flops": flops}
    tri = _time_graph([lambda i=i: decode_attention_triton(q, kc, vc, tables[i], lens, scale) for i in range(n)])
    case.update(triton_us=tri, triton=_rates(tri, nbytes, flops))
    try:
        o_ref = _gather_sdpa(q, kc, vc, tables[0], lens, scale)
        case["rel_diff_vs_baseline"] = _rel(o_tri, o_ref)
        base = _time_graph([lambda i=i: _gather_sdpa(q, kc, vc, tables[i], lens, scale) for i in range(n)])
        case.update(baseline_us=base, speedup_vs_baseline=base / tri, baseline=_rates(base, nbytes, flops))
    except Exception as exc:  # noqa: BLE001 - SDPA may reject odd head dims; keep the Triton number
        case["baseline_error"] = repr(exc)[:500]
    return case


def _torch_rope_and_copy(k, v, pos, inv_freq, kc, vc, slots):
    """The torch sequence rope_gather_ replaces: rope ops, then scatter k and v into the caches."""
    from .reference import apply_rope_torch

    T = pos.shape[0]
    hkv, half = inv_freq.shape
    kr = apply_rope_torch(k.view(T, hkv, 2 * half), pos, inv_freq).to(kc.dtype)
    kc.view(-1, hkv, 2 * half).index_copy_(0, slots, kr)
    vc.view(-1, hkv, vc.shape[-1]).index_copy_(0, slots, v.view(T, hkv, -1))


def _rope_case(dims: tuple[int, int], T: int, dtype: torch.dtype) -> dict:
    from .rope import rope_gather_triton_

    hkv, bs = 32, 16
    dqk, dv = dims
    dev = torch.device("cuda")
    esz = torch.finfo(dtype).bits // 8
    num_slots = (T * 4 // bs + 1) * bs
    k = torch.randn(T, hkv * dqk, device=dev, dtype=dtype)
    v = torch.randn(T, hkv * dv, device=dev, dtype=dtype)
    pos = torch.randint(0, 4096, (T,), device=dev)
    inv_freq = torch.rand(hkv, dqk // 2, device=dev)
    slots = torch.randperm(num_slots, device=dev)[:T]
    kc = torch.zeros(num_slots // bs, bs, hkv, dqk, device=dev, dtype=dtype)
    vc = torch.zeros(num_slots // bs, bs, hkv, dv, device=dev, dtype=dtype)
    nbytes = 2 * T * hkv * (dqk + dv) * esz + T * 16 + hkv * dqk * 2
    graph = T <= DECODE_MAX
    rope_gather_triton_(k, pos, inv_freq, kc, slots, v, vc)
    k_tri = kc.view(-1, hkv, dqk)[slots].clone()
    _torch_rope_and_copy(k, v, pos, inv_freq, kc, vc, slots)
    case = {"kernel": "rope_kv_cache", "kv_heads": hkv, "d_qk": dqk, "d_v": dv, "tokens": T, "dtype": str(dtype),
            "timing": "cuda_graph" if graph else "do_bench", "bytes": nbytes,
            "rel_diff_vs_baseline": _rel(k_tri, kc.view(-1, hkv, dqk)[slots])}
    tri = _time([lambda: rope_gather_triton_(k, pos, inv_freq, kc, slots, v, vc)], graph)
    base = _time([lambda: _torch_rope_and_copy(k, v, pos, inv_freq, kc, vc, slots)], graph)
    case.update(triton_us=tri, baseline_us=base, speedup_vs_baseline=base / tri,
                triton=_rates(tri, nbytes, 0.0), baseline=_rates(base, nbytes, 0.0))
    return case


# (K, N) of the decode matmuls: LLaMA-2-7B (fused qkv, o, fused gate/up, down, LM head) and layers 0, 20
# and 31 of its 30 % ModeGPT checkpoint (kernels/shapes/llama-2-7b-30.config.json)
SKINNY_SHAPES = {
    "7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000)],
    "7b-30%": [(4096, 10752), (3584, 4096), (4096, 19760), (9880, 4096),
               (4096, 8448), (2816, 4096), (4096, 14576), (7288, 4096),
               (4096, 7680), (2560, 4096), (4096, 13872), (6936, 4096)],
}


def _skinny_case(K: int, N: int, M: int, dtype: torch.dtype) -> dict:
    """The skinny Triton linear against cuBLAS (``F.linear``) on the same weights, in a CUDA graph."""
    from .skinny_linear import skinny_linear_triton

    dev = torch.device("cuda")
    esz = torch.finfo(dtype).bits // 8
    n = _copies(N * K * esz, True)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    Ws = [torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n)]
    nbytes = (N * K + M * K + M * N) * esz
    flops = 2.0 * M * N * K
    case = {"kernel": "skinny_linear", "in": K, "out": N, "tokens": M, "dtype": str(dtype), "timing": "cuda_graph",
            "bytes": nbytes, "flops": flops,
            "rel_diff_vs_baseline": _rel(skinny_linear_triton(x, Ws[0]), torch.nn.functional.linear(x, Ws[0]))}
    tri = _time([lambda i=i: skinny_linear_triton(x, Ws[i]) for i in range(n)], True)
    base = _time([lambda i=i: torch.nn.functional.linear(x, Ws[i]) for i in range(n)], True)
    case.update(triton_us=tri, baseline_us=base, speedup_vs_baseline=base / tri, triton=_rates(tri, nbytes, flops),
                baseline=_rates(base, nbytes, flops))
    return case


def _rope_qkv_case(dims: tuple[int, int], T: int, dtype: torch.dtype) -> dict:
    """A layer's RoPE + cache write as one launch (``rope_qkv_triton_``) against the two-launch
    ``rope_gather_triton_`` pair it replaced (queries in place; keys + values into the cache)."""
    from .rope import rope_gather_triton_, rope_qkv_triton_

    dqk, dv = dims
    H = hkv = 32
    dev = torch.device("cuda")
    qkv = torch.randn(T, H * dqk + hkv * (dqk + dv), device=dev, dtype=dtype)
    q, k, v = qkv.split([H * dqk, hkv * dqk, hkv * dv], dim=-1)
    inv_freq = torch.rand(hkv, dqk // 2, device=dev)
    pos = torch.arange(T, device=dev) + 100
    slots = torch.randperm(T + 64, device=dev)[:T]
    kc = torch.zeros(T + 64, hkv, dqk, device=dev, dtype=dtype)
    vc = torch.zeros(T + 64, hkv, dv, device=dev, dtype=dtype)
    esz = torch.finfo(dtype).bits // 8
    nbytes = 2 * T * (H * dqk + hkv * (dqk + dv)) * esz
    graph = T <= DECODE_MAX

    def pair():
        qh = q.view(T, H, dqk)
        rope_gather_triton_(qh, pos, inv_freq, qh)
        rope_gather_triton_(k, pos, inv_freq, kc, slots, v, vc)

    case = {"kernel": "rope_qkv", "qk_dim": dqk, "v_dim": dv, "tokens": T, "dtype": str(dtype),
            "timing": "cuda_graph" if graph else "do_bench", "bytes": nbytes, "flops": 0.0}
    tri = _time([lambda: rope_qkv_triton_(q, k, v, pos, inv_freq, kc, vc, slots)], graph)
    base = _time([pair], graph)
    case.update(triton_us=tri, baseline_us=base, speedup_vs_baseline=base / tri, triton=_rates(tri, nbytes, 0.0),
                baseline=_rates(base, nbytes, 0.0))
    return case


def _linear_rope_case(heads: tuple[int, int, int, int], K: int, M: int, dtype: torch.dtype) -> dict:
    """The q/k/v projection with RoPE and the cache write as its epilogue (``skinny_linear_rope_triton``, one
    launch) against the chain it replaces: the better of the skinny kernel and cuBLAS for the projection,
    then ``rope_qkv_triton_``. Timed as the engine's picks time them (``graph_timing.graph_us``: CUDA graph,
    L2 flushed, after a small PDL kernel)."""
    from .dispatch import _linear_rope_chain
    from .graph_timing import FLUSH_BYTES, graph_us, predecessor
    from .skinny_linear import skinny_linear_rope_triton

    H, hkv, d, dv = heads
    dev = torch.device("cuda")
    n_out = H * d + hkv * (d + dv)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(n_out, K, device=dev, dtype=dtype) * K ** -0.5
    f = torch.rand(hkv, d // 2, device=dev) * 0.5
    pos = torch.arange(M, device=dev) + 100
    slots = torch.randperm(M + 64, device=dev)[:M]
    kc = torch.zeros(M + 64, hkv, d, device=dev, dtype=dtype)
    vc = torch.zeros(M + 64, hkv, dv, device=dev, dtype=dtype)
    args = (H, pos, f, kc, vc, slots)
    fused = skinny_linear_rope_triton(x, w, None, *args)
    chain = _linear_rope_chain(x, w, None, *args).reshape(M, -1)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=dev)
    before = predecessor(flush)
    flush.zero_()
    before()
    torch.cuda.synchronize()
    esz = torch.finfo(dtype).bits // 8
    nbytes = (n_out * K + M * K + M * n_out) * esz
    tri = graph_us(lambda: skinny_linear_rope_triton(x, w, None, *args), flush, before)
    base = graph_us(lambda: _linear_rope_chain(x, w, None, *args), flush, before)
    return {"kernel": "linear_rope_qkv", "heads": H, "kv_heads": hkv, "d_qk": d, "d_v": dv, "in": K, "tokens": M,
            "dtype": str(dtype), "timing": "cuda_graph_flushed", "bytes": nbytes, "flops": 2.0 * M * n_out * K,
            "rel_diff_vs_baseline": _rel(fused, chain), "triton_us": tri, "baseline_us": base,
            "speedup_vs_baseline": base / tri, "triton": _rates(tri, nbytes, 2.0 * M * n_out * K),
            "baseline": _rates(base, nbytes, 2.0 * M * n_out * K)}


# (H, Hkv, d_qk, d_v, hidden): LLaMA-2-7B, a 30 % checkpoint's typical layer, two narrower ones, LLaMA-2-13B
LINEAR_ROPE_SHAPES = [(32, 32, 128, 128, 4096), (32, 32, 96, 80, 4096), (32, 32, 64, 56, 4096), (32, 8, 46, 38, 4096),
                      (40, 40, 96, 96, 5120)]


def _attention_short_case(dims: tuple[int, int], ctx: int, capacity: int, dtype: torch.dtype) -> dict:
    """Batch-1 decode attention over a short context: the split heuristic against one partition."""
    from .decode_attention import decode_attention_triton, plan_splits

    dqk, dv = dims
    H = hkv = 32
    dev = torch.device("cuda")
    block_size = 16
    blocks = capacity // block_size
    q = torch.randn(1, H, dqk, device=dev, dtype=dtype)
    kc = torch.randn(blocks + 1, block_size, hkv, dqk, device=dev, dtype=dtype)
    vc = torch.randn(blocks + 1, block_size, hkv, dv, device=dev, dtype=dtype)
    tables = (torch.randperm(blocks, device=dev)[None] + 1)
    lens = torch.tensor([ctx], device=dev)
    esz = torch.finfo(dtype).bits // 8
    nbytes = ctx * hkv * (dqk + dv) * esz
    splits, _ = plan_splits(1, hkv, capacity, 64, dev)
    case = {"kernel": "attention_short", "qk_dim": dqk, "v_dim": dv, "batch": 1, "context": ctx,
            "capacity": capacity, "num_splits": splits, "timing": "cuda_graph", "bytes": nbytes, "flops": 0.0,
            "rel_diff_vs_baseline": _rel(decode_attention_triton(q, kc, vc, tables, lens, 0.1),
                                         decode_attention_triton(q, kc, vc, tables, lens, 0.1, num_splits=1))}
    tri = _time([lambda: decode_attention_triton(q, kc, vc, tables, lens, 0.1)], True)
    base = _time([lambda: decode_attention_triton(q, kc, vc, tables, lens, 0.1, num_splits=1)], True)
    case.update(triton_us=tri, baseline_us=base, speedup_vs_baseline=base / tri, triton=_rates(tri, nbytes, 0.0),
                baseline=_rates(base, nbytes, 0.0))
    return case


def _decode_step_cases(dtype: torch.dtype):
    """The kernels of the engine's decode step that replaced cuBLAS / earlier launches."""
    for model, shapes in SKINNY_SHAPES.items():
        for K, N in shapes:
            for M in (1, 4, 16):
                yield f"skinny {model} {K}->{N} M={M}", lambda K=K, N=N, M=M: _skinny_case(K, N, M, dtype)
    for dims in ((128, 128), (88, 88)):
        for T in (1, 16, 64, 256):
            yield f"rope_qkv {dims} T={T}", lambda dims=dims, T=T: _rope_qkv_case(dims, T, dtype)
    for *heads, K in LINEAR_ROPE_SHAPES:
        for M in (1, 4, 16):
            yield (f"linear_rope {tuple(heads)} K={K} M={M}",
                   lambda heads=tuple(heads), K=K, M=M: _linear_rope_case(heads, K, M, dtype))
    for dims in ((128, 128), (88, 88)):
        for ctx, cap in ((128, 208), (200, 208), (1000, 2048), (3000, 4096)):
            yield (f"attention_short {dims} ctx={ctx}/{cap}",
                   lambda dims=dims, ctx=ctx, cap=cap: _attention_short_case(dims, ctx, cap, dtype))


def _cases(dtype: torch.dtype):
    """(name, thunk) in priority order: decode first (what serving is bound by), prefill last."""
    lowrank = [(M, model, d, f) for M in TOKENS for model in MODELS for d in ("up", "down") for f in RANK_FRACTIONS]
    lowrank.sort(key=lambda c: c[0] > DECODE_MAX)
    yield from _decode_step_cases(dtype)
    for M, model, d, f in lowrank:
        if M <= DECODE_MAX:
            yield f"lowrank {model} {d} r={f} M={M}", lambda M=M, model=model, d=d, f=f: _lowrank_case(model, d, f, M, dtype)
    for dims in ((128, 128), (96, 96), (64, 64), (46, 38)):
        for B, ctx in ((1, 1024), (1, 4096), (16, 1024), (16, 4096), (64, 1024), (256, 1024)):
            yield f"attention {dims} B={B} ctx={ctx}", lambda dims=dims, B=B, ctx=ctx: _attention_case(dims, B, ctx, dtype)
    for dims in ((128, 128), (46, 38)):
        for T in TOKENS:
            yield f"rope {dims} T={T}", lambda dims=dims, T=T: _rope_case(dims, T, dtype)
    for M, model, d, f in lowrank:
        if M > DECODE_MAX:
            yield f"lowrank {model} {d} r={f} M={M}", lambda M=M, model=model, d=d, f=f: _lowrank_case(model, d, f, M, dtype)


def _summary(cases: list[dict]) -> list[str]:
    lines = []
    for c in cases:
        if "triton_us" not in c:
            lines.append(f"{c['name']:<44} {c.get('error', c.get('skipped', '?'))[:70]}")
            continue
        sp = c.get("speedup_vs_baseline")
        lines.append(f"{c['name']:<44} triton {c['triton_us']:9.1f} us  base "
                     f"{c.get('baseline_us', float('nan')):9.1f} us  x{sp if sp else float('nan'):5.2f}  "
                     f"{c['triton']['TBps']:5.2f} TB/s {c['triton']['TFLOPs']:6.1f} TF/s  "
                     f"roof {c['triton']['roofline_pct']:5.1f}%" + _lowrank_decode_summary(c))
    return lines


def _lowrank_decode_summary(c: dict) -> str:
    """`` fused .. us x.. .. TB/s  skinny2 .. us x..`` for low-rank decode cases ('' otherwise)."""
    parts = []
    for key, label in (("fused_decode", "fused"), ("skinny_pair", "skinny2"), ("skinny_pair_nopdl", "nopdl"),
                       ("split_pair", "split2"),
                       *((f"skinny_pair_pf{mib}", f"pf{mib}") for mib in L2_PREFETCH_MIB), ("auto", "auto")):
        if f"{key}_us" in c:
            parts.append(f"{label} {c[f'{key}_us']:7.1f} us x{c[f'speedup_{key}_vs_baseline']:4.2f} "
                         f"{c[key]['TBps']:4.2f} TB/s")
        elif f"{key}_error" in c:
            parts.append(f"{label} ERROR")
    return ("  | " + "  ".join(parts)) if parts else ""


def run_kernel_bench(out_path: str, time_budget_s: float = 270.0, dtype: torch.dtype = torch.bfloat16,
                     only: tuple[str, ...] = (), sweep: bool = True) -> dict:
    """Run every case (see module doc) within ``time_budget_s`` and write the results as JSON.
    ``only``: run just the cases whose name starts with one of these prefixes."""
    t0 = time.time()
    results: dict = {"ceilings": {"bandwidth_Bps": BW_CEILING, "bf16_flops": FLOP_CEILING},
                     "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype),
                     "time_budget_s": time_budget_s, "cases": []}
    try:
        import triton

        results["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        results["error"] = f"triton unavailable: {exc!r}"
    if not torch.cuda.is_available():
        results["error"] = "CUDA is not available: nothing to benchmark"
    if "error" in results:
        _write(out_path, results)
        print(results["error"])
        return results
    props = torch.cuda.get_device_properties(0)
    results["device"] = {"name": props.name, "sm_count": props.multi_processor_count,
                         "memory_GiB": round(props.total_memory / 2 ** 30, 1), "capability": f"{props.major}.{props.minor}"}
    torch.manual_seed(0)
    for name, run in _cases(dtype):
        if only and not name.startswith(only):
            continue
        if time.time() - t0 > time_budget_s:
            results["cases"].append({"name": name, "skipped": "time budget exhausted"})
            continue
        c0 = time.time()
        try:
            case = run()
        except Exception as exc:  # noqa: BLE001 - record and go on
            case = {"error": repr(exc)[:500], "traceback": traceback.format_exc()[-2000:]}
            torch.cuda.synchronize()
        case["name"] = name
        case["wall_s"] = round(time.time() - c0, 2)
        results["cases"].append(case)
        print(_summary([case])[0], flush=True)
        torch.cuda.empty_cache()
        _write(out_path, results)  # keep what we have if the process is killed
    # what remains of the budget goes to the split-K / stage sweep of the low-rank decode path
    if sweep:
        results["lowrank_sweep"] = run_lowrank_sweep(dtype, deadline=t0 + time_budget_s)
    results["total_s"] = round(time.time() - t0, 1)
    _write(out_path, results)
    print(f"{len(results['cases'])} cases in {results['total_s']} s -> {out_path}")
    return results


# ------------------------------------------------------------------------------------------------
# decode attention launch configurations (session 6: at batch 256 it moved the KV cache at ~2.5 TB/s)
# ------------------------------------------------------------------------------------------------
# Session 7 also timed a CUDA-core variant (scores and the value sum as fp32 products reduced over the
# tile, no 16-row query padding, no shared-memory staging: BLOCK_N 16-64, 2-8 warps, 1-2 stages): it was
# slower than the tensor-core default in all 18 cases (1.03-1.78x the time) and was removed.
# Session 8 swept head dims read in two power-of-two chunks (DIM_CHUNKS) against one padded power of two
# (docs/BENCHMARKS.md; key tiles of 128, 8 warps and 4 stages never won there or in session 7). Prepared
# for the next sweep: several KV heads per program (KV_PACK) for the MHA 7B original and its 30 %
# checkpoint, around the current defaults (32/4w/2s/cd short, 64/4w/2s/cd long).
ATTENTION_SWEEP_CONFIGS = [{"BLOCK_N": bn, "num_warps": w, "num_stages": 2, "DIM_CHUNKS": True, "KV_PACK": hp}
                           for bn, w, hp in ((32, 4, 1), (32, 4, 2), (32, 4, 4), (32, 8, 4), (64, 4, 1), (64, 4, 2),
                                             (64, 8, 2), (16, 4, 4))]
# contexts as the engine sees them: ragged (each sequence ctx - i % 16 long, see `_attention_inputs`)
ATTENTION_SWEEP_CASES = [(B, dims, ctx) for B in (256, 64, 16) for ctx in (112, 1024)
                         for dims in ((128, 128), (96, 96), (80, 80))]


def _precompile_attention(configs: list[dict], *args) -> None:
    """Compile ``decode_attention_triton(*args)`` under every configuration at once (Triton's
    ``AsyncCompileMode`` on the autotuner's thread pool): 36 configurations x 3 head dims compiled one
    after another would take most of a sweep's time budget."""
    from .autotune import _compile_pool
    from .decode_attention import decode_attention_triton

    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # pragma: no cover - Triton < 3.4: each config compiles at its first launch
        return
    with AsyncCompileMode(_compile_pool()):
        for cfg in configs:
            try:
                decode_attention_triton(*args, config=cfg, compile_only=True)
            except Exception:  # noqa: BLE001 - recorded when the timing loop launches it
                pass


def run_attention_sweep(out_path: str, time_budget_s: float = 240.0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Time ``decode_attention_triton`` under every launch configuration of ``ATTENTION_SWEEP_CONFIGS``
    against ``decode_attention.DEFAULT_CONFIG`` for each case (batch, (d_qk, d_v), context) of
    ``ATTENTION_SWEEP_CASES``, 32 heads, CUDA graphs, L2 defeated; each case records its timings,
    achieved TB/s, the best configuration and its speedup, and that its output matches the default's.
    Writes JSON after every case; cases past the budget are recorded as skipped."""
    from .decode_attention import DEFAULT_CONFIG, auto_config, config_name, decode_attention_triton

    t0 = time.time()
    results: dict = {"kind": "attention_sweep", "dtype": str(dtype), "torch": torch.__version__,
                     "default_config": DEFAULT_CONFIG, "configs": ATTENTION_SWEEP_CONFIGS, "cases": []}
    if not torch.cuda.is_available():
        results["error"] = "CUDA is not available: nothing to benchmark"
        _write(out_path, results)
        return results
    results["device"] = torch.cuda.get_device_name()
    torch.manual_seed(0)
    compiled: set = set()
    for B, dims, ctx in ATTENTION_SWEEP_CASES:
        case: dict = {"batch": B, "d_qk": dims[0], "d_v": dims[1], "context": ctx}
        if time.time() - t0 > time_budget_s:
            results["cases"].append(dict(case, skipped="time budget exhausted"))
            continue
        try:
            q, kc, vc, tables, lens, nbytes, flops = _attention_inputs(dims, B, ctx, dtype, ragged=True)
            if dims not in compiled:
                _precompile_attention([DEFAULT_CONFIG] + ATTENTION_SWEEP_CONFIGS, q, kc, vc, tables[0], lens,
                                      128 ** -0.5)
                compiled.add(dims)
            ref = decode_attention_triton(q, kc, vc, tables[0], lens, 128 ** -0.5)
            timings = {}
            for cfg in [DEFAULT_CONFIG] + [c for c in ATTENTION_SWEEP_CONFIGS if c != DEFAULT_CONFIG]:
                name = config_name(cfg)
                try:
                    out = decode_attention_triton(q, kc, vc, tables[0], lens, 128 ** -0.5, config=cfg)
                    if _rel(out, ref) > 1e-2:
                        timings[name] = {"error": f"output differs from the default's by {_rel(out, ref):.2e}"}
                        continue
                    us = _time_graph([lambda i=i, c=cfg: decode_attention_triton(q, kc, vc, tables[i], lens,
                                                                                    128 ** -0.5, config=c)
                                      for i in range(len(tables))])
                    timings[name] = {"us": us, "TBps": nbytes / (us * 1e-6) / 1e12}
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                    timings[name] = {"error": repr(exc)[:300]}
                    torch.cuda.synchronize()
            ok = {k: v for k, v in timings.items() if "us" in v}
            default = config_name(DEFAULT_CONFIG)
            best = min(ok, key=lambda k: ok[k]["us"])
            case.update(bytes=nbytes, flops=flops, timings=timings, best=best,
                        auto=config_name(auto_config(ctx, *dims, B)),
                        best_speedup_vs_default=ok[default]["us"] / ok[best]["us"] if default in ok else None)
            del q, kc, vc, tables
        except Exception as exc:  # noqa: BLE001
            case["error"] = repr(exc)[:500]
            torch.cuda.synchronize()
        case["wall_s"] = round(time.time() - t0, 1)
        results["cases"].append(case)
        if "best" in case:
            d = case["timings"].get(default, {})
            print(f"attention B={B} {dims} ctx={ctx}: default {d.get('us', float('nan')):.1f} us "
                  f"({d.get('TBps', float('nan')):.2f} TB/s), best {case['best']} "
                  f"{case['timings'][case['best']]['us']:.1f} us ({case['timings'][case['best']]['TBps']:.2f} TB/s), "
                  f"x{case['best_speedup_vs_default']:.2f}", flush=True)
        torch.cuda.empty_cache()
        _write(out_path, results)
    results["total_s"] = round(time.time() - t0, 1)
    _write(out_path, results)
    return results


def _write(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------------
# low-rank decode sweep: where the time goes, per split-K, per stage
# ------------------------------------------------------------------------------------------------
def _sweep_case(K: int, N: int, R: int, M: int, dtype: torch.dtype) -> dict:
    """Graph-timed full op, shrink only and expand only for each split, plus cuBLAS's two stages."""
    from .lowrank import expand_, lowrank_linear_triton, shrink_, split_k

    dev = torch.device("cuda")
    esz = torch.finfo(dtype).bits // 8
    n = _copies((R * K + N * R) * esz, True)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    As = [torch.randn(R, K, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n)]
    Bs = [torch.randn(N, R, device=dev, dtype=dtype) * R ** -0.5 for _ in range(n)]
    y = torch.empty(M, N, device=dev, dtype=dtype)
    t16 = torch.matmul(x, As[0].t())
    case = {"in": K, "out": N, "rank": R, "tokens": M, "heuristic_split": split_k(M, R, K, dev),
            "cublas_shrink_us": _time_graph([lambda i=i: torch.matmul(x, As[i].t()) for i in range(n)]),
            "cublas_expand_us": _time_graph([lambda i=i: torch.matmul(t16, Bs[i].t()) for i in range(n)]),
            "cublas_both_us": _time_graph([lambda i=i: torch.matmul(torch.matmul(x, As[i].t()), Bs[i].t())
                                           for i in range(n)]),
            "splits": {}}
    for s in (1, 2, 4, 8):
        t = torch.empty(s, M, R, device=dev, dtype=torch.float32)
        lowrank_linear_triton(x, As[0], Bs[0], splits=s)  # tune both stages outside capture
        case["splits"][s] = {
            "full_us": _time_graph([lambda i=i, s=s: lowrank_linear_triton(x, As[i], Bs[i], splits=s) for i in range(n)]),
            "shrink_us": _time_graph([lambda i=i, t=t: shrink_(x, As[i], t) for i in range(n)]),
            "expand_us": _time_graph([lambda i=i, t=t: expand_(t, Bs[i], None, y) for i in range(n)]),
        }
    best = min(case["splits"], key=lambda s: case["splits"][s]["full_us"])
    case["best_split"] = best
    case["best_speedup_vs_cublas"] = case["cublas_both_us"] / case["splits"][best]["full_us"]
    return case


def run_lowrank_sweep(dtype: torch.dtype = torch.bfloat16, deadline: float | None = None) -> list[dict]:
    """Split-K x stage timings at decode sizes (7B up/down, ranks 25 % / 75 %); for tuning
    ``split_k`` and ``MODEGPT_LOWRANK_TRITON_MAX_TOKENS``. Stops at ``deadline`` (time.time())."""
    out = []
    for K, N in ((4096, 11008), (11008, 4096)):
        for R in (1024, 3072):
            for M in (1, 16, 64, 256):
                if deadline is not None and time.time() > deadline:
                    out.append({"in": K, "out": N, "rank": R, "tokens": M, "skipped": "time budget exhausted"})
                    continue
                try:
                    c = _sweep_case(K, N, R, M, dtype)
                    print(f"sweep {K}->{N} r={R} M={M}: cublas {c['cublas_both_us']:.1f} us, "
                          + ", ".join(f"s{s} {v['full_us']:.1f} ({v['shrink_us']:.1f}+{v['expand_us']:.1f})"
                                      for s, v in c["splits"].items()), flush=True)
                except Exception as exc:  # noqa: BLE001
                    c = {"in": K, "out": N, "rank": R, "tokens": M, "error": repr(exc)[:500]}
                out.append(c)
                torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# CLI: modegpt bench kernels

CASE_PREFIXES = ("skinny", "rope_qkv", "linear_rope", "attention_short", "lowrank", "attention", "rope")


def add_kernel_bench(bsub) -> None:
    p = bsub.add_parser("kernels", help="each Triton kernel against the PyTorch/cuBLAS sequence it replaces (CUDA)")
    p.add_argument("--only", nargs="+", default=[], metavar="PREFIX",
                   help=f"run just the cases whose name starts with one of these ({', '.join(CASE_PREFIXES)})")
    p.add_argument("--budget", type=float, default=270.0, help="seconds; cases past it are recorded as skipped")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--attention-sweep", action="store_true",
                   help="time decode attention under every launch configuration instead (run_attention_sweep)")
    p.add_argument("--json", type=Path, default=Path("runs/bench-kernels.json"))
    p.set_defaults(func=run_kernel_bench_cli)


def run_kernel_bench_cli(args) -> int:
    """``modegpt bench kernels``: exit 2 with a clear message where there is no CUDA GPU to time on."""
    if not torch.cuda.is_available():
        print("error: modegpt bench kernels needs a CUDA GPU (the kernels' CPU path is PyTorch itself); "
              "their correctness runs on the CPU under TRITON_INTERPRET=1 in tests/test_kernels.py", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    if args.attention_sweep:
        results = run_attention_sweep(str(args.json), args.budget, dtype)
    else:
        results = run_kernel_bench(str(args.json), args.budget, dtype, only=tuple(args.only), sweep=not args.only)
    print(f"wrote {args.json}")
    return 1 if "error" in results else 0
