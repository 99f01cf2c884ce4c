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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, cdiv, dot_precision, next_pow2, sm_count, workspace
from ._tl import mma
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


def _prune(rank_arg: str, small_dims: tuple[str, ...]):
    """Keep the configs of the call's regime: for decode buckets the bucket's BLOCK_M and
    GROUP_M 1, for prefill the GROUP_M 8 family; drop tiles much wider than tiny dims."""

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
        return keep

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


def lowrank_linear_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          bias: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                          splits: int | None = None) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.lowrank_linear` (x ``[..., in]`` -> ``[..., out]``).

    ``splits`` overrides the split-K heuristic (tests use it to cover the split path on shapes
    too small for the heuristic to split).
    """
    K = x.shape[-1]
    R, K_a = A.shape
    N, R_b = B.shape
    if K_a != K or R_b != R:
        raise ValueError(f"shape mismatch: x[..., {K}], A{tuple(A.shape)}, B{tuple(B.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or A.dtype != x.dtype or B.dtype != x.dtype:
        raise TypeError(f"x, A, B must share one of {SUPPORTED_DTYPES}: {x.dtype}, {A.dtype}, {B.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
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
