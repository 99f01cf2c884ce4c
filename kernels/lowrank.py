"""Triton low-rank linear: ``y = (x @ A.T) @ B.T + bias`` with A ``[r, in]``, B ``[out, r]``.

Design (two launches, "shrink" then "expand", intermediate in fp32 in L2):

* Why not one fused launch. A fused kernel must give every output tile the whole ``M x r``
  intermediate ``t = x @ A.T``. Recomputing it per output tile re-reads all of A per tile: at the
  shapes we serve (4096 -> 11008, r = 1024..3072) that is ~170 tiles x 8-24 MB of A, tens of GB of
  L2 traffic for a 30-90 MB problem, far slower than reading A once. Keeping it resident in one
  program per M-tile (FlashSVD's "R2-resident" mode) needs ``BLOCK_M x r`` on chip (64 x 3072 bf16
  = 384 KB > the 228 KB of SMEM) and gives only ``M / BLOCK_M`` programs, which cannot fill 132
  SMs at decode. Both only pay for r <= ~128, which MoDeGPT ranks (25-75 % of full) never are.
* Decode (M <= 256, bandwidth-bound: bytes = r*(in+out)*2). The shrink kernel is split-K:
  ``SPLIT_K x (M-tiles x r-tiles)`` programs so that reading A (only ``r x in``, a few MB) uses the
  whole chip instead of ``r / BLOCK_R`` SMs; each split writes its fp32 partial ``[M, r]`` (a few
  KB, stays in L2). The expand kernel tiles the output over N (many tiles: enough parallelism),
  sums the SPLIT_K partials in a fixed order while loading t (deterministic, no atomics, no
  zero-fill launch, batch-invariant), rounds t to the input dtype like the unfused chain, and
  streams B once. The extra partial reads are ``SPLIT_K * M * r * 4`` bytes per output tile from
  L2, so SPLIT_K shrinks as M grows (``_split_k``). Under CUDA graphs the second launch costs
  ~1-2 us of gap; PDL overlap is left for later (see the report).
* Prefill (M up to 8192, compute-bound): SPLIT_K = 1 and both kernels are plain tiled GEMMs with
  large tiles and grouped (GROUP_M) tile order for L2 reuse. The ``M x r`` round trip through
  memory is ``4 * M * r * 2`` bytes, < 3 % of the time of the FLOPs at any shape we serve.

Precision: fp32 accumulation everywhere; fp32 inputs use exact (``ieee``) dot products; 16-bit
inputs round the intermediate to the input dtype once (as the two-matmul reference does).

Autotuning: configs keyed on (M bucket, N/K, r, split) and pruned by regime; results persist
across restarts through Triton's own disk cache (see ``kernels.autotune``).

Measured (H200, bf16, first version, ``kernels.bench``): 0.35-0.64x of two cuBLAS matmuls at
1-256 tokens and 0.52-0.85x at 2048-8192. The decode loss was traced (by reading, not profiled) to
the expand kernel summing the split-K partials in a runtime inner loop: SPLIT_K dependent L2
round trips per r-tile that the software pipeliner cannot overlap. SPLIT_K is now a compile-time
constant and the partial loads are unrolled and independent; this version is not yet measured.
``kernels.dispatch`` sends prefill sizes to cuBLAS.

Fused decode kernel (``lowrank_decode_triton``, M <= 64, one launch; issue #4). Measured twice, the
two launches above stayed at 0.57-0.87x of two cuBLAS calls: each stage alone was not faster than
its cuBLAS counterpart, and the second launch plus the fp32 partials added the rest. The fused
kernel is one launch whose programs take *tickets* from an atomic counter instead of using their
program ids:

* Tickets ``0 .. cdiv(r, RB) * KS - 1`` are shrink tiles: rank chunk c (RB rows of A), K split s.
  Each streams its rows of A over its K range (CUDA-core GEMV for one token, ``tl.dot`` with the
  tokens padded to 16/32/64 otherwise). With KS > 1 it stores an fp32 partial and the chunk's last
  split to arrive (per-chunk counter, acq_rel) sums the KS partials in split order, rounds the chunk
  of t once to the input dtype (as the two-matmul chain does) and stores it. The chunk is then
  counted into its rank *segment* (release).
* The remaining tickets are expand tiles: BN rows of B ``[out, r]`` (its natural layout: contiguous
  rows, as the skinny kernel streams them; no pre-transposed copy is needed) times all of t. A tile
  waits (acquire) for each of at most NSEG rank segments in turn and streams B over it, so output
  tiles start on the first segments while the last chunks of t are still being reduced. Bias is
  added in fp32 and y written once, in the output dtype.
* Deadlock freedom without co-residency: every shrink ticket is handed out before any expand
  ticket, so a waiting program only waits for programs that are already running and never wait
  themselves. (Waiting on program ids would hang if the waiting tiles filled the GPU first; on
  Triton's CPU interpreter, which runs programs one after the other, tickets equal program ids and
  nothing ever waits.)
* Self-resetting state: the chunk's last split zeroes its chunk counter; the last expand tile to
  finish (a done counter) zeroes the ticket, done and segment counters. The int32 counter block is
  allocated and zeroed once per device and is zero between launches, so CUDA-graph replays need no
  host work and no memset. t and the partials are per-call scratch from the caching allocator and
  are fully written before they are read. Two launches must not run concurrently on one device
  (streams running in parallel); sequential launches and graph replays are fine.
* Why not the atomic-accumulation design (programs over rank chunk x output split, each adding
  ``t_chunk @ B[:, chunk].T`` into an fp32 ``[M, out]`` accumulator; the last arriver per output
  split writes y): its atomic traffic is ``(r / RB) * M * out * 4`` bytes, e.g. 22.5 MB at 7B up,
  rank 1024, 16 tokens, RB 32 -- as much as the B factor itself -- plus A re-read once per output
  split, and fp32 atomics make the result depend on arrival order (not bitwise reproducible). Here
  every weight byte is read once from HBM, the only atomics are ~``r / RB + out / BN`` counter
  updates, and the result is deterministic. What it pays instead is the wait of the first expand
  tiles for the first segment of t (about one shrink tile plus one reduction; estimated, not measured).
* Tiles and splits are autotuned per (M bucket, out, in, r); ``fused_splits`` picks KS so the shrink
  tiles cover the chip ~1.5 times, keeping >= 1024 of K per split.
* Measured (H200, 2026-11-29, kernels/NOTES.md): 0.72-1.11x of two cuBLAS calls at 1 and 16 tokens
  (best on "up" shapes at one token), about the same as two skinny launches; not the 1.3x target, so
  ``kernels.dispatch`` does not route to it.

Split shrink (``shrink_split_triton``, M <= 64): the fused kernel's shrink tiles alone, one program per
tile (no tickets, nothing waits), the chunk's last split reducing in order as above, without publishing to
segments, and with the split's first A tile loaded before the PDL wait. Followed by the skinny expand
(``skinny_linear``), which streams B while it finishes, it is the low-rank pair's third shrink candidate
(``skinny_linear.lowrank_pick``). Measured (H200, session 10): 1.29-1.30x of two cuBLAS calls at 7B
down, rank 25 %, one token (the skinny shrink there: 0.82x), 1.07x at 13B and 16 tokens.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import SUPPORTED_DTYPES, cdiv, dot_precision, m_pad, next_pow2, sm_count, workspace
from ._tl import mma, pdl_wait
from .autotune import autotune, launch

DECODE_MAX_M = 256
# The expand kernel loads SPLIT_K fp32 partial tiles per r-step; if the pipeliner stages them in
# shared memory, 16 splits would exceed the SM's 228 KB for most tiles. 8 keeps every decode
# config's footprint below it.
MAX_SPLIT_K = 8


def m_bucket(M: int) -> int:
    """Autotuning bucket of a token count: powers of two, at least 16."""
    return max(16, min(next_pow2(M), 16384))


def _decode_block_m(bucket: int) -> int:
    return min(bucket, 64)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_SHRINK_CONFIGS = [
    # decode: one config family per BLOCK_M in {16, 32, 64}; prune picks the bucket's BLOCK_M
    *[_cfg(w, s, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, GROUP_M=1)
      for bm in (16, 32, 64)
      for (br, bk, w, s) in ((16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3),
                             (64, 256, 8, 3))],
    # prefill
    *[_cfg(w, s, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, GROUP_M=8)
      for (bm, br, bk, w, s) in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                 (128, 256, 64, 8, 3))],
]

_EXPAND_CONFIGS = [
    *[_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, GROUP_M=1)
      for bm in (16, 32, 64)
      for (bn, br, w, s) in ((32, 128, 4, 4), (64, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3),
                             (128, 64, 4, 3), (128, 128, 8, 3))],
    *[_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, GROUP_M=8)
      for (bm, bn, br, w, s) in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                 (128, 64, 64, 4, 4))],
]

_INTERPRET_SHRINK = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=32, GROUP_M=2)
_INTERPRET_EXPAND = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16, GROUP_M=2)


_SMEM_BYTES = 220 * 1024  # the H100/H200 allow 227 KB of shared memory per block


def _stage_bytes(c: triton.Config, elem: int) -> int:
    """Shared memory of one pipeline stage: the shrink's x and A tiles, or the expand's fp32 t and B tiles."""
    k = c.kwargs
    if "BLOCK_K" in k:
        return (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_R"]) * elem
    return k["BLOCK_M"] * k["BLOCK_R"] * 4 + k["BLOCK_R"] * k["BLOCK_N"] * elem


def _fit_smem(configs: list, elem: int) -> list:
    """Each config with as many of its pipeline stages (>= 2) as fit in shared memory; fp32 doubles
    every tile, and on the H200 no decode config of the 64-row bucket fitted as written (all asked
    for 245-390 KB), so a float32 call failed where it should only run with shallower pipelines."""
    out = []
    for c in configs:
        stages = c.num_stages
        while stages > 2 and stages * _stage_bytes(c, elem) > _SMEM_BYTES:
            stages -= 1
        if stages * _stage_bytes(c, elem) <= _SMEM_BYTES:
            out.append(c if stages == c.num_stages else triton.Config(dict(c.kwargs), num_warps=c.num_warps,
                                                                      num_stages=stages))
    return out or [min(configs, key=lambda c: _stage_bytes(c, elem))]


def _prune(rank_arg: str, small_dims: tuple[str, ...]):
    """Keep the configs of the call's regime: for decode buckets the bucket's BLOCK_M and
    GROUP_M 1, for prefill the GROUP_M 8 family; drop tiles much wider than tiny dims; shallower
    pipelines where a tile set would not fit in shared memory (:func:`_fit_smem`)."""

    def prune(configs, named_args, **kwargs):
        bucket = named_args["M_BUCKET"]
        if bucket <= DECODE_MAX_M:
            bm = _decode_block_m(bucket)
            keep = [c for c in configs if c.kwargs["GROUP_M"] == 1 and c.kwargs["BLOCK_M"] == bm]
        else:
            keep = [c for c in configs if c.kwargs["GROUP_M"] == 8]
        for name in small_dims:
            cap = max(16, next_pow2(named_args[rank_arg if name == "BLOCK_R" else "N"]))
            narrowed = [c for c in keep if c.kwargs[name] <= cap]
            keep = narrowed or keep[:1]
        weight = named_args.get("a_ptr", named_args.get("b_ptr"))
        return _fit_smem(keep, weight.element_size() if hasattr(weight, "element_size") else 2)

    return prune


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a linear program id to (tile along a, tile along b), GROUP a-tiles at a time (L2 reuse)."""
    group_size = GROUP * num_b
    first_a = (pid // group_size) * GROUP
    rows = tl.minimum(num_a - first_a, GROUP)
    pid_a = first_a + (pid % group_size) % rows
    pid_b = (pid % group_size) // rows
    return pid_a, pid_b


@triton.jit(do_not_specialize=["M"])
def _shrink_kernel(x_ptr, a_ptr, t_ptr, M, K, R,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_ts, stride_tm,
                   M_BUCKET, SPLIT_K,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """t[s, m, r] = sum over split s's K-range of x[m, k] * A[r, k]   (fp32 partials)."""
    pid_m, pid_r = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(R, BLOCK_R), GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = mma(xt, at, acc, PRECISION)
    tl.store(t_ptr + pid_s * stride_ts + offs_m[:, None] * stride_tm + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _expand_kernel(t_ptr, b_ptr, bias_ptr, y_ptr, M, N, R,
                   stride_ts, stride_tm, stride_bn, stride_br, stride_ym, stride_yn,
                   M_BUCKET, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """y[m, n] = sum_r (sum_s t[s, m, r]) * B[n, r] + bias[n]."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :]
        t_mask = m_mask[:, None] & r_mask[None, :]
        tt = tl.load(t_ptrs, mask=t_mask, other=0.0)
        # unrolled: the SPLIT_K loads are independent (one L2 round trip, not SPLIT_K chained
        # ones) and summed in a fixed order (deterministic)
        for s in tl.static_range(1, SPLIT_K):
            tt += tl.load(t_ptrs + s * stride_ts, mask=t_mask, other=0.0)
        bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = mma(tt.to(bt.dtype), bt, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_shrink = autotune(_SHRINK_CONFIGS, key=["M_BUCKET", "K", "R", "SPLIT_K"],
                   prune=_prune("R", ("BLOCK_R",)))(_shrink_kernel)
_expand = autotune(_EXPAND_CONFIGS, key=["M_BUCKET", "N", "R", "SPLIT_K"],
                   prune=_prune("R", ("BLOCK_N",)))(_expand_kernel)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
def split_k(M: int, R: int, K: int, device: torch.device) -> int:
    """Splits of the K (= in) reduction of the shrink kernel.

    Enough programs to cover the chip twice over while reading A, but each split keeps >= 256 of
    K (so every program streams a useful chunk), and fewer splits as M grows, since the expand
    kernel re-reads ``SPLIT_K * M * r`` fp32 partials per output tile; at most ``MAX_SPLIT_K``.
    Prefill: no split.
    """
    if M > DECODE_MAX_M:
        return 1
    bm = _decode_block_m(m_bucket(M))
    base = cdiv(M, bm) * cdiv(R, 32)
    limit = max(1, min(MAX_SPLIT_K // cdiv(M, 16), K // 256))
    target = 2 * sm_count(device)
    s = 1
    while s * 2 <= limit and base * s < target:
        s *= 2
    return s


def _check_factors(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[int, int, int]:
    """``(in, rank, out)`` of a factorized linear's inputs, or a clear error for mismatched ones."""
    K = x.shape[-1]
    R, K_a = A.shape
    N, R_b = B.shape
    if K_a != K or R_b != R:
        raise ValueError(f"shape mismatch: x[..., {K}], A{tuple(A.shape)}, B{tuple(B.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or A.dtype != x.dtype or B.dtype != x.dtype:
        raise TypeError(f"x, A, B must share one of {SUPPORTED_DTYPES}: {x.dtype}, {A.dtype}, {B.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    return K, R, N


def lowrank_linear_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          bias: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                          splits: int | None = None) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.lowrank_linear` (x ``[..., in]`` -> ``[..., out]``).

    ``splits`` overrides the split-K heuristic (tests use it to cover the split path on shapes
    too small for the heuristic to split).
    """
    K, R, N = _check_factors(x, A, B, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, N) or out.dtype != x.dtype:
        raise ValueError(f"out must be {(*lead, N)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    y = out.view(M, N)
    if M == 0:
        return out
    if R == 0 or K == 0:  # empty reduction: only the bias survives
        y.copy_(bias.to(y.dtype).expand(M, N) if bias is not None else torch.zeros_like(y))
        return out
    splits = split_k(M, R, K, x.device) if splits is None else max(1, int(splits))
    t = workspace((splits, M, R), x.device)
    shrink_(x2, A, t)
    expand_(t, B, bias, y)
    return out


def shrink_(x2: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> None:
    """Stage 1: ``t[s] = x2 @ A.T`` restricted to split s of K; t is fp32 ``[splits, M, r]``."""
    splits, M, R = t.shape
    K = x2.shape[1]
    launch(_shrink,
           lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(R, meta["BLOCK_R"]), splits),
           (x2, A, t, M, K, R, x2.stride(0), x2.stride(1), A.stride(0), A.stride(1),
            t.stride(0), t.stride(1), m_bucket(M), splits),
           dict(PRECISION=dot_precision(x2.dtype)), _INTERPRET_SHRINK)


def expand_(t: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """Stage 2: ``y = (sum_s t[s]) @ B.T + bias`` into y ``[M, N]``."""
    splits, M, R = t.shape
    N = B.shape[0]
    launch(_expand,
           lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),),
           (t, B, bias if bias is not None else y, y, M, N, R, t.stride(0), t.stride(1),
            B.stride(0), B.stride(1), y.stride(0), y.stride(1), m_bucket(M)),
           dict(SPLIT_K=splits, HAS_BIAS=bias is not None, PRECISION=dot_precision(B.dtype)), _INTERPRET_EXPAND)


# ----------------------------------------------------------------------------------------------
# one-launch decode kernel (M <= FUSED_MAX_M): see "Fused decode kernel" in the module docstring
# ----------------------------------------------------------------------------------------------
FUSED_MAX_M = 64
MAX_KS = 8  # K splits of a rank chunk (partials are summed by the chunk's last split)
MAX_NSEG = 8  # rank segments an output tile waits for one at a time
_MIN_RB = 4  # smallest rank chunk of any config: sizes the counter block
# Counter block (int32, all zero between launches): [ticket, expand tiles done, NSEG segment
# counts (chunks of t published), "stuck" count, one arrival count per rank chunk]. The stuck count
# is a safety net, never reset by the kernel: a wait that spins _MAX_SPINS times (~1 s; only a bug
# or a starved GPU) gives up, counts itself there and lets the tile finish with wrong values
# instead of hanging the stream; tests and the benchmark read it with `fused_stuck_count`.
_CNT_TICKET = tl.constexpr(0)
_CNT_DONE = tl.constexpr(1)
_CNT_SEG = tl.constexpr(2)
_STUCK_INDEX = 2 + MAX_NSEG
_CNT_STUCK = tl.constexpr(_STUCK_INDEX)
_CHUNK_BASE = _STUCK_INDEX + 1
_CNT_CHUNK = tl.constexpr(_CHUNK_BASE)
_MAX_SPINS = tl.constexpr(1 << 20)  # ~0.5-1 s of acquire loads


@triton.jit
def _fused_shrink_tile(tile, x_ptr, a_ptr, p_ptr, t_ptr, cnt_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                       stride_t, stride_ps, seg_cols, M_PAD: tl.constexpr, ALIGN_A: tl.constexpr,
                       PRECISION: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                       PUBLISH: tl.constexpr, PDL: tl.constexpr):
    """Shrink tile ``tile``: rank chunk ``tile // KS``, K split ``tile % KS``.

    ``PUBLISH``: count the finished chunk into its rank segment for the fused kernel's expand tiles
    (the split shrink, :func:`shrink_split_triton`, has none). ``PDL``: the split's first tile of A
    is loaded before the grid-dependency wait (``kernels._tl.pdl_wait``), x only after it."""
    chunk = tile // KS
    split = tile % KS
    offs_r = chunk * RB + tl.arange(0, RB)
    r_mask = offs_r < R
    rows_a = tl.multiple_of(offs_r.to(tl.int64) * stride_ar, ALIGN_A)
    k_per_split = tl.cdiv(tl.cdiv(K, KS), BK) * BK
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # whole BK tiles unmasked along K (see skinny_linear: a K mask scalarises the loads); the
    # ragged end of K is one masked step in the split that holds it
    k_main = (K // BK) * BK
    k_stop = tl.minimum(k_hi, k_main)
    tail = (k_main < k_hi) & (k_main >= k_lo)
    offs_b = tl.arange(0, BK)
    # the split's first whole tile, peeled off the loop so that under PDL it streams before the wait.
    # Its K mask is all or nothing, a comparison of two splats, which the compiler sees as constant
    # along K (the loads stay vectorized); a block, not a scalar, for the interpreter (see skinny_linear)
    first = (tl.zeros([BK], dtype=tl.int32) + k_lo) < k_stop
    offs_k = k_lo + offs_b
    if M_PAD == 1:
        a = tl.load(a_ptr + rows_a[:, None] + offs_k[None, :] * stride_ak, mask=r_mask[:, None] & first[None, :],
                    other=0.0)
        pdl_wait(PDL)
        xv = tl.load(x_ptr + offs_k * stride_xk, mask=first, other=0.0)
        acc = tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        for k0 in range(k_lo + BK, k_stop, BK):
            offs_k = k0 + offs_b
            a = tl.load(a_ptr + rows_a[:, None] + offs_k[None, :] * stride_ak, mask=r_mask[:, None], other=0.0)
            xv = tl.load(x_ptr + offs_k * stride_xk)
            acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        if tail:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            a = tl.load(a_ptr + rows_a[:, None] + offs_k[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            xv = tl.load(x_ptr + offs_k * stride_xk, mask=k_mask, other=0.0)
            acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        t_offs = offs_r
        t_mask = r_mask
    else:
        offs_m = tl.arange(0, M_PAD)
        m_mask = offs_m < M
        a = tl.load(a_ptr + rows_a[None, :] + offs_k[:, None] * stride_ak, mask=r_mask[None, :] & first[:, None],
                    other=0.0)
        pdl_wait(PDL)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & first[None, :], other=0.0)
        acc = mma(xv, a, tl.zeros((M_PAD, RB), dtype=tl.float32), PRECISION)
        for k0 in range(k_lo + BK, k_stop, BK):
            offs_k = k0 + offs_b
            a = tl.load(a_ptr + rows_a[None, :] + offs_k[:, None] * stride_ak, mask=r_mask[None, :], other=0.0)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None], other=0.0)
            acc = mma(xv, a, acc, PRECISION)
        if tail:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            a = tl.load(a_ptr + rows_a[None, :] + offs_k[:, None] * stride_ak,
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = mma(xv, a, acc, PRECISION)
        t_offs = offs_m[:, None] * stride_t + offs_r[None, :]
        t_mask = m_mask[:, None] & r_mask[None, :]
    seg = (chunk * RB) // seg_cols
    if KS == 1:
        tl.store(t_ptr + t_offs, acc.to(t_ptr.dtype.element_ty), mask=t_mask)
        if PUBLISH:
            tl.debug_barrier()  # every thread's part of t is stored before the release below
            tl.atomic_add(cnt_ptr + _CNT_SEG + seg, 1, sem="release")
    else:
        tl.store(p_ptr + split * stride_ps + t_offs, acc, mask=t_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + _CNT_CHUNK + chunk, 1, sem="acq_rel")
        if arrived == KS - 1:  # the chunk's last split: reduce in split order (deterministic)
            # written by other programs of this launch: read through L2 (.cg), never a stale L1
            total = tl.load(p_ptr + t_offs, mask=t_mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, KS):
                total += tl.load(p_ptr + s * stride_ps + t_offs, mask=t_mask, other=0.0, cache_modifier=".cg")
            tl.store(t_ptr + t_offs, total.to(t_ptr.dtype.element_ty), mask=t_mask)
            tl.store(cnt_ptr + _CNT_CHUNK + chunk, 0)  # all its splits have arrived: reset
            if PUBLISH:
                tl.debug_barrier()
                tl.atomic_add(cnt_ptr + _CNT_SEG + seg, 1, sem="release")


@triton.jit
def _fused_expand_tile(e, b_ptr, bias_ptr, y_ptr, t_ptr, cnt_ptr, M, N, R, stride_bn, stride_br, stride_ym, stride_t,
                       seg_cols, n_expand, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN_B: tl.constexpr,
                       PRECISION: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Expand tile ``e``: output columns ``e * BN ...`` over the whole rank, segment by segment."""
    offs_n = e * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rows_b = tl.multiple_of(offs_n.to(tl.int64) * stride_bn, ALIGN_B)
    offs_c = tl.arange(0, BR)
    r_main = (R // BR) * BR
    n_seg = tl.cdiv(R, seg_cols)
    offs_m = tl.arange(0, M_PAD)
    m_mask = offs_m < M
    if M_PAD == 1:
        acc = tl.zeros((BN,), dtype=tl.float32)
    else:
        acc = tl.zeros((M_PAD, BN), dtype=tl.float32)
    for sg in range(n_seg):
        lo = sg * seg_cols
        need = tl.cdiv(tl.minimum(lo + seg_cols, R) - lo, RB)  # chunks of t in this segment
        # adding 0 with acquire semantics is lowered to a plain ld.acquire (no read-modify-write)
        ready = tl.atomic_add(cnt_ptr + _CNT_SEG + sg, 0, sem="acquire")
        spins = 0
        while (ready < need) & (spins < _MAX_SPINS):
            ready = tl.atomic_add(cnt_ptr + _CNT_SEG + sg, 0, sem="acquire")
            spins += 1
        if ready < need:
            tl.atomic_add(cnt_ptr + _CNT_STUCK, 1, sem="relaxed")
        # t was written by other programs of this launch: read through L2 (.cg), never a stale L1
        for r0 in range(lo, tl.minimum(lo + seg_cols, r_main), BR):
            offs_r = r0 + offs_c
            if M_PAD == 1:
                b = tl.load(b_ptr + rows_b[:, None] + offs_r[None, :] * stride_br, mask=n_mask[:, None], other=0.0)
                tv = tl.load(t_ptr + offs_r, cache_modifier=".cg")
                acc += tl.sum(b.to(tl.float32) * tv.to(tl.float32)[None, :], axis=1)
            else:
                b = tl.load(b_ptr + rows_b[None, :] + offs_r[:, None] * stride_br, mask=n_mask[None, :], other=0.0)
                tv = tl.load(t_ptr + offs_m[:, None] * stride_t + offs_r[None, :], mask=m_mask[:, None],
                             other=0.0, cache_modifier=".cg")
                acc = mma(tv, b, acc, PRECISION)
    if r_main < R:  # ragged end of the rank (in the last segment: already waited for)
        offs_r = r_main + offs_c
        r_mask = offs_r < R
        if M_PAD == 1:
            b = tl.load(b_ptr + rows_b[:, None] + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            tv = tl.load(t_ptr + offs_r, mask=r_mask, other=0.0, cache_modifier=".cg")
            acc += tl.sum(b.to(tl.float32) * tv.to(tl.float32)[None, :], axis=1)
        else:
            b = tl.load(b_ptr + rows_b[None, :] + offs_r[:, None] * stride_br,
                        mask=n_mask[None, :] & r_mask[:, None], other=0.0)
            tv = tl.load(t_ptr + offs_m[:, None] * stride_t + offs_r[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0, cache_modifier=".cg")
            acc = mma(tv, b, acc, PRECISION)
    if M_PAD == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    # the last expand tile to finish: every program has taken its ticket and passed its waits, and
    # every chunk counter was reset by its chunk's last split, so the block can be zeroed for the
    # next launch (the next kernel on the stream starts after this one has finished)
    done = tl.atomic_add(cnt_ptr + _CNT_DONE, 1, sem="acq_rel")
    if done == n_expand - 1:
        offs_z = tl.arange(0, 16)
        tl.store(cnt_ptr + offs_z, tl.zeros((16,), dtype=tl.int32), mask=offs_z < _CNT_STUCK)


@triton.jit(do_not_specialize=["M"])
def _fused_decode_kernel(x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, p_ptr, t_ptr, cnt_ptr,
                         M, N, K, R, stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
                         stride_ym, stride_t, stride_ps, M_KEY, KS_REQ,
                         M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN_A: tl.constexpr,
                         ALIGN_B: tl.constexpr, PRECISION: tl.constexpr,
                         RB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                         NSEG: tl.constexpr, KS: tl.constexpr):
    """One launch of ``y = (x @ A.T) @ B.T + bias`` for a few tokens.

    Tiles, in ticket order: ``cdiv(R, RB) * KS`` shrink tiles (rank chunk c, K split s:
    ``x @ A[c].T`` over the split, fp32), then ``cdiv(N, BN)`` expand tiles (``BN`` rows of B over
    the whole rank). A chunk's last split sums the KS fp32 partials in split order, rounds the
    chunk of t once to the input dtype, stores it and counts it into its rank segment (release).
    An expand tile waits for each of the (at most NSEG) segments in turn (acquire) and streams its
    B rows over that segment. The last expand tile to finish zeroes the counters for the next launch.
    """
    STEP: tl.constexpr = RB if RB > BR else BR  # noqa: FURB136 (plain Python on constexprs)
    n_shrink = tl.cdiv(R, RB) * KS
    n_expand = tl.cdiv(N, BN)
    seg_cols = tl.cdiv(tl.cdiv(R, NSEG), STEP) * STEP  # a multiple of RB and of BR
    # tickets, not program ids: every shrink ticket is taken before any expand ticket, so a program
    # that waits for t only waits for programs that already run (no co-residency assumption)
    tile = tl.atomic_add(cnt_ptr + _CNT_TICKET, 1, sem="relaxed")
    if tile < n_shrink:
        _fused_shrink_tile(tile, x_ptr, a_ptr, p_ptr, t_ptr, cnt_ptr, M, K, R, stride_xm, stride_xk, stride_ar,
                           stride_ak, stride_t, stride_ps, seg_cols, M_PAD, ALIGN_A, PRECISION, RB, BK, KS, True, False)
    else:
        _fused_expand_tile(tile - n_shrink, b_ptr, bias_ptr, y_ptr, t_ptr, cnt_ptr, M, N, R, stride_bn, stride_br,
                           stride_ym, stride_t, seg_cols, n_expand, M_PAD, HAS_BIAS, ALIGN_B, PRECISION, RB, BN, BR)


def _fcfg(rb, bk, bn, br, nseg, warps, stages):
    return triton.Config({"RB": rb, "BK": bk, "BN": bn, "BR": br, "NSEG": nseg}, num_warps=warps, num_stages=stages)


# M == 1: CUDA-core GEMV tiles (any RB / BN >= 4); the first is the untuned default
_FUSED_GEMV_CONFIGS = [_fcfg(*c) for c in (
    (8, 512, 16, 512, 4, 4, 3), (4, 1024, 8, 1024, 4, 4, 3), (16, 256, 16, 256, 4, 4, 4),
    (8, 512, 16, 512, 1, 4, 3), (8, 1024, 32, 256, 2, 8, 3), (16, 512, 32, 512, 4, 8, 3))]
# 2 <= M <= 64: tensor-core tiles (RB, BN >= 16)
_FUSED_MMA_CONFIGS = [_fcfg(*c) for c in (
    (16, 256, 32, 128, 4, 4, 3), (16, 512, 16, 256, 4, 4, 3), (32, 128, 32, 128, 4, 4, 4),
    (32, 256, 64, 128, 4, 8, 3), (16, 256, 32, 128, 1, 4, 3), (64, 128, 64, 64, 4, 8, 3))]
_GEMV_IDS = {id(c) for c in _FUSED_GEMV_CONFIGS}
assert all(c.kwargs["RB"] >= _MIN_RB and c.kwargs["NSEG"] <= MAX_NSEG
           for c in _FUSED_GEMV_CONFIGS + _FUSED_MMA_CONFIGS)
_FUSED_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles a config may stage (H100/H200: 227 KB)


def _splits_limit(K: int) -> int:
    return max(1, min(MAX_KS, K // 1024))


def fused_splits(R: int, K: int, rb: int, device: torch.device) -> int:
    """K splits of each rank chunk of the fused decode kernel: enough shrink tiles for ~1.5 waves of
    the chip while reading A, each split keeping >= 1024 of K; at most ``MAX_KS``."""
    chunks = cdiv(R, rb)
    limit = _splits_limit(K)
    target = 1.5 * sm_count(device)
    ks = 1
    while ks * 2 <= limit and chunks * ks < target:
        ks *= 2
    return ks


def _prune_decode(configs, named_args, kwargs, gemv_ids, dims, smem_of):
    """What the one-launch kernel and the split shrink prune alike: the family of the call's M (GEMV
    configs ``gemv_ids`` for one token, MMA otherwise), tiles no wider than tiny dims (``dims``: tile
    name -> argument name), the shared-memory budget (``smem_of(config, m_pad, esz)``: pipelined operand
    bytes), and each config's K splits (``fused_splits``; ``KS_REQ`` > 0 forces them)."""
    m_pad = kwargs.get("M_PAD", named_args.get("M_PAD", 1))
    K, R = named_args["K"], named_args["R"]
    x = named_args["x_ptr"]
    keep = [c for c in configs if (id(c) in gemv_ids) == (m_pad == 1)] or list(configs[:1])
    for name, arg in dims:
        cap = max(16, next_pow2(named_args[arg]), min(c.kwargs[name] for c in keep))  # else the narrowest ones
        keep = [c for c in keep if c.kwargs[name] <= cap]
    esz = x.element_size()
    keep = ([c for c in keep if smem_of(c, m_pad, esz) <= _FUSED_SMEM_BUDGET]
            or [min(keep, key=lambda c: smem_of(c, m_pad, esz))])
    ks_req = int(named_args["KS_REQ"])
    return [triton.Config({**c.kwargs, "KS": min(MAX_KS, ks_req) if ks_req > 0 else
                           fused_splits(R, K, c.kwargs["RB"], x.device)}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in keep]


def _fused_smem(c, m_pad, esz):
    """Pipelined operand buffers of the larger of the fused kernel's two loops (what Triton allocates)."""
    kw = c.kwargs
    return c.num_stages * esz * max(m_pad * kw["BK"] + kw["BK"] * kw["RB"], m_pad * kw["BR"] + kw["BR"] * kw["BN"])


def _fused_prune(configs, named_args, **kwargs):
    return _prune_decode(configs, named_args, kwargs, _GEMV_IDS, (("BK", "K"), ("BR", "R"), ("RB", "R"), ("BN", "N")),
                         _fused_smem)


_fused_decode = autotune(_FUSED_GEMV_CONFIGS + _FUSED_MMA_CONFIGS, key=["M_KEY", "N", "K", "R", "KS_REQ"],
                         prune=_fused_prune)(_fused_decode_kernel)
_INTERPRET_FUSED = {"RB": 16, "BK": 32, "BN": 16, "BR": 16, "NSEG": 2}

# Split shrink (``shrink_split_triton``): the fused kernel's shrink tiles as a launch of their own, for the
# two-launch pair ``skinny(shrink_split(x, A), B)`` under PDL. A has only r rows (256-3456 at MoDeGPT
# ranks), so the skinny kernel's one program per 8-64 rows gives 4-128 programs, under one per SM,
# each streaming a long K range: latency-bound (session 10: the "down" shapes, K = 11008-13824, were
# 0.79-0.91x of two cuBLAS calls as a skinny pair). Splitting K gives ~2 waves of programs.
@triton.jit(do_not_specialize=["M"])
def _split_shrink_kernel(x_ptr, a_ptr, p_ptr, t_ptr, cnt_ptr, M, K, R, stride_xm, stride_ar, stride_t, stride_ps,
                         M_KEY, KS_REQ, M_PAD: tl.constexpr, ALIGN_A: tl.constexpr, PRECISION: tl.constexpr,
                         PDL: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr):
    """``t = x @ A.T`` (x ``[M, K]``, A ``[R, K]``, both with unit inner stride): program i is rank
    chunk ``i // KS`` over K split ``i % KS``; a chunk's last split sums the fp32 partials in split
    order and stores the chunk of t rounded to its dtype (see ``_fused_shrink_tile``)."""
    _fused_shrink_tile(tl.program_id(0), x_ptr, a_ptr, p_ptr, t_ptr, cnt_ptr, M, K, R, stride_xm, 1, stride_ar, 1,
                       stride_t, stride_ps, 1, M_PAD, ALIGN_A, PRECISION, RB, BK, KS, False, PDL)


def _scfg(rb, bk, warps, stages):
    return triton.Config({"RB": rb, "BK": bk}, num_warps=warps, num_stages=stages)


# one token: CUDA-core GEMV tiles; 2-64 tokens: tensor-core tiles (RB >= 16). The first of each is the untuned default.
_SPLIT_GEMV_CONFIGS = [_scfg(*c) for c in ((8, 512, 4, 3), (4, 1024, 4, 3), (16, 256, 4, 4), (8, 1024, 8, 3),
                                           (16, 512, 8, 3), (32, 256, 8, 3))]
_SPLIT_MMA_CONFIGS = [_scfg(*c) for c in ((16, 256, 4, 3), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 8, 3),
                                          (64, 128, 8, 3))]
_SPLIT_GEMV_IDS = {id(c) for c in _SPLIT_GEMV_CONFIGS}


def _split_prune(configs, named_args, **kwargs):
    return _prune_decode(configs, named_args, kwargs, _SPLIT_GEMV_IDS, (("BK", "K"), ("RB", "R")),
                         lambda c, m_pad, esz: c.num_stages * esz * c.kwargs["BK"] * (m_pad + c.kwargs["RB"]))


_split_shrink = autotune(_SPLIT_GEMV_CONFIGS + _SPLIT_MMA_CONFIGS, key=["M_KEY", "K", "R", "KS_REQ"],
                         prune=_split_prune)(_split_shrink_kernel)
_INTERPRET_SPLIT = {"RB": 16, "BK": 32}


# The counter blocks, one per factor A (``_counters``). All zero between launches: each launch zeroes what it used
# before it ends. Allocated (and zeroed) once; if that first call happens during CUDA-graph capture
# the zero-fill is captured instead of run, so until a call outside capture zeroes it eagerly,
# every call (captured ones too) zero-fills it first.
_COUNTERS: dict[tuple, torch.Tensor] = {}  # (device type, index, factor A's address) -> counter block
_COUNTERS_UNZEROED: set[tuple] = set()
_COUNTERS_RETIRED: list[torch.Tensor] = []  # outgrown blocks: captured graphs may still point at them


def _device_key(device: torch.device) -> tuple:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return device.type, index


def _counters(device: torch.device, n: int, owner: torch.Tensor) -> torch.Tensor:
    """The counter block of the launches over the factor ``owner`` (A): one per weight, not one per device.
    Two engines in one process each run on their own CUDA stream (``server.engine.async_engine``), and two
    factorized models decoding at once must not count into one block; one weight belongs to one model,
    whose launches are sequential on its stream. Blocks are never freed: captured graphs point at them."""
    key = _device_key(device) + (owner.data_ptr(),)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _COUNTERS_RETIRED.append(buf)
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        if capturing:
            _COUNTERS_UNZEROED.add(key)
        else:
            _COUNTERS_UNZEROED.discard(key)
    elif key in _COUNTERS_UNZEROED:
        buf.zero_()
        if not capturing:
            _COUNTERS_UNZEROED.discard(key)
    return buf


def counter_blocks(device: torch.device | str) -> list[torch.Tensor]:
    """Every counter block of ``device`` (tests check that the kernels left them all zero)."""
    key = _device_key(torch.device(device))
    return [buf for k, buf in _COUNTERS.items() if k[:2] == key]


def fused_stuck_count(device: torch.device | str) -> int:
    """Waits of the fused decode kernel on ``device`` that gave up (0 unless something is broken;
    synchronises with the device)."""
    return sum(int(buf[_STUCK_INDEX]) for buf in counter_blocks(device))


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-call scratch from the caching allocator (graph-safe); NaN-filled under the test hook."""
    if _common.POISON_WORKSPACES:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _align(stride: int, ptr: int) -> int:
    """Largest power of two (<= 8) dividing a row stride and the base offset, in elements."""
    g = math.gcd(8, math.gcd(int(stride), int(ptr)))
    return max(1, g)


def lowrank_decode_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, *, splits: int | None = None) -> torch.Tensor:
    """One-launch ``(x @ A.T) @ B.T + bias`` for decode sizes (at most ``FUSED_MAX_M`` rows).

    x ``[..., in]``, A ``[r, in]``, B ``[out, r]`` in the same layout as :func:`lowrank_linear_triton`
    (no pre-transposed copy: each output tile streams whole contiguous rows of B). Fastest with unit
    inner strides on A and B. ``splits`` forces the K splits of each rank chunk (tests; <= ``MAX_KS``).

    Launches over one factor A share a counter block (:func:`_counters`), so calls with the same A must
    not run concurrently on two streams (sequential calls, graph replays included, are fine).
    """
    K, R, N = _check_factors(x, A, B, bias)
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > FUSED_MAX_M:
        raise ValueError(f"lowrank_decode_triton takes at most {FUSED_MAX_M} rows, got {M}")
    if out is None:
        out = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, N) or out.dtype != x.dtype:
        raise ValueError(f"out must be {(*lead, N)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    y = out.view(M, N)
    if M == 0 or N == 0:
        return out
    if R == 0 or K == 0:  # empty reduction: only the bias survives
        y.copy_(bias.to(y.dtype).expand(M, N) if bias is not None else torch.zeros_like(y))
        return out
    if y.stride(1) != 1:
        raise ValueError("out needs unit stride along its last dim")
    dev = x.device
    mp = m_pad(M)
    r_pad = cdiv(R, 16) * 16  # 16-element rows of t and of the partials: aligned vector loads
    ks_req = 0 if splits is None else max(1, min(MAX_KS, int(splits)))
    t = _scratch((M, r_pad), x.dtype, dev)
    # fp32 partials of the K splits: room for the most splits any config may pick (fused_splits)
    partials = _scratch((ks_req or _splits_limit(K), M, r_pad), torch.float32, dev)
    cnt = _counters(dev, _CHUNK_BASE + cdiv(R, _MIN_RB), A)
    align_a = _align(A.stride(0), A.storage_offset()) if A.stride(1) == 1 else 1
    align_b = _align(B.stride(0), B.storage_offset()) if B.stride(1) == 1 else 1
    interp = dict(_INTERPRET_FUSED)
    interp["KS"] = ks_req or fused_splits(R, K, interp["RB"], dev)
    launch(_fused_decode,
           lambda meta: (cdiv(R, meta["RB"]) * meta["KS"] + cdiv(N, meta["BN"]),),
           (x2, A, B, bias if bias is not None else y, y, partials, t, cnt, M, N, K, R,
            x2.stride(0), x2.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), y.stride(0),
            r_pad, M * r_pad, mp, ks_req),
           {"M_PAD": mp, "HAS_BIAS": bias is not None, "ALIGN_A": align_a, "ALIGN_B": align_b,
            "PRECISION": dot_precision(x.dtype)}, interp)
    return out


def shrink_split_triton(x: torch.Tensor, A: torch.Tensor, out: torch.Tensor | None = None, *,
                        splits: int | None = None) -> torch.Tensor:
    """``x @ A.T`` for a few tokens (at most ``FUSED_MAX_M`` rows) with A ``[r, in]`` of few rows and a
    long ``in``: the first stage of a factorized linear, split over K (``_split_shrink_kernel``).
    Fp32 accumulation, one rounding to x's dtype, deterministic (partials summed in split order).
    ``splits`` forces the K splits (tests; at most ``MAX_KS``). Launches over one A share a counter
    block with :func:`lowrank_decode_triton` (:func:`_counters`): not concurrently on two streams."""
    K = x.shape[-1]
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"shape mismatch: x[..., {K}] and A {tuple(A.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or A.dtype != x.dtype:
        raise TypeError(f"x and A must share one of {SUPPORTED_DTYPES}: {x.dtype}, {A.dtype}")
    if A.stride(1) != 1:
        raise ValueError("A needs unit stride along its last dim")
    R = A.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > FUSED_MAX_M:
        raise ValueError(f"shrink_split_triton takes at most {FUSED_MAX_M} rows, got {M}")
    if out is None:
        out = torch.empty((*lead, R), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, R) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(*lead, R)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    t = out.view(M, R)
    if M == 0 or R == 0:
        return out
    if K == 0:
        t.zero_()
        return out
    dev = x.device
    ks_req = 0 if splits is None else max(1, min(MAX_KS, int(splits)))
    partials = _scratch((ks_req or _splits_limit(K), M, R), torch.float32, dev)
    cnt = _counters(dev, _CHUNK_BASE + cdiv(R, _MIN_RB), A)
    mp = m_pad(M)
    interp = dict(_INTERPRET_SPLIT)
    interp["KS"] = ks_req or fused_splits(R, K, interp["RB"], dev)
    launch(_split_shrink, lambda meta: (cdiv(R, meta["RB"]) * meta["KS"],),
           (x2, A, partials, t, cnt, M, K, R, x2.stride(0), A.stride(0), R, M * R, mp, ks_req),
           {"M_PAD": mp, "ALIGN_A": _align(A.stride(0), A.storage_offset()), "PRECISION": dot_precision(x.dtype),
            **_common.pdl_meta(dev)}, interp)
    return out
