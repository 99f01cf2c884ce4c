"""Triton skinny linear: ``y = x @ W.T + bias`` for the few tokens of a decode step (M <= 16).

Why (docs/BENCHMARKS.md, H200 step profile of a 30 % ModeGPT checkpoint of LLaMA-2-7B at batch 1):
the weight matmuls are 72 % of a decode step, and cuBLAS streamed the compressed model's weights at
3.57 TB/s against 3.8 TB/s for the dense model's. Its tiles are 64-192 output rows wide and the
compressed widths (per-layer MLP widths such as 7528, per-layer q/k/v widths 32 x 80..112) leave
partial waves on 132 SMs, which cuBLAS patches with split-K plus a separate reduce kernel (60 extra
launches per step). A decode matmul is a pure weight stream, so this kernel is built for exactly that:

* One program per ``BLOCK_N`` output rows (8-64, autotuned per shape), each streaming its rows'
  whole K range with a software-pipelined loop (``num_stages``): small tiles give hundreds of
  programs, so the last wave is short, and there is no split-K and no second launch.
* ``M == 1``: an fp32 multiply + row reduction on the CUDA cores (a tensor-core tile would be 1/16
  used). ``2 <= M <= 16``: ``tl.dot`` with the token rows padded to 16.
* Rows of W start ``K`` elements apart. Triton only proves 16-element alignment of integer
  arguments, so a width like 9880 (a multiple of 8, not 16) would make it issue 2-byte loads
  (0.42 TB/s, measured for the attention kernel's odd head dims): the launcher passes the largest
  power-of-two divisor (<= 8) of the row stride as ``ALIGN`` and the kernel asserts it with
  ``tl.multiple_of``, which keeps 16-byte vector loads.
* fp32 accumulation, one rounding to the output dtype, bias added in fp32 (as cuBLAS does; results
  match it up to summation order).

Autotuning is keyed on (M bucket, N and K rounded up to 256) so the per-layer widths of a
compressed model share a handful of tunings; results persist in Triton's cache (``kernels.autotune``).
``kernels.dispatch.linear`` uses it on CUDA for M <= ``MODEGPT_SKINNY_MAX_TOKENS`` (default 16) and
cuBLAS above, and in ``auto`` mode only for the shapes where it measured faster than cuBLAS
(:func:`beats_cublas`); ``MODEGPT_KERNELS=torch`` turns it off with the other kernels.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, cdiv, dot_precision, pdl_enabled, pdl_meta
from ._tl import mma as _mma
from ._tl import pdl_wait
from .autotune import autotune, launch

MAX_M = 16


def _cfg(bn, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_CONFIGS = [_cfg(*c) for c in (
    (8, 1024, 4, 3), (16, 512, 4, 4), (16, 1024, 8, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3),
    (64, 128, 4, 4))]
_INTERPRET = {"BLOCK_N": 16, "BLOCK_K": 32}


def _prune(configs, named_args, **kwargs):
    """The dot path needs BLOCK_N >= 16 (MMA tile). Triton passes the launch's constexpr keywords
    (``M_PAD``) in ``kwargs`` and the positional arguments in ``named_args``."""
    if kwargs.get("M_PAD", named_args.get("M_PAD", 1)) > 1:
        return [c for c in configs if c.kwargs["BLOCK_N"] >= 16]
    return configs


@triton.jit
def _swiglu(g, u):
    """``silu(g) * u`` rounded like ``kernels.fused_norm``'s ``silu_mul``: the activation, then the
    product, each to the dtype of ``g``."""
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _load_x(ptrs, mask, UP_OFF, GATED: tl.constexpr, MASKED: tl.constexpr):
    """The activation tile: ``x`` itself, or for ``GATED`` the SwiGLU of a fused gate/up row
    (``silu(gate) * up`` with up ``UP_OFF`` elements after gate), rounded exactly like
    ``kernels.fused_norm``'s ``silu_mul``, so the fused matmul sees the same bits as the two-launch
    chain. ``MASKED=False``: no mask at all (the whole-tile main loop), masked lanes read as 0 otherwise."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if GATED:
        if MASKED:
            u = tl.load(ptrs + UP_OFF, mask=mask, other=0.0)
        else:
            u = tl.load(ptrs + UP_OFF)
        x = _swiglu(x, u)
    return x


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, N_KEY, K_KEY, UP_OFF,
                   M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr,
                   GATED: tl.constexpr, X_ALIGN: tl.constexpr, SWIGLU_OUT: tl.constexpr, PDL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y = x @ W.T + b`` for ``N`` output rows; ``SWIGLU_OUT``: W holds gate rows ``[0, N)`` and up
    rows ``[N, 2N)`` (a fused gate/up weight) and ``y = silu(gate) * up``, each program computing the
    same rows of both halves, so the SwiGLU is an epilogue (no ``[M, 2N]`` round trip, no extra launch)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.multiple_of(offs_n.to(tl.int64) * stride_wn, ALIGN)
    rows_u = tl.multiple_of((offs_n + N).to(tl.int64) * stride_wn, ALIGN)  # SWIGLU_OUT: the up half's rows
    # whole BLOCK_K tiles first, without a K mask: a mask `k < K` with K not provably a multiple of
    # 16 (7288, 9880) has per-element constancy and turns every load scalar (measured 1.1-2.2 TB/s
    # on the H200 against 3.6 for K = 11008); the ragged tail is one masked step after the loop
    k_main = (K // BLOCK_K) * BLOCK_K
    offs_b = tl.arange(0, BLOCK_K)
    # same reason as ALIGN, for the up half's loads: UP_OFF is a multiple of X_ALIGN (the launcher
    # checks), and writing it as a product by the constant lets the compiler prove that alignment
    up_off = (UP_OFF // X_ALIGN) * X_ALIGN
    # The first whole weight tile (and the bias) need nothing from the previous kernel: under PDL
    # they stream while that kernel finishes; activations are read only after pdl_wait. Its K mask
    # (all or nothing: is there a whole tile at all?) compares against a multiple of BLOCK_K, which
    # the compiler can prove, so the loads stay vectorized.
    first = offs_b < k_main
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SWIGLU_OUT:
            bias_u = tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if M_PAD == 1:
        w0 = tl.load(w_ptr + rows[:, None] + offs_b[None, :], mask=n_mask[:, None] & first[None, :], other=0.0)
        if SWIGLU_OUT:
            w0u = tl.load(w_ptr + rows_u[:, None] + offs_b[None, :], mask=n_mask[:, None] & first[None, :], other=0.0)
        pdl_wait(PDL)
        x0 = _load_x(x_ptr + offs_b, first, up_off, GATED, True).to(tl.float32)[None, :]
        acc = tl.sum(w0.to(tl.float32) * x0, axis=1)
        if SWIGLU_OUT:
            acc_u = tl.sum(w0u.to(tl.float32) * x0, axis=1)
        for k0 in range(BLOCK_K, k_main, BLOCK_K):
            offs_k = k0 + offs_b
            x = _load_x(x_ptr + offs_k, offs_k < K, up_off, GATED, False).to(tl.float32)[None, :]
            w = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=n_mask[:, None], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x, axis=1)
            if SWIGLU_OUT:
                wu = tl.load(w_ptr + rows_u[:, None] + offs_k[None, :], mask=n_mask[:, None], other=0.0)
                acc_u += tl.sum(wu.to(tl.float32) * x, axis=1)
        if k_main < K:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            x = _load_x(x_ptr + offs_k, k_mask, up_off, GATED, True).to(tl.float32)[None, :]
            w = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x, axis=1)
            if SWIGLU_OUT:
                wu = tl.load(w_ptr + rows_u[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                             other=0.0)
                acc_u += tl.sum(wu.to(tl.float32) * x, axis=1)
        if HAS_BIAS:
            acc += bias
            if SWIGLU_OUT:
                acc_u += bias_u
        y = acc.to(y_ptr.dtype.element_ty)
        if SWIGLU_OUT:
            y = _swiglu(y, acc_u.to(y_ptr.dtype.element_ty))
        tl.store(y_ptr + offs_n, y, mask=n_mask)
    else:
        offs_m = tl.arange(0, M_PAD)
        m_mask = offs_m < M
        w0 = tl.load(w_ptr + rows[None, :] + offs_b[:, None], mask=n_mask[None, :] & first[:, None], other=0.0)
        if SWIGLU_OUT:
            w0u = tl.load(w_ptr + rows_u[None, :] + offs_b[:, None], mask=n_mask[None, :] & first[:, None], other=0.0)
        pdl_wait(PDL)
        x0 = _load_x(x_ptr + offs_m[:, None] * stride_xm + offs_b[None, :],
                     m_mask[:, None] & first[None, :], up_off, GATED, True)
        acc2 = _mma(x0, w0, tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32), PRECISION)
        if SWIGLU_OUT:
            acc2_u = _mma(x0, w0u, tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32), PRECISION)
        for k0 in range(BLOCK_K, k_main, BLOCK_K):
            offs_k = k0 + offs_b
            x = _load_x(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], m_mask[:, None], up_off, GATED, True)
            w = tl.load(w_ptr + rows[None, :] + offs_k[:, None], mask=n_mask[None, :], other=0.0)
            acc2 = _mma(x, w, acc2, PRECISION)
            if SWIGLU_OUT:
                wu = tl.load(w_ptr + rows_u[None, :] + offs_k[:, None], mask=n_mask[None, :], other=0.0)
                acc2_u = _mma(x, wu, acc2_u, PRECISION)
        if k_main < K:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            x = _load_x(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], m_mask[:, None] & k_mask[None, :],
                        up_off, GATED, True)
            w = tl.load(w_ptr + rows[None, :] + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc2 = _mma(x, w, acc2, PRECISION)
            if SWIGLU_OUT:
                wu = tl.load(w_ptr + rows_u[None, :] + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None],
                             other=0.0)
                acc2_u = _mma(x, wu, acc2_u, PRECISION)
        if HAS_BIAS:
            acc2 += bias[None, :]
            if SWIGLU_OUT:
                acc2_u += bias_u[None, :]
        y2 = acc2.to(y_ptr.dtype.element_ty)
        if SWIGLU_OUT:
            y2 = _swiglu(y2, acc2_u.to(y_ptr.dtype.element_ty))
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y2, mask=m_mask[:, None] & n_mask[None, :])


_skinny = autotune(_CONFIGS, key=["N_KEY", "K_KEY", "M_PAD", "GATED", "SWIGLU_OUT"], prune=_prune)(_skinny_kernel)


def _align(*ints: int) -> int:
    g = 8
    for v in ints:
        g = math.gcd(g, int(v))
    return max(1, g)


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, *, gated: bool = False,
                         swiglu_out: bool = False) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.linear` for ``x`` ``[..., K]`` with at most 16 rows.

    ``gated=True``: ``x`` is a fused gate/up output ``[..., 2K]`` (gate first) and the kernel computes
    ``silu(gate) * up`` while loading it, i.e. :func:`kernels.dispatch.swiglu_linear` in one launch.
    ``swiglu_out=True``: ``weight`` (and ``bias``) is a fused gate/up weight ``[2I, K]`` (gate rows
    first) and the result is ``silu(gate) * up`` ``[..., I]``, the SwiGLU applied in the epilogue
    (:func:`kernels.dispatch.swiglu_mlp`); bit for bit ``silu_mul`` of this kernel's plain output."""
    if gated and swiglu_out:
        raise ValueError("gated (SwiGLU on the input) and swiglu_out (on the output) exclude each other")
    rows_w, K = weight.shape
    if swiglu_out and rows_w % 2:
        raise ValueError(f"swiglu_out needs a fused gate/up weight with an even row count, got {rows_w}")
    N = rows_w // 2 if swiglu_out else rows_w
    K_x = 2 * K if gated else K
    if x.shape[-1] != K_x:
        raise ValueError(f"shape mismatch: x[..., {x.shape[-1]}] and weight {tuple(weight.shape)}"
                         + (" (gated: x holds gate and up, 2 x in_features)" if gated else ""))
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share one of {SUPPORTED_DTYPES}")
    if weight.stride(1) != 1:
        raise ValueError("weight needs unit stride along K")
    if bias is not None and (bias.shape != (rows_w,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{rows_w}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K_x)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"skinny_linear takes at most {MAX_M} rows, got {M}")
    if out is None:
        out = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    y = out.view(M, N)
    if M == 0:
        return out
    m_pad = 1 if M == 1 else 16
    x_align = _align(K, x2.stride(0), x2.data_ptr() // x2.element_size()) if gated else 1
    launch(_skinny, lambda meta: (cdiv(N, meta["BLOCK_N"]),),
           (x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
            cdiv(N, 256), cdiv(K, 256), K if gated else 0),
           dict(M_PAD=m_pad, HAS_BIAS=bias is not None, ALIGN=_align(weight.stride(0), weight.data_ptr() // weight.element_size()),
                PRECISION=dot_precision(x.dtype), GATED=gated, X_ALIGN=x_align, SWIGLU_OUT=swiglu_out,
                **pdl_meta(x.device)), _INTERPRET)
    return out


_PICKS: dict[tuple, object] = {}
_FLUSH_BYTES = 128 << 20  # > 2x the H200's 60 MB L2: each timed call streams its weight from HBM


def _predecessor(flush: torch.Tensor):
    """A small PDL kernel to precede each timed call (an RMSNorm of 16 rows of 4096 bf16 from the
    flush buffer): in the engine every matmul follows one of our kernels, and under PDL
    (``kernels._common``) our kernels start streaming their weights while it finishes, cuBLAS does not."""
    from .fused_norm import add_rms_norm_triton

    rows = flush[: 4096 * 16 * 2].view(torch.bfloat16).view(16, 4096)
    norm_w = flush[-4096 * 2:].view(torch.bfloat16)
    return lambda: add_rms_norm_triton(rows, None, norm_w, 1e-5)


def _graph_us(fn, flush: torch.Tensor, before, reps: int = 20) -> float:
    """Microseconds of `fn` as a CUDA graph replays it (what the engine's decode graphs see: no
    host launch cost, which dominates eager timing of a 10-60 us kernel), each call after an L2
    flush and the predecessor ``before``; the flush and the predecessor alone are timed the same
    way and subtracted. Everything launched here must have run once outside a capture (a first
    launch loads the kernel's module, which invalidates a capture)."""
    def timed(calls) -> float:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
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


# A candidate other than the preferred one (our kernel, the fewer launches) must be this much faster
# to be picked: the timing repeats to a few percent, and in the engine our kernels also overlap the
# tail of whatever precedes them, which one predecessor here only approximates (2026-11-29, session 5:
# without a margin, one H200 run picked cuBLAS for one of LLaMA-2-7B's per-layer matmuls, 32 launches
# of 28 us per step, and the original's batch-1 step took 4.31 ms against 3.87 ms in the run before,
# which had picked the skinny kernel for every matmul).
PICK_MARGIN = 0.97


def _timed_pick(key: tuple, candidates: dict, device: torch.device, prefer=None):
    """The fastest of ``candidates`` (name -> zero-argument callable) by :func:`_graph_us`, measured
    once per ``key``, where ``prefer`` wins unless another is faster than ``PICK_MARGIN`` x its time;
    None during another graph's capture (nothing can be timed then)."""
    if key not in _PICKS:
        if torch.cuda.is_current_stream_capturing():
            return None
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
        before = _predecessor(flush)
        before()
        for fn in candidates.values():
            fn()  # autotune / cuBLAS heuristics / module loads outside the capture
        torch.cuda.synchronize()
        times = {name: _graph_us(fn, flush, before) for name, fn in candidates.items()}
        del flush
        best = min(times, key=times.get)
        if prefer in times and times[best] >= PICK_MARGIN * times[prefer]:
            best = prefer
        _PICKS[key] = best
    return _PICKS[key]


def beats_cublas(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> bool:
    """Whether this kernel is faster than cuBLAS for ``x2`` ``[M, K]`` against ``weight``, decided
    once per (N, K, M bucket, dtype, bias, gated, device, PDL) by timing both inside CUDA graphs
    with the L2 flushed before each call (~10 ms per new shape, in the engine's warm-up before its
    own graph capture). Eager timing would be wrong here: Triton's host launch path (~40 us)
    exceeds the kernel, and an eager measurement on the H200 picked cuBLAS for every LLaMA-2-7B
    shape although the kernel is 1.04-1.26x faster on most of them in graphs (and 0.96x on a
    4096 -> 10752 q/k/v, 0.5x at 4-16 tokens with a K that is not a multiple of 16). During
    another graph's capture nothing can be timed: an unseen shape then takes cuBLAS.

    ``gated``: ``x2`` is ``[M, 2K]`` (gate | up), and the fused SwiGLU + matmul launch is timed against
    what would run otherwise: the ``silu_mul`` launch, then the faster of this kernel and cuBLAS."""
    key = ("dense", tuple(weight.shape), 1 if x2.shape[0] == 1 else MAX_M, weight.dtype, bias is not None, gated,
           weight.device, pdl_enabled(weight.device))
    if gated:
        from .fused_norm import silu_mul_triton

        K = weight.shape[1]
        if key not in _PICKS and not torch.cuda.is_current_stream_capturing():
            h = silu_mul_triton(x2[:, :K], x2[:, K:])
            plain = skinny_linear_triton if beats_cublas(h, weight, bias) else torch.nn.functional.linear
        else:
            plain = None
        candidates = {"ours": lambda: skinny_linear_triton(x2, weight, bias, gated=True),
                      "theirs": lambda: plain(silu_mul_triton(x2[:, :K], x2[:, K:]), weight, bias)}
    else:
        candidates = {"ours": lambda: skinny_linear_triton(x2, weight, bias),
                      "theirs": lambda: torch.nn.functional.linear(x2, weight, bias)}
    return _timed_pick(key, candidates, weight.device, prefer="ours") == "ours"


def lowrank_pick(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, bool]:
    """For a factorized linear ``(x2 @ A.T) @ B.T + bias`` at decode sizes: whether the shrink and
    the expand each take this kernel (True) or cuBLAS (False), timed as PAIRS (all four
    combinations, once per shape): with PDL the expand's weight stream overlaps the shrink only when
    both are our kernels, which timing each stage alone cannot see. During another graph's capture
    an unseen shape takes cuBLAS for both."""
    key = ("lowrank", tuple(A.shape), tuple(B.shape), 1 if x2.shape[0] == 1 else MAX_M, A.dtype,
           bias is not None, A.device, pdl_enabled(A.device))
    cublas = torch.nn.functional.linear

    def pair(first, second):
        return lambda: second(first(x2, A, None), B, bias)

    candidates = {(a, b): pair(skinny_linear_triton if a else cublas, skinny_linear_triton if b else cublas)
                  for a in (True, False) for b in (True, False)}
    return _timed_pick(key, candidates, A.device, prefer=(True, True)) or (False, False)
