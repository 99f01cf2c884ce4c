"""Timing a decode kernel the way a decode step runs it: inside a CUDA graph, right behind another kernel.

A decode step is one CUDA graph of ~300 launches. Each matmul streams a weight that is not in the L2 and,
under programmatic dependent launch (``kernels._common``), starts loading it while the kernel before it
finishes. Timed alone (``triton.testing.do_bench``: eager, after an L2 flush, nothing before it), the same
launch pays its ramp from an idle GPU, which is most of a 10-40 us kernel's time. The two rank configs
differently: in the H200 step trace of session 11 (docs/BENCHMARKS.md) the tile picked by ``do_bench`` for
19 of a 30 % checkpoint's 32 gate/up projections (32-row tiles, 216-312 programs) ran at 78-88 % of the
bandwidth ceiling in the step, where smaller tiles ran at 87-96 %, although ``do_bench`` had timed the two
within 1 %.

:func:`graph_us` times a call in a graph, each call after an L2 flush and a small PDL predecessor, with
the flush and the predecessor timed alone and subtracted. The engine's per-shape picks between different
kernels (our kernel or cuBLAS, ``skinny_linear._timed_pick``) used it up to session 11, and still do under
``MODEGPT_PICK_TIMING=flush``. It ranked the skinny kernel's tile configs no better than ``do_bench`` (H200,
session 11: a 4096 x 4096 GEMV took 13 us there and 8.4 us inside a step; the SwiGLU gate/up tiles of 8 and
32 rows timed within 2 %). A likely cause, not measured: its memset leaves 128 MB of dirty lines in the L2,
written back while the timed call reads.

:func:`stream_us` times a launch in the steady state of a step: repeated in one graph on rotating copies of
its weights (:func:`weight_copies`), each launch behind the same small PDL kernel. The skinny kernel's tile
configs are chosen by it (``skinny_linear.tune_config``), and from session 12 on the engine's per-shape
picks too. Without the small kernel between them (session 11, call 3) the launches overlapped each other,
which favoured 64-row tiles of few programs at 16 tokens: batch 16 got 3 % slower.
"""
from __future__ import annotations

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


def step_predecessor(device: torch.device):
    """The small PDL kernel that :func:`stream_us` puts before each timed launch, as a decode step does:
    :func:`predecessor` on a scratch buffer of its own (a 16 x 4096 RMSNorm)."""
    return predecessor(torch.zeros(1 << 18, dtype=torch.uint8, device=device))


def _graph_us(body, reps: int) -> float:
    """Microseconds per repetition of a CUDA graph of ``body(i)`` for ``i < reps``: best of 5 replays."""
    g = torch.cuda.CUDAGraph()
    # relaxed: a throwaway timing graph; in a float32 test engine (H200, session 6) a capture here
    # was still invalidated after every candidate had run once outside it
    with torch.cuda.graph(g, capture_error_mode="relaxed"):
        for i in range(reps):
            body(i)
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


def graph_us(fn, flush: torch.Tensor, before, reps: int = 20) -> float:
    """Microseconds of `fn` as a CUDA graph replays it (what the engine's decode graphs see: no
    host launch cost, which dominates eager timing of a 10-60 us kernel), each call after an L2
    flush and the predecessor ``before``; the flush and the predecessor alone are timed the same
    way and subtracted. Everything launched here must have run once outside a capture (a first
    launch loads the kernel's module, which invalidates a capture)."""
    def prologue(_=None):
        flush.zero_()
        before()

    def both(_):
        prologue()
        fn()

    return _graph_us(both, reps) - _graph_us(prologue, reps)


def weight_copies(weights, min_bytes: int, most: int = 16) -> list:
    """``weights`` and enough clones of it that cycling through them streams at least ``min_bytes``
    (at most ``most`` sets): back-to-back calls on one small weight would read it from the L2.
    ``weights`` is one tensor (returns tensors) or a tuple of the tensors one call streams together,
    e.g. a low-rank pair's two factors (returns tuples, each cloned as a whole)."""
    single = isinstance(weights, torch.Tensor)
    group = (weights,) if single else tuple(weights)
    nbytes = max(1, sum(w.numel() * w.element_size() for w in group))
    n = max(1, min(most, -(-int(min_bytes) // nbytes)))
    # same strides as the original (a row-strided view must stay one: the launch's stride argument is shared)
    sets = [group] + [tuple(torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device).copy_(w)
                            for w in group) for _ in range(n - 1)]
    return [g[0] for g in sets] if single else sets


def stream_copies(weights, device: torch.device) -> list:
    """:func:`weight_copies` streaming at least twice ``device``'s L2: no timed launch reads its weight from it."""
    return weight_copies(weights, 2 * torch.cuda.get_device_properties(device).L2_cache_size)


def stream_us(call, weights: list[torch.Tensor], reps: int = 24, between=None) -> float:
    """Microseconds per ``call(w)`` when ``reps`` of them run in one CUDA graph, cycling through
    ``weights``, each after ``between()`` (a small kernel; its chain alone is timed the same way and
    subtracted): the steady state of a decode step, where every weight-streaming launch follows a small
    kernel that consumes the previous one's output, under PDL it starts loading its weight while that
    kernel runs, and no weight is in the L2. Without ``between`` the launches follow each other directly,
    which lets a launch of few programs overlap the next one more than a step does. Best of 5 replays.
    ``call`` and ``between`` must have run once outside a capture."""
    def body(i: int, with_call: bool = True) -> None:
        if between is not None:
            between()
        if with_call:
            call(weights[i % len(weights)])

    if between is None:
        return _graph_us(body, reps)
    return _graph_us(body, reps) - _graph_us(lambda i: body(i, False), reps)
