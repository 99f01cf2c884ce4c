"""Triton skinny linear: ``y = x @ W.T + bias`` for the few tokens of a decode step (M <= 64).

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
  used); the products accumulate in an fp32 tile and are reduced over K once, after the loop
  (``VEC_ACC``: per tile, that reduction crosses warps, through shared memory and a barrier, wherever the
  tile's K spans them; 1-2 % of a batch-1 step on the H200, session 12). ``2 <= M <= 64``: ``tl.dot`` with the token rows padded to 16,
  32 or 64 (``m_pad``).
* Rows of W start ``K`` elements apart. Triton only proves 16-element alignment of integer
  arguments, so a width like 9880 (a multiple of 8, not 16) would make it issue 2-byte loads
  (0.42 TB/s, measured for the attention kernel's odd head dims): the launcher passes the largest
  power-of-two divisor (<= 8) of the row stride as ``ALIGN`` and the kernel asserts it with
  ``tl.multiple_of``, which keeps 16-byte vector loads.
* fp32 accumulation, one rounding to the output dtype, bias added in fp32 (as cuBLAS does; results
  match it up to summation order).
* Programmatic dependent launch (``kernels._common.pdl_enabled``, SM90+): the first weight tile and
  the bias load before the grid-dependency wait, so they stream while the previous kernel finishes.
* Variants fold the work around a matmul into it: ``GATED`` (SwiGLU of the input while loading it),
  ``SWIGLU_OUT`` (SwiGLU of a fused gate/up output as the epilogue) and ``NORM`` (residual add +
  RMSNorm of the input, its per-row ``1/rms`` applied after the dot; opt-in, ``MODEGPT_FUSED_NORM``,
  because it measured slower on the H200) and ``ROPE_OUT`` (a fused q/k/v projection with the rotary
  embedding at the kept frequencies and the KV-cache write as the epilogue, :func:`skinny_linear_rope_triton`).

Autotuning is keyed on (M bucket, N and K rounded up to 256) so the per-layer widths of a
compressed model share a handful of tunings. The configs of a key are timed as a decode step runs
them (:func:`tune_config`: repeated in a CUDA graph on rotating copies of the weight, each launch behind
a small PDL kernel), and the pick is stored with the engine's other picks (``kernels.pick_store``), so a
restart does not tune again.
``kernels.dispatch.linear`` uses it on CUDA for M <= ``MODEGPT_SKINNY_MAX_TOKENS`` (default 64) and
cuBLAS above, and in ``auto`` mode only for the shapes where it measured faster than cuBLAS
(:func:`beats_cublas`); ``MODEGPT_KERNELS=torch`` turns it off with the other kernels.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import pick_store
from ._common import (SUPPORTED_DTYPES, cdiv, dot_precision, interpret_mode, l2_prefetch_bytes, launch_mode, m_pad,
                      pdl_meta, prefetch_lines, vec_acc_enabled)
from ._tl import mma as _mma
from ._tl import l2_prefetch, pdl_wait
from .autotune import autotune, autotuning_enabled, launch, precompile, pruned_configs, tuning_key
from .graph_timing import FLUSH_BYTES, graph_us, predecessor, step_predecessor, stream_copies, stream_us
from .reference import _flat_cache
from .rope import rope_cos_sin

MAX_M = 64  # rows; dispatch routes at most MODEGPT_SKINNY_MAX_TOKENS (default 64) here


def _cfg(bn, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_CONFIGS = [_cfg(*c) for c in (
    (8, 1024, 4, 3), (16, 512, 4, 4), (16, 1024, 8, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3),
    (64, 128, 4, 4), (4, 1024, 4, 4))]  # 4 rows: M = 1 only (the dot path prunes BLOCK_N < 16); twice the
# programs of 8 rows, so a compressed model's narrower GEMVs (960-1344 programs of 8 rows) end in a shorter last wave
# shallower tiles that only 32-64 token rows take (their token tiles fill the shared memory first)
_WIDE_CONFIGS = [_cfg(*c) for c in ((16, 256, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4))]
_WIDE_IDS = {id(c) for c in _WIDE_CONFIGS}
_INTERPRET = {"BLOCK_N": 16, "BLOCK_K": 32}


_SMEM_BUDGET = 220 * 1024  # bytes of pipelined tiles (H100/H200: 227 KB per block)


def _prune(configs, named_args, **kwargs):
    """The dot path needs BLOCK_N >= 16 (MMA tile); from 32 tokens up, the configs (with the
    shallower ``_WIDE_CONFIGS``) whose pipelined token and weight tiles fit in shared memory (at 1-16
    tokens every config fits or Triton rejects it, as before). Triton passes the launch's constexpr
    keywords (``M_PAD`` ...) in ``kwargs`` and the positional arguments in ``named_args``."""
    def flag(name):
        return kwargs.get(name, named_args.get(name, False))

    m = flag("M_PAD") or 1
    if m <= 16:
        keep = [c for c in configs if id(c) not in _WIDE_IDS]
        return keep if m == 1 else [c for c in keep if c.kwargs["BLOCK_N"] >= 16]
    x = named_args.get("x_ptr")
    esz = x.element_size() if hasattr(x, "element_size") else 2
    x_tiles = 2 if flag("GATED") or (flag("NORM") and flag("HAS_DELTA")) else 1  # gate + up, or x + delta
    w_tiles = 2 if flag("SWIGLU_OUT") or flag("ROPE_OUT") else 1  # two row sets per program

    def smem(c):
        return c.num_stages * c.kwargs["BLOCK_K"] * (x_tiles * m + w_tiles * c.kwargs["BLOCK_N"]) * esz

    keep = [c for c in configs if c.kwargs["BLOCK_N"] >= 16]
    return [c for c in keep if smem(c) <= _SMEM_BUDGET] or [min(keep, key=smem)]


@triton.jit
def _swiglu(g, u):
    """``silu(g) * u`` rounded like ``kernels.fused_norm``'s ``silu_mul``: the activation, then the
    product, each to the dtype of ``g``."""
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _ld(ptrs, mask, MASKED: tl.constexpr):
    """``tl.load`` with ``mask`` (masked lanes read 0) or, ``MASKED=False``, no mask at all."""
    if MASKED:
        v = tl.load(ptrs, mask=mask, other=0.0)
    else:
        v = tl.load(ptrs)
    return v


@triton.jit
def _load_x(ptrs, mask, UP_OFF, GATED: tl.constexpr, MASKED: tl.constexpr):
    """The activation tile: ``x`` itself, or for ``GATED`` the SwiGLU of a fused gate/up row
    (``silu(gate) * up`` with up ``UP_OFF`` elements after gate), rounded exactly like
    ``kernels.fused_norm``'s ``silu_mul``, so the fused matmul sees the same bits as the two-launch
    chain. ``MASKED=False``: no mask at all (the whole-tile main loop), masked lanes read as 0 otherwise."""
    x = _ld(ptrs, mask, MASKED)
    if GATED:
        x = _swiglu(x, _ld(ptrs + UP_OFF, mask, MASKED))
    return x


@triton.jit
def _act(x_ptrs, d_ptrs, nw_ptrs, s_ptrs, mask, k_mask, UP_OFF, write_s, GATED: tl.constexpr, NORM: tl.constexpr,
         HAS_DELTA: tl.constexpr, MASKED: tl.constexpr):
    """``(a, sq)``: the activation tile the dot consumes, in fp32, and for ``NORM`` its squares.

    Plain / ``GATED``: ``a = _load_x(...)`` (``sq`` is ``a``, unused). ``NORM`` (add + RMSNorm folded
    into this matmul): the residual add ``s = round(x + d)`` (``x`` alone without ``HAS_DELTA``), stored
    through ``s_ptrs`` where ``write_s`` (one program per K chunk, so the grid writes the new residual
    stream exactly once), ``a = s * norm_weight`` and ``sq = s * s``: the row's ``1/rms`` is a per-row
    scale, applied to the dot product once the squares of the whole row have been summed."""
    if NORM:
        x = _ld(x_ptrs, mask, MASKED)
        if HAS_DELTA:
            d = _ld(d_ptrs, mask, MASKED)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            if write_s:
                if MASKED:
                    tl.store(s_ptrs, x, mask=mask)
                else:
                    tl.store(s_ptrs, x)
        w = tl.load(nw_ptrs, mask=k_mask, other=0.0)
        sf = x.to(tl.float32)
        return sf * w.to(tl.float32), sf * sf
    else:
        a = _load_x(x_ptrs, mask, UP_OFF, GATED, MASKED).to(tl.float32)
        return a, a


@triton.jit
def _rope_epilogue(y1, y2, j, st1, st2, f_ok, is_qk, pos, slot, q_row, q_ptr, freq_ptr, kc_ptr, vc_ptr, n_q, group,
                   half, dv, vh, stride_f, stride_kcs, stride_kch, stride_vcs, stride_vch):
    """``ROPE_OUT``'s epilogue: rotate and store one program's two row sets ``y1``/``y2`` (already
    rounded to the output dtype, exactly what ``linear`` hands ``rope_qkv_``).

    q/k programs (``is_qk``): ``j`` are pair indices, head ``j // half``, pair ``i = j % half``
    (rows ``head*d + i`` and ``+ half``); heads ``< n_q`` are query heads, stored to ``q_ptr`` at
    ``q_row + head*d + i`` (and ``+ half``), the others key heads ``head - n_q``, stored to the key
    cache at the token's slot. Value programs: ``j`` indexes the value row (``Hkv * dv`` wide) for
    ``y1`` and ``j + vh`` for ``y2``, copied unrotated to the value cache at the slot. Slots < 0 write
    no cache. ``st1``/``st2``: the store masks (token and row valid), ``f_ok`` the row mask of ``j``.
    Shapes broadcast: per-token values (``pos``, ``slot``, ``q_row``) are scalars or ``[M_PAD, 1]``,
    per-row values ``[BLOCK_N]`` or ``[1, BLOCK_N]``. The math is ``kernels.rope``'s, op for op."""
    head = j // half
    i = j - head * half
    is_q = head < n_q
    kvh = tl.where(is_q, head // group, head - n_q)
    f = tl.load(freq_ptr + kvh * stride_f + i, mask=f_ok & is_qk, other=0.0)
    c, s = rope_cos_sin(pos, f)
    x1 = y1.to(tl.float32)
    x2 = y2.to(tl.float32)
    dt = q_ptr.dtype.element_ty
    o1 = tl.where(is_qk, (x1 * c - x2 * s).to(dt), y1)
    o2 = tl.where(is_qk, (x2 * c + x1 * s).to(dt), y2)
    qk1 = st1 & is_qk
    q_ptrs = q_ptr + q_row + head * (2 * half) + i
    tl.store(q_ptrs, o1, mask=qk1 & is_q)
    tl.store(q_ptrs + half, o2, mask=qk1 & is_q)
    live = slot >= 0
    k_ptrs = kc_ptr + slot * stride_kcs + (head - n_q) * stride_kch + i
    tl.store(k_ptrs, o1, mask=qk1 & live & (head >= n_q))
    tl.store(k_ptrs + half, o2, mask=qk1 & live & (head >= n_q))
    is_v = is_qk == 0
    j2 = j + vh
    tl.store(vc_ptr + slot * stride_vcs + (j // dv) * stride_vch + j % dv, o1, mask=st1 & live & is_v)
    tl.store(vc_ptr + slot * stride_vcs + (j2 // dv) * stride_vch + j2 % dv, o2, mask=st2 & live & is_v)


@triton.jit
def _prefetch_rows(w_ptr, rows, n_mask, k_lo, k_hi, PF_LINES: tl.constexpr):
    """L2 prefetch of ``PF_LINES`` 128-byte lines from element ``k_lo`` of each weight row at offsets
    ``rows`` (the leading part of every row: what the loop after the wait reads first), clipped to
    ``k_hi``; lanes outside the rows or K ask for the first line instead."""
    offs = k_lo + tl.arange(0, PF_LINES) * (1024 // w_ptr.dtype.element_ty.primitive_bitwidth)
    ok = n_mask[:, None] & (offs < k_hi)[None, :]
    l2_prefetch(w_ptr + tl.where(ok, rows[:, None] + offs[None, :], 0))


@triton.jit
def _acc_first(p, AXIS: tl.constexpr, VEC_ACC: tl.constexpr):
    """The one-token path's first partial: ``p`` itself (``VEC_ACC``: summed over ``AXIS`` once, after
    the loop, by :func:`_acc_final`) or its sum over ``AXIS`` now."""
    if VEC_ACC:
        r = p
    else:
        r = tl.sum(p, axis=AXIS)
    return r


@triton.jit
def _acc_add(acc, p, AXIS: tl.constexpr, VEC_ACC: tl.constexpr):
    """``acc`` plus a K tile's products ``p``: elementwise (``VEC_ACC``; no cross-warp reduction, so no
    barrier, inside the loop) or reduced over ``AXIS`` first."""
    if VEC_ACC:
        r = acc + p
    else:
        r = acc + tl.sum(p, axis=AXIS)
    return r


@triton.jit
def _acc_final(acc, AXIS: tl.constexpr, VEC_ACC: tl.constexpr):
    """The loop's result: ``acc`` summed over ``AXIS`` (``VEC_ACC``) or ``acc`` itself."""
    if VEC_ACC:
        r = tl.sum(acc, axis=AXIS)
    else:
        r = acc
    return r


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, d_ptr, nw_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   stride_dm, stride_sm, eps, N_KEY, K_KEY, UP_OFF,
                   pos_ptr, freq_ptr, slot_ptr, kc_ptr, vc_ptr, ROPE_H, ROPE_GROUP, ROPE_HALF, ROPE_DV, stride_f,
                   stride_kcs, stride_kch, stride_vcs, stride_vch,
                   M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr,
                   GATED: tl.constexpr, X_ALIGN: tl.constexpr, SWIGLU_OUT: tl.constexpr, NORM: tl.constexpr,
                   HAS_DELTA: tl.constexpr, ROPE_OUT: tl.constexpr, PDL: tl.constexpr, PF_LINES: tl.constexpr,
                   W_EVICT: tl.constexpr, VEC_ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y = x @ W.T + b`` for ``N`` output rows.

    ``SWIGLU_OUT``: W holds gate rows ``[0, N)`` and up rows ``[N, 2N)`` (a fused gate/up weight) and
    ``y = silu(gate) * up``, each program computing the same rows of both halves, so the SwiGLU is an
    epilogue (no ``[M, 2N]`` round trip, no extra launch). ``NORM``: ``x`` is the residual stream and
    ``d`` (``HAS_DELTA``) the delta to add; the matmul runs on ``rms_norm(x + d) * norm_weight``
    (see ``_act``) and ``x + d`` is written to ``s``.

    ``ROPE_OUT``: W is a fused q/k/v weight (``ROPE_H`` query heads, then ``ROPE_H / ROPE_GROUP`` key
    heads of ``d = 2 * ROPE_HALF`` rows, then the value rows up to ``N``) and each program owns
    ``BLOCK_N`` rotary PAIRS: the first ``cdiv(qk_pairs, BLOCK_N)`` programs pair ``j`` (rows
    ``head*d + i`` and ``+ ROPE_HALF``), the rest the value rows as pairs ``(vstart + j, vstart + vh + j)``
    with ``vh = ceil(NV / 2)``; the epilogue (``_rope_epilogue``) rotates and writes q and the caches.

    ``PF_LINES`` (PDL only, ``kernels._common.l2_prefetch_bytes``): before the wait, each program also
    asks the L2 for the next ``PF_LINES`` 128-byte lines of each of its rows (``_prefetch_rows``);
    ``W_EVICT`` is the weight loads' L2 eviction policy ("evict_first" with the prefetch, so a streamed
    weight does not evict prefetched lines).

    Tile configs are timed as a decode step runs them (:func:`tune_config`: in a CUDA graph, each launch
    behind a small PDL kernel), not alone after an L2 flush, which ranked them differently (session 11)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROPE_OUT:
        qk_pairs = (ROPE_H + ROPE_H // ROPE_GROUP) * ROPE_HALF
        qk_progs = tl.cdiv(qk_pairs, BLOCK_N)
        # per row (a block, not the scalar `pid < qk_progs`: the interpreter gives a scalar comparison the
        # type of its operands, and broadcasting it to a block then turns the mask into integers)
        is_qk = offs_n < qk_progs * BLOCK_N
        vstart = 2 * qk_pairs
        vh = (N - vstart + 1) // 2
        offs_j = offs_n - tl.where(is_qk, 0, qk_progs * BLOCK_N)  # pair index within the q/k or the v rows
        c1 = offs_j + (offs_j // ROPE_HALF) * ROPE_HALF  # head * d + i
        n_first = tl.where(is_qk, c1, vstart + offs_j)
        n_second = tl.where(is_qk, c1 + ROPE_HALF, vstart + vh + offs_j)
        n_mask = offs_j < tl.where(is_qk, qk_pairs, vh)
        n_mask_u = n_mask & (n_second < N)
    else:
        n_first = offs_n
        n_second = offs_n + N  # SWIGLU_OUT: the up half's rows
        n_mask = offs_n < N
        n_mask_u = n_mask
    rows = tl.multiple_of(n_first.to(tl.int64) * stride_wn, ALIGN)
    rows_u = tl.multiple_of(n_second.to(tl.int64) * stride_wn, ALIGN)
    # whole BLOCK_K tiles first, without a K mask: a mask `k < K` with K not provably a multiple of
    # 16 (7288, 9880) has per-element constancy and turns every load scalar (measured 1.1-2.2 TB/s
    # on the H200 against 3.6 for K = 11008); the ragged tail is one masked step after the loop
    k_main = (K // BLOCK_K) * BLOCK_K
    tail_writer = (k_main // BLOCK_K) % nprog == pid
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
        bias = tl.load(b_ptr + n_first, mask=n_mask, other=0.0).to(tl.float32)
        if SWIGLU_OUT:
            bias_u = tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ROPE_OUT:
            bias_u = tl.load(b_ptr + n_second, mask=n_mask_u, other=0.0).to(tl.float32)
    if M_PAD == 1:
        w0 = tl.load(w_ptr + rows[:, None] + offs_b[None, :], mask=n_mask[:, None] & first[None, :], other=0.0,
                     eviction_policy=W_EVICT)
        if SWIGLU_OUT or ROPE_OUT:
            w0u = tl.load(w_ptr + rows_u[:, None] + offs_b[None, :], mask=n_mask_u[:, None] & first[None, :],
                          other=0.0, eviction_policy=W_EVICT)
        if PF_LINES > 0:
            _prefetch_rows(w_ptr, rows, n_mask, BLOCK_K, K, PF_LINES)
            if SWIGLU_OUT or ROPE_OUT:
                _prefetch_rows(w_ptr, rows_u, n_mask_u, BLOCK_K, K, PF_LINES)
        pdl_wait(PDL)
        a, sq = _act(x_ptr + offs_b, d_ptr + offs_b, nw_ptr + offs_b, s_ptr + offs_b, first, first, up_off, pid == 0,
                     GATED, NORM, HAS_DELTA, True)
        ssq = _acc_first(sq, 0, VEC_ACC)
        acc = _acc_first(w0.to(tl.float32) * a[None, :], 1, VEC_ACC)
        if SWIGLU_OUT or ROPE_OUT:
            acc_u = _acc_first(w0u.to(tl.float32) * a[None, :], 1, VEC_ACC)
        for k0 in range(BLOCK_K, k_main, BLOCK_K):
            offs_k = k0 + offs_b
            a, sq = _act(x_ptr + offs_k, d_ptr + offs_k, nw_ptr + offs_k, s_ptr + offs_k, offs_k < K, offs_k < K, up_off,
                         (k0 // BLOCK_K) % nprog == pid, GATED, NORM, HAS_DELTA, False)
            if NORM:
                ssq = _acc_add(ssq, sq, 0, VEC_ACC)
            w = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                        eviction_policy=W_EVICT)
            acc = _acc_add(acc, w.to(tl.float32) * a[None, :], 1, VEC_ACC)
            if SWIGLU_OUT or ROPE_OUT:
                wu = tl.load(w_ptr + rows_u[:, None] + offs_k[None, :], mask=n_mask_u[:, None], other=0.0,
                             eviction_policy=W_EVICT)
                acc_u = _acc_add(acc_u, wu.to(tl.float32) * a[None, :], 1, VEC_ACC)
        if k_main < K:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            a, sq = _act(x_ptr + offs_k, d_ptr + offs_k, nw_ptr + offs_k, s_ptr + offs_k, k_mask, k_mask, up_off,
                         tail_writer, GATED, NORM, HAS_DELTA, True)
            if NORM:
                ssq = _acc_add(ssq, sq, 0, VEC_ACC)
            w = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy=W_EVICT)
            acc = _acc_add(acc, w.to(tl.float32) * a[None, :], 1, VEC_ACC)
            if SWIGLU_OUT or ROPE_OUT:
                wu = tl.load(w_ptr + rows_u[:, None] + offs_k[None, :], mask=n_mask_u[:, None] & k_mask[None, :],
                             other=0.0, eviction_policy=W_EVICT)
                acc_u = _acc_add(acc_u, wu.to(tl.float32) * a[None, :], 1, VEC_ACC)
        acc = _acc_final(acc, 1, VEC_ACC)
        if SWIGLU_OUT or ROPE_OUT:
            acc_u = _acc_final(acc_u, 1, VEC_ACC)
        ssq = _acc_final(ssq, 0, VEC_ACC)
        if NORM:
            rstd = tl.math.rsqrt(ssq / K + eps)
            acc = acc * rstd
            if SWIGLU_OUT:
                acc_u = acc_u * rstd
        if HAS_BIAS:
            acc += bias
            if SWIGLU_OUT or ROPE_OUT:
                acc_u += bias_u
        y = acc.to(y_ptr.dtype.element_ty)
        if ROPE_OUT:
            pos = tl.load(pos_ptr).to(tl.float32)
            slot = tl.zeros([BLOCK_N], dtype=tl.int64) + tl.load(slot_ptr).to(tl.int64)  # a block: see is_qk
            _rope_epilogue(y, acc_u.to(y_ptr.dtype.element_ty), offs_j, n_mask, n_mask_u, n_mask, is_qk, pos, slot,
                           0, y_ptr, freq_ptr, kc_ptr, vc_ptr, ROPE_H, ROPE_GROUP, ROPE_HALF, ROPE_DV, vh, stride_f,
                           stride_kcs, stride_kch, stride_vcs, stride_vch)
        else:
            if SWIGLU_OUT:
                y = _swiglu(y, acc_u.to(y_ptr.dtype.element_ty))
            tl.store(y_ptr + offs_n, y, mask=n_mask)
    else:
        dt = w_ptr.dtype.element_ty
        offs_m = tl.arange(0, M_PAD)
        m_mask = offs_m < M
        xm = offs_m[:, None] * stride_xm
        dm = offs_m[:, None] * stride_dm
        sm = offs_m[:, None] * stride_sm
        w0 = tl.load(w_ptr + rows[None, :] + offs_b[:, None], mask=n_mask[None, :] & first[:, None], other=0.0,
                     eviction_policy=W_EVICT)
        if SWIGLU_OUT or ROPE_OUT:
            w0u = tl.load(w_ptr + rows_u[None, :] + offs_b[:, None], mask=n_mask_u[None, :] & first[:, None],
                          other=0.0, eviction_policy=W_EVICT)
        if PF_LINES > 0:
            _prefetch_rows(w_ptr, rows, n_mask, BLOCK_K, K, PF_LINES)
            if SWIGLU_OUT or ROPE_OUT:
                _prefetch_rows(w_ptr, rows_u, n_mask_u, BLOCK_K, K, PF_LINES)
        pdl_wait(PDL)
        a, sq = _act(x_ptr + xm + offs_b[None, :], d_ptr + dm + offs_b[None, :], nw_ptr + offs_b[None, :],
                     s_ptr + sm + offs_b[None, :], m_mask[:, None] & first[None, :], first[None, :], up_off, pid == 0,
                     GATED, NORM, HAS_DELTA, True)
        ssq2 = _acc_first(sq, 1, NORM)  # NORM: squares summed over K once, after the loop
        acc2 = _mma(a.to(dt), w0, tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32), PRECISION)
        if SWIGLU_OUT or ROPE_OUT:
            acc2_u = _mma(a.to(dt), w0u, tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32), PRECISION)
        for k0 in range(BLOCK_K, k_main, BLOCK_K):
            offs_k = k0 + offs_b
            a, sq = _act(x_ptr + xm + offs_k[None, :], d_ptr + dm + offs_k[None, :], nw_ptr + offs_k[None, :],
                         s_ptr + sm + offs_k[None, :], m_mask[:, None], (offs_k < K)[None, :], up_off,
                         (k0 // BLOCK_K) % nprog == pid, GATED, NORM, HAS_DELTA, True)
            if NORM:
                ssq2 = _acc_add(ssq2, sq, 1, NORM)
            w = tl.load(w_ptr + rows[None, :] + offs_k[:, None], mask=n_mask[None, :], other=0.0,
                        eviction_policy=W_EVICT)
            acc2 = _mma(a.to(dt), w, acc2, PRECISION)
            if SWIGLU_OUT or ROPE_OUT:
                wu = tl.load(w_ptr + rows_u[None, :] + offs_k[:, None], mask=n_mask_u[None, :], other=0.0,
                             eviction_policy=W_EVICT)
                acc2_u = _mma(a.to(dt), wu, acc2_u, PRECISION)
        if k_main < K:
            offs_k = k_main + offs_b
            k_mask = offs_k < K
            a, sq = _act(x_ptr + xm + offs_k[None, :], d_ptr + dm + offs_k[None, :], nw_ptr + offs_k[None, :],
                         s_ptr + sm + offs_k[None, :], m_mask[:, None] & k_mask[None, :], k_mask[None, :], up_off,
                         tail_writer, GATED, NORM, HAS_DELTA, True)
            if NORM:
                ssq2 = _acc_add(ssq2, sq, 1, NORM)
            w = tl.load(w_ptr + rows[None, :] + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0,
                        eviction_policy=W_EVICT)
            acc2 = _mma(a.to(dt), w, acc2, PRECISION)
            if SWIGLU_OUT or ROPE_OUT:
                wu = tl.load(w_ptr + rows_u[None, :] + offs_k[:, None], mask=n_mask_u[None, :] & k_mask[:, None],
                             other=0.0, eviction_policy=W_EVICT)
                acc2_u = _mma(a.to(dt), wu, acc2_u, PRECISION)
        if NORM:
            ssq2 = _acc_final(ssq2, 1, NORM)
            rstd2 = tl.math.rsqrt(ssq2 / K + eps)[:, None]
            acc2 = acc2 * rstd2
            if SWIGLU_OUT:
                acc2_u = acc2_u * rstd2
        if HAS_BIAS:
            acc2 += bias[None, :]
            if SWIGLU_OUT or ROPE_OUT:
                acc2_u += bias_u[None, :]
        y2 = acc2.to(y_ptr.dtype.element_ty)
        if ROPE_OUT:
            pos2 = tl.load(pos_ptr + offs_m, mask=m_mask, other=0).to(tl.float32)
            slot2 = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
            _rope_epilogue(y2, acc2_u.to(y_ptr.dtype.element_ty), offs_j[None, :], m_mask[:, None] & n_mask[None, :],
                           m_mask[:, None] & n_mask_u[None, :], n_mask[None, :], is_qk[None, :], pos2[:, None],
                           slot2[:, None], offs_m[:, None] * stride_ym, y_ptr, freq_ptr, kc_ptr, vc_ptr, ROPE_H,
                           ROPE_GROUP, ROPE_HALF, ROPE_DV, vh, stride_f, stride_kcs, stride_kch, stride_vcs,
                           stride_vch)
        else:
            if SWIGLU_OUT:
                y2 = _swiglu(y2, acc2_u.to(y_ptr.dtype.element_ty))
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y2,
                     mask=m_mask[:, None] & n_mask[None, :])


_skinny = autotune(_CONFIGS + _WIDE_CONFIGS,
                   key=["N_KEY", "K_KEY", "M_PAD", "GATED", "SWIGLU_OUT", "NORM", "ROPE_OUT", "PF_LINES", "VEC_ACC"],
                   prune=_prune)(_skinny_kernel)


def _align(*ints: int) -> int:
    g = 8
    for v in ints:
        g = math.gcd(g, int(v))
    return max(1, g)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool,
           swiglu_out: bool) -> tuple[int, int, int]:
    """(N, K, K of x) for a launch, or a clear error."""
    if gated and swiglu_out:
        raise ValueError("gated (SwiGLU on the input) and swiglu_out (on the output) exclude each other")
    rows_w, K = weight.shape
    if swiglu_out and rows_w % 2:
        raise ValueError(f"swiglu_out needs a fused gate/up weight with an even row count, got {rows_w}")
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
    return (rows_w // 2 if swiglu_out else rows_w), K, K_x


def _rows2(t: torch.Tensor, cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, cols)
    if t2.shape[0] > MAX_M:
        raise ValueError(f"skinny_linear takes at most {MAX_M} rows, got {t2.shape[0]}")
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _launch(x2, weight, bias, y, *, gated=False, swiglu_out=False, norm=None, rope=None) -> None:
    """One skinny launch; ``norm``: ``(d2 or None, norm_weight, s2, eps)`` for the NORM prologue;
    ``rope``: ``(positions, inv_freq, slot_mapping, k_cache, v_cache, num_heads)`` for the ROPE_OUT
    epilogue (flat ``[num_slots, Hkv, d]`` caches; ``y`` is then the query output)."""
    M = x2.shape[0]
    N, K = y.shape[1], weight.shape[1]
    if M == 0:
        return
    pf = prefetch_lines(l2_prefetch_bytes(x2.device), weight.shape[0], K * weight.element_size())
    d2, nw, s2, eps = norm if norm is not None else (None, weight, x2, 0.0)
    d2_ = d2 if d2 is not None else x2
    x_align = _align(K, x2.stride(0), x2.data_ptr() // x2.element_size()) if gated else 1
    if rope is not None:
        pos, inv_freq, slots, kc, vc, heads = rope
        N = weight.shape[0]
        hkv, half = inv_freq.shape
        qk_pairs = (heads + hkv) * half
        vh = cdiv(N - 2 * qk_pairs, 2)

        def grid(meta):
            return (cdiv(qk_pairs, meta["BLOCK_N"]) + cdiv(vh, meta["BLOCK_N"]),)

        rope_args = (pos, inv_freq, slots, kc, vc, heads, heads // hkv, half, vc.shape[-1], inv_freq.stride(0),
                     kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1))
    else:
        def grid(meta):
            return (cdiv(N, meta["BLOCK_N"]),)

        rope_args = (weight, weight, weight, weight, weight, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    args = (x2, weight, bias if bias is not None else weight, y, d2_, nw, s2, M, N, K, x2.stride(0), weight.stride(0),
            y.stride(0), d2_.stride(0), s2.stride(0), float(eps), cdiv(N, 256), cdiv(K, 256), K if gated else 0,
            *rope_args)
    kwargs = dict(M_PAD=m_pad(M), HAS_BIAS=bias is not None,
                  ALIGN=_align(weight.stride(0), weight.data_ptr() // weight.element_size()),
                  PRECISION=dot_precision(x2.dtype), GATED=gated, X_ALIGN=x_align, SWIGLU_OUT=swiglu_out,
                  NORM=norm is not None, HAS_DELTA=d2 is not None, ROPE_OUT=rope is not None, PF_LINES=pf,
                  W_EVICT="evict_first" if pf else "", VEC_ACC=M == 1 and vec_acc_enabled(), **pdl_meta(x2.device))
    # Repeated launches are harmless, NORM's too: it writes x + d to its own new buffer (nothing without a
    # delta). The cheap key skips the generic tuning key (~20 us of host time per launch here) for shapes
    # already seen, e.g. in eager mixed steps
    seen = (N, K, m_pad(M), gated, swiglu_out, rope is not None, norm is not None, d2 is not None, pf,
            kwargs["VEC_ACC"], x2.dtype, weight.dtype, y.dtype, None if bias is None else bias.dtype, x2.device)
    if x2.is_cuda and seen not in _TUNE_SEEN and tune_config(grid, args, kwargs):
        _TUNE_SEEN.add(seen)
    launch(_skinny, grid, args, kwargs, _INTERPRET)


def config_name(cfg: triton.Config) -> str:
    return f"{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}/{cfg.num_warps}w/{cfg.num_stages}s"


TUNED: dict[tuple, dict[str, float]] = {}  # tuning key -> microseconds per config, as this process timed them
_TUNE_SEEN: set[tuple] = set()  # launch shapes whose config is settled (tuned, stored, or not ours to tune)


def tune_config(grid, args: tuple, kwargs: dict) -> bool:
    """Choose this launch's tile config, once per tuning key, by timing every config the pruner keeps
    as a decode step runs it: repeated in a CUDA graph on rotating copies of the weight, each launch
    behind a small PDL kernel (``graph_timing.stream_us``: at least twice the L2 streamed, each weight
    stream starting while the small kernel runs). The choice goes into the autotuner's cache, so
    Triton's own timing (alone, after an L2 flush: it ranked these configs differently from a step,
    session 11) never runs for the key, and into ``kernels.pick_store``, so a restarted process reuses
    it. Nothing happens under the interpreter, with autotuning off, for a key already tuned, or during
    another graph's capture. Returns whether the key's config is settled (False: try again later)."""
    if interpret_mode() or not autotuning_enabled():
        return False
    key = tuning_key(_skinny, args, kwargs)
    if key in _skinny.cache:
        return True
    configs = {config_name(c): c for c in pruned_configs(_skinny, args, kwargs)}
    if len(configs) < 2:
        return True
    weight = args[1]
    store_key = ("skinny-config",) + key
    stored = pick_store.lookup(store_key, configs, weight.device, PICK_MARGIN)
    if stored is not None:
        _skinny.cache[key] = configs[stored]
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    precompile(_skinny, grid, args, kwargs)
    weights = stream_copies(weight, weight.device)
    before = step_predecessor(weight.device)
    before()
    times: dict[str, float] = {}
    for name, cfg in configs.items():
        def call(w, cfg=cfg):
            _skinny.fn[grid](args[0], w, *args[2:], **kwargs, **cfg.all_kwargs())
        try:
            call(weight)
            torch.cuda.synchronize()
            times[name] = stream_us(call, weights, between=before)
        except triton.runtime.errors.OutOfResources:
            continue
        except RuntimeError as exc:  # a failed capture: leave the key to Triton's autotuner
            torch.cuda.synchronize()
            warnings.warn(f"kernels: timing skinny configs in a CUDA graph failed ({exc!r})", RuntimeWarning)
            return True
    if not times:
        return True
    best = min(times, key=times.get)
    TUNED[key] = times
    _skinny.cache[key] = configs[best]
    pick_store.record(store_key, best, weight.device, PICK_MARGIN)
    return True


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, *, gated: bool = False,
                         swiglu_out: bool = False) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.linear` for ``x`` ``[..., K]`` with at most 64 rows.

    ``gated=True``: ``x`` is a fused gate/up output ``[..., 2K]`` (gate first) and the kernel computes
    ``silu(gate) * up`` while loading it, i.e. :func:`kernels.dispatch.swiglu_linear` in one launch.
    ``swiglu_out=True``: ``weight`` (and ``bias``) is a fused gate/up weight ``[2I, K]`` (gate rows
    first) and the result is ``silu(gate) * up`` ``[..., I]``, the SwiGLU applied in the epilogue
    (:func:`kernels.dispatch.swiglu_mlp`); bit for bit ``silu_mul`` of this kernel's plain output."""
    N, K, K_x = _check(x, weight, bias, gated, swiglu_out)
    x2 = _rows2(x, K_x)
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, out.view(x2.shape[0], N), gated=gated, swiglu_out=swiglu_out)
    return out


def norm_skinny_linear_triton(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                              weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                              swiglu_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm folded into the skinny matmul after it: ``(s, linear(rms_norm(s) *
    norm_weight, weight, bias))`` with ``s = x + delta`` (``x`` when ``delta`` is None), in ONE launch.

    Each program sums the squares of the rows while it streams its K range and scales its dot
    products by the rows' ``1/rms`` at the end; the programs write ``s`` a K chunk each. The
    normalised activation is not rounded to the input dtype before the matmul (fp32 at one token,
    ``s * norm_weight`` rounded once for the ``tl.dot`` path at 2-64), so results differ from
    ``add_rms_norm`` then :func:`skinny_linear_triton` at the level of that rounding.
    ``swiglu_out`` as in :func:`skinny_linear_triton`."""
    N, K, _ = _check(x, weight, bias, False, swiglu_out)
    if norm_weight.shape != (K,) or norm_weight.dtype != x.dtype or norm_weight.stride(0) != 1:
        raise ValueError(f"norm_weight must be a contiguous [{K}] of {x.dtype}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta must match x: {tuple(x.shape)} {x.dtype}")
    x2 = _rows2(x, K)
    d2 = _rows2(delta, K) if delta is not None else None
    s2 = torch.empty_like(x2) if d2 is not None else x2
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, y, swiglu_out=swiglu_out, norm=(d2, norm_weight, s2, eps))
    return s2.view(x.shape), y.view(*x.shape[:-1], N)


def _check_rope(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat ``[num_slots, Hkv, d]`` / ``[num_slots, Hkv, dv]`` views of the caches and ``d`` for a
    :func:`skinny_linear_rope_triton` launch, or a clear ValueError."""
    T, K = x2.shape
    if inv_freq.dim() != 2 or inv_freq.dtype != torch.float32 or inv_freq.stride(-1) != 1:
        raise ValueError(f"inv_freq must be float32 [Hkv, d/2] with unit last stride, got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")
    hkv, half = inv_freq.shape
    d = 2 * half
    if hkv == 0 or half == 0 or num_heads <= 0 or num_heads % hkv:
        raise ValueError(f"{num_heads} query heads do not group over {hkv} KV heads (inv_freq {tuple(inv_freq.shape)})")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() not in (3, 4) or c.dtype != x2.dtype or c.stride(-1) != 1:
            raise ValueError(f"{name} must be a [num_slots, Hkv, d] or [num_blocks, block_size, Hkv, d] cache of "
                             f"{x2.dtype} with unit last stride, got {c.dtype} {tuple(c.shape)}")
    try:
        kc, vc = _flat_cache(k_cache), _flat_cache(v_cache)
    except RuntimeError as exc:  # a view that cannot be flattened
        raise ValueError(f"caches must be viewable as [num_slots, Hkv, d]: {exc}") from exc
    dv = vc.shape[-1]
    if kc.shape[1:] != (hkv, d) or vc.shape[:2] != kc.shape[:2] or dv == 0:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold {hkv} heads of "
                         f"{d} / d_v")
    rows = (num_heads + hkv) * d + hkv * dv
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ValueError(f"weight must be the fused q/k/v weight [H*d + Hkv*d + Hkv*dv = {num_heads}*{d} + {hkv}*{d} "
                         f"+ {hkv}*{dv} = {rows}, {K}], got {tuple(weight.shape)}")
    if positions.shape != (T,) or slot_mapping.shape != (T,):
        raise ValueError(f"positions and slot_mapping must be [{T}] (one per row of x), got "
                         f"{tuple(positions.shape)} / {tuple(slot_mapping.shape)}")
    if positions.dtype.is_floating_point or slot_mapping.dtype.is_floating_point:
        raise ValueError("positions and slot_mapping must be integer tensors")
    return kc, vc, d


def skinny_linear_rope_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                              positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              q_out: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's q/k/v projection, RoPE and KV-cache write in ONE launch (``kernels.dispatch.linear_rope_qkv_``).

    ``x`` ``[T, K]`` (T <= 64), ``weight`` the fused ``[H*d + Hkv*d + Hkv*dv, K]`` (q rows, k rows, v
    rows), ``bias`` the same length or None, ``inv_freq`` fp32 ``[Hkv, d/2]`` (the kept frequencies of
    each KV head), caches ``[num_slots, Hkv, d]`` / ``[.., dv]`` or paged ``[num_blocks, block_size, Hkv, d]``.
    Each program owns BLOCK_N rotary pairs (two row sets, as the ``SWIGLU_OUT`` gate/up halves); its
    epilogue rounds the projection to the dtype (what ``linear`` would hand ``rope_qkv_``), rotates the
    pairs as :func:`kernels.rope.rope_qkv_triton_` does and stores the queries to ``q_out`` (``[T, H*d]``,
    allocated when None) and the rotated keys and raw values to the caches at ``slot_mapping`` (slots < 0
    skipped). Bit for bit :func:`skinny_linear_triton` then ``rope_qkv_triton_`` under one tiling.
    Returns ``q_out``."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share one of {SUPPORTED_DTYPES}, got {x.dtype} / {weight.dtype}"
                         + (f" / {bias.dtype}" if bias is not None else ""))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got {tuple(weight.shape)}")
    _check(x, weight, bias, False, False)
    x2 = _rows2(x, x.shape[1])
    kc, vc, d = _check_rope(x2, weight, bias, num_heads, positions, inv_freq, k_cache, v_cache, slot_mapping)
    T = x2.shape[0]
    if q_out is None:
        q_out = torch.empty((T, num_heads * d), dtype=x.dtype, device=x.device)
    elif q_out.shape != (T, num_heads * d) or q_out.dtype != x.dtype or q_out.stride(-1) != 1:
        raise ValueError(f"q_out must be [{T}, {num_heads * d}] of {x.dtype} with unit last stride, got "
                         f"{q_out.dtype} {tuple(q_out.shape)}")
    _launch(x2, weight, bias, q_out, rope=(positions, inv_freq, slot_mapping, kc, vc, num_heads))
    return q_out


_PICKS: dict[tuple, object] = {}
# A candidate other than the preferred one (our kernel, the fewer launches) must be this much faster
# to be picked: the timing repeats to a few percent, and in the engine our kernels also overlap the
# tail of whatever precedes them, which one predecessor here only approximates (2026-11-29, session 5:
# without a margin, one H200 run picked cuBLAS for one of LLaMA-2-7B's per-layer matmuls, 32 launches
# of 28 us per step, and the original's batch-1 step took 4.31 ms against 3.87 ms in the run before,
# which had picked the skinny kernel for every matmul).
PICK_MARGIN = 0.97


def pick_timing() -> str:
    """``MODEGPT_PICK_TIMING`` (read per pick): "stream" (the default) times the candidates of
    :func:`_timed_pick` as a decode step runs them (``graph_timing.stream_us``: repeated in a CUDA graph on
    rotating copies of their weights, each behind a small PDL kernel, as :func:`tune_config` times tile
    configs); "flush" times each after a 128 MB memset flush (``graph_timing.graph_us``, sessions 5-11),
    kept for A/B runs. The mode is part of the pick's key."""
    return "flush" if os.environ.get("MODEGPT_PICK_TIMING", "stream").strip().lower() == "flush" else "stream"


def _time_candidates(candidates: dict, weights: tuple, device: torch.device, mode: str) -> dict:
    """Microseconds per call of each candidate (name -> callable taking ``*weights``), timed by ``mode``."""
    if mode == "flush":
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
        before = predecessor(flush)
        flush.zero_()  # its fill kernel too: a test process had launched none before (H200, session 6)
    else:
        before = step_predecessor(device)
    before()
    for fn in candidates.values():
        fn(*weights)  # autotune / cuBLAS heuristics / module loads outside the capture
    torch.cuda.synchronize()
    if mode == "flush":
        return {name: graph_us(lambda fn=fn: fn(*weights), flush, before) for name, fn in candidates.items()}
    sets = stream_copies(weights, device) if weights else [()]
    return {name: stream_us(lambda ws, fn=fn: fn(*ws), sets, between=before) for name, fn in candidates.items()}


def _timed_pick(key: tuple, candidates: dict, device: torch.device, prefer=None, weights: tuple = ()):
    """The fastest of ``candidates`` (name -> callable taking ``*weights``: the tensors the call streams,
    cycled through copies while it is timed), timed once per ``key`` by :func:`pick_timing` and stored on
    disk by ``kernels.pick_store``, so a restarted process reuses it. ``prefer`` wins unless another is
    faster than ``PICK_MARGIN`` x its time. None during another graph's capture (nothing can be timed then)."""
    mode = pick_timing()
    if mode == "flush":
        key = key + ("flush",)
    if key not in _PICKS:
        stored = pick_store.lookup(key, candidates, device, PICK_MARGIN)  # timed by an earlier process
        if stored is not None:
            _PICKS[key] = stored
            return stored
        if torch.cuda.is_current_stream_capturing():
            return None
        timed = True
        try:
            times = _time_candidates(candidates, weights, device, mode)
        except RuntimeError as exc:  # a heuristic must never take the engine down: keep the preferred one
            timed = False
            torch.cuda.synchronize()
            warnings.warn(f"kernels: timing {key[0]} candidates failed ({exc!r}); keeping "
                          f"{prefer if prefer in candidates else next(iter(candidates))!r}", RuntimeWarning)
            times = {name: (0.0 if name == prefer else 1.0) for name in candidates}
        best = min(times, key=times.get)
        if prefer in times and times[best] >= PICK_MARGIN * times[prefer]:
            best = prefer
        _PICKS[key] = best
        if timed:  # a fallback after a failed timing is this process's choice only
            pick_store.record(key, best, device, PICK_MARGIN)
    return _PICKS[key]


def beats_cublas(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> bool:
    """Whether this kernel is faster than cuBLAS for ``x2`` ``[M, K]`` against ``weight``, decided
    once per (N, K, M bucket, dtype, bias, gated, device, PDL) by timing both inside CUDA graphs
    (:func:`_timed_pick`; ~10-20 ms per new shape, in the engine's warm-up before its own graph
    capture). Eager timing would be wrong here: Triton's host launch path (~40 us)
    exceeds the kernel, and an eager measurement on the H200 picked cuBLAS for every LLaMA-2-7B
    shape although the kernel is 1.04-1.26x faster on most of them in graphs (and 0.96x on a
    4096 -> 10752 q/k/v, 0.5x at 4-16 tokens with a K that is not a multiple of 16). During
    another graph's capture nothing can be timed: an unseen shape then takes cuBLAS.

    ``gated``: ``x2`` is ``[M, 2K]`` (gate | up), and the fused SwiGLU + matmul launch is timed against
    what would run otherwise: the ``silu_mul`` launch, then the faster of this kernel and cuBLAS."""
    key = ("dense", tuple(weight.shape), m_pad(x2.shape[0]), weight.dtype, bias is not None, gated,
           weight.device, launch_mode(weight.device))
    if gated:
        from .fused_norm import silu_mul_triton

        K = weight.shape[1]

        def theirs(w):  # the SwiGLU launch, then the faster of this kernel and cuBLAS (its own pick, made
            # by the first, uncaptured call of this candidate)
            h = silu_mul_triton(x2[:, :K], x2[:, K:])
            return (skinny_linear_triton if beats_cublas(h, w, bias) else torch.nn.functional.linear)(h, w, bias)

        candidates = {"ours": lambda w: skinny_linear_triton(x2, w, bias, gated=True), "theirs": theirs}
    else:
        candidates = {"ours": lambda w: skinny_linear_triton(x2, w, bias),
                      "theirs": lambda w: torch.nn.functional.linear(x2, w, bias)}
    return _timed_pick(key, candidates, weight.device, prefer="ours", weights=(weight,)) == "ours"


def split_k_mode() -> str:
    """``MODEGPT_SKINNY_SPLIT_K`` (read per call): "off" (the default), "auto" or "force". A dense matmul
    of 2-64 tokens (padded to 16-64) gets only N / 16 programs from this kernel, too few for an o or down
    projection (N = 4096: 256 programs; they streamed at 47-72 % of the H200's bandwidth in session 11).
    "auto" adds a K-split candidate, ``lowrank.shrink_split_triton`` (partials summed in order by the last
    split, deterministic), to the per-shape pick (:func:`dense_pick`); "force" takes it wherever it
    applies, without timing (tests, A/B runs). Off: end to end on the H200 (session 12) "auto" measured
    0.999-1.000x at batch 16, where the timed pick kept this kernel for every shape."""
    mode = os.environ.get("MODEGPT_SKINNY_SPLIT_K", "off").strip().lower()
    return {"1": "auto", "on": "auto", "yes": "auto", "auto": "auto", "force": "force"}.get(mode, "off")


def split_k_applies(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The K-split candidate's reach: no bias (the split shrink has none), 2-64 tokens."""
    from .lowrank import FUSED_MAX_M

    return split_k_mode() != "off" and bias is None and 2 <= x2.shape[0] <= FUSED_MAX_M


def dense_pick(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """How a dense decode matmul runs: "ours" (this kernel), "theirs" (cuBLAS) or, under
    :func:`split_k_mode`, "split" (``lowrank.shrink_split_triton``), timed once per shape in CUDA graphs
    like :func:`beats_cublas` (which decides when the K split is off or does not apply)."""
    if not split_k_applies(x2, weight, bias):
        return "ours" if beats_cublas(x2, weight, bias) else "theirs"
    from .lowrank import shrink_split_triton

    key = ("dense-split", tuple(weight.shape), m_pad(x2.shape[0]), weight.dtype, weight.device,
           launch_mode(weight.device))
    candidates = {"ours": lambda w: skinny_linear_triton(x2, w),
                  "theirs": lambda w: torch.nn.functional.linear(x2, w),
                  "split": lambda w: shrink_split_triton(x2, w)}
    return _timed_pick(key, candidates, weight.device, prefer="ours", weights=(weight,)) or "theirs"


def lowrank_pick(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, str]:
    """For a factorized linear ``(x2 @ A.T) @ B.T + bias`` at decode sizes: how each stage runs,
    ``(shrink, expand)``, the shrink one of "skinny" (this kernel), "split" (``lowrank.shrink_split_triton``:
    K split over ~2 waves of programs, for A's few rows) or "cublas", the expand "skinny" or
    "cublas". Timed as PAIRS (all six combinations, once per shape): with PDL the expand's weight
    stream overlaps the shrink only when both are our kernels, which timing each stage alone cannot
    see. Two cuBLAS calls are the preferred pair (another must time ``PICK_MARGIN`` faster): the
    promise is never to be slower than them, and session 10's bench saw a pick that timed faster
    here run 0.93x of them (7B down, rank 25 %, 16 tokens). During another graph's capture an unseen
    shape takes cuBLAS for both."""
    from .lowrank import shrink_split_triton

    key = ("lowrank", tuple(A.shape), tuple(B.shape), m_pad(x2.shape[0]), A.dtype,
           bias is not None, A.device, launch_mode(A.device))
    stages = {"skinny": skinny_linear_triton, "cublas": torch.nn.functional.linear}
    shrinks = {**stages, "split": lambda x, a, _bias: shrink_split_triton(x, a)}

    def pair(first, second):
        return lambda a, b: second(first(x2, a, None), b, bias)

    candidates = {(a, b): pair(shrinks[a], stages[b]) for a in ("skinny", "split", "cublas") for b in stages}
    return _timed_pick(key, candidates, A.device, prefer=("cublas", "cublas"), weights=(A, B)) or ("cublas", "cublas")
