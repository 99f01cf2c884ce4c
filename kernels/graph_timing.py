"""Timing a decode kernel the way a decode step runs it: inside a CUDA graph, right behind another kernel.

A decode step is one CUDA graph of ~300 launches. Each matmul streams a weight that is not in the L2 and,
under programmatic dependent launch (``kernels._common``), starts loading it while the kernel before it
finishes. Timed alone (``triton.testing.do_bench``: eager, after an L2 flush, nothing before it), the same
launch pays its ramp from an idle GPU, which is most of a 10-40 us kernel's time. The two rank configs
differently: in the H200 step trace of session 11 (docs/BENCHMARKS.md) the tile picked by ``do_bench`` for
half of a 30 % checkpoint's gate/up projections (64-row tiles, 216 programs) ran at 78 % of the bandwidth
ceiling in the step, where 8-row tiles ran at 90-96 %, although ``do_bench`` had timed the two within 1 %.

:func:`graph_us` times a call as the step sees it: in a graph, each call after an L2 flush and a small
PDL predecessor, with the flush and the predecessor timed alone and subtracted. The engine's per-shape
picks (our kernel or cuBLAS, ``skinny_linear._timed_pick``) use it, and :func:`chain_bench` hands it to
Triton's autotuner as ``do_bench``, so tile configs are chosen by the same measure.
"""
from __future__ import annotations

import warnings

import torch

FLUSH_BYTES = 128 << 20  # > 2x the H200's 60 MB L2: each timed call streams its weight from HBM


def predecessor(flush: torch.Tensor):
    """A small PDL kernel to precede each timed call (an RMSNorm of 16 rows of 4096 bf16 from the
    flush buffer): in the engine every matmul follows one of our kernels, and under PDL
    (``kernels._common``) our kernels start streaming their weights while it finishes, cuBLAS does not."""
    from .fused_norm import add_rms_norm_triton

    rows = flush[: 4096 * 16 * 2].view(torch.bfloat16).view(16, 4096)
    norm_w = flush[-4096 * 2:].view(torch.bfloat16)
    return lambda: add_rms_norm_triton(rows, None, norm_w, 1e-5)


def graph_us(fn, flush: torch.Tensor, before, reps: int = 20) -> float:
    """Microseconds of `fn` as a CUDA graph replays it (what the engine's decode graphs see: no
    host launch cost, which dominates eager timing of a 10-60 us kernel), each call after an L2
    flush and the predecessor ``before``; the flush and the predecessor alone are timed the same
    way and subtracted. Everything launched here must have run once outside a capture (a first
    launch loads the kernel's module, which invalidates a capture)."""
    def timed(calls) -> float:
        g = torch.cuda.CUDAGraph()
        # relaxed: a throwaway timing graph; in a float32 test engine (H200, session 6) a capture here
        # was still invalidated after every candidate had run once outside it
        with torch.cuda.graph(g, capture_error_mode="relaxed"):
            for _ in range(reps):
                calls()
        g.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / reps)
        return best

    def prologue():
        flush.zero_()
        before()

    def both():
        prologue()
        fn()

    return timed(both) - timed(prologue)


_WARNED: list = []  # one warning per process


def chain_bench(kernel_call, quantiles=None, **_):
    """``do_bench`` for ``triton.autotune`` (``kernels.autotune.autotune(..., bench=chain_bench)``):
    milliseconds of one ``kernel_call`` by :func:`graph_us`, in the shape ``do_bench`` returns (a list per
    quantile when asked). The call runs once eagerly first (module load; Triton's autotuner lets
    ``OutOfResources`` from it through to mark the config unusable). A capture that fails falls back to
    ``do_bench`` for that config, with one warning per process."""
    import triton.testing

    kernel_call()
    torch.cuda.synchronize()
    try:
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        before = predecessor(flush)
        flush.zero_()
        before()
        ms = max(graph_us(kernel_call, flush, before), 0.0) / 1e3
    except RuntimeError as exc:
        torch.cuda.synchronize()
        if not _WARNED:
            _WARNED.append(exc)
            warnings.warn(f"kernels: timing a config in a CUDA graph failed ({exc!r}); falling back to "
                          "triton.testing.do_bench", RuntimeWarning)
        return triton.testing.do_bench(kernel_call, warmup=2, rep=8, quantiles=quantiles)
    return [ms] * len(quantiles) if quantiles else ms
