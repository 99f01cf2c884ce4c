"""Triton decode attention over a paged KV cache with compressed head dims (flash-decoding).

Contract: one query token per sequence, ``q`` ``[B, H, d_qk]``; caches ``[num_blocks, block_size,
Hkv, d]`` (the layout ``kernels.rope`` writes; a flat ``[num_slots, Hkv, d]`` cache is the case
``block_size = 1`` with a per-position slot table); ``block_tables[b, j]`` is the block holding
positions ``[j*block_size, (j+1)*block_size)`` of sequence b; ``context_lens[b]`` keys are
attended; the softmax scale is explicit (MoDeGPT keeps the ORIGINAL ``head_dim ** -0.5``, not
``d_qk ** -0.5``); ``d_qk != d_v`` in general (e.g. 46 and 38). Output ``[B, H, d_v]``.

Design:

* Decode attention is a pure stream of the KV cache (a few FLOP per byte), so the kernel must
  (a) read every cached key/value once and (b) keep the whole chip busy. (a): one program serves
  all ``H / Hkv`` query heads of a KV head (GQA packing): the query tile is ``[group, d_qk]``
  (padded to the 16 rows ``tl.dot`` needs), so each K/V tile read from HBM feeds the whole group.
  (b): batch x KV heads is often far below the 132 SMs (batch 1: 32 programs), so the context is
  split into ``num_splits`` partitions (flash-decoding); each program does an online softmax over
  its partition and writes an fp32 partial output plus its log-sum-exp; a tiny second kernel
  combines the partitions exactly. With one split the first kernel writes the output directly.
* Dims are read in at most two power-of-two chunks (``dim_chunks``: 96 = 64 + 32, one MMA each) and
  masked, so odd ``d_qk``/``d_v`` cost only the padding lanes, never a copy of the cache; one
  128-wide tile for a 96-dim head cost as much as for a 128-dim one on the H200. The head dims are
  compile-time constants (one compiled variant per distinct (d_qk, d_v), cached on disk by Triton)
  and the row offsets carry an
  alignment hint: with a runtime ``d_qk = 46`` Triton can prove no alignment and issues 2-byte
  loads, which measured 0.42 TB/s on the H200 against 4.0 TB/s for d = 64 or 128. Rows of an odd
  dim are only 4-byte aligned (46 * 2 bytes), so dims that are multiples of 8 remain much faster:
  the compressor should round kept head dims to multiples of 8 (see the report).
* Split sizes come from the block table's capacity (or ``max_context_len``), never from
  ``context_lens`` on the device: no host synchronisation, so the call is CUDA-graph capturable.
  Partitions past a sequence's length do no work and write an empty partial (lse = -inf).
* Scores use ``exp2`` with ``scale * log2(e)`` folded into one multiply; fp32 everywhere except
  the MMA operands (16-bit inputs: P is rounded to the value dtype, as in FlashAttention).
* ``counters`` (the engine passes one zeroed int32 buffer per model): the last partition of a
  (sequence, KV head) to finish combines the partials itself, so a split context is one launch; it
  finds out by an acq_rel ticket and resets the ticket, so graph replays need no memset. Measured on
  the H200 within noise of the two-launch version (docs/BENCHMARKS.md, session 6).
* ``rope_decode_attention_triton`` also takes the raw projection outputs: each program rotates its
  query heads (the two rotate-half halves scored as two dot products) and the program owning the
  newest position writes the rotated key and the value into the cache before reading it. One launch
  instead of the RoPE launch + attention, but measured slower at 1 and 64 sequences (every program
  recomputes the rotation the RoPE launch did once per token), so the engine keeps it opt-in.
"""
from __future__ import annotations

import math
import os
import re

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, interpret_mode, next_pow2, pdl_meta, sm_count, workspace
from ._tl import mma, pdl_wait
from .rope import _rows, rope_qkv_triton_
from .rope import rope_cos_sin as _rope_cos_sin

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_partition_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
        pos_ptr, freq_ptr, slot_ptr, kn_ptr, vn_ptr, out_ptr, cnt_ptr,
        group, kv_heads, block_size, part_len, scale_log2,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        stride_f, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh,
        DQK: tl.constexpr, DV: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr,
        SPLIT: tl.constexpr, G_PAD: tl.constexpr, DQK0: tl.constexpr, DQK1: tl.constexpr,
        DV0: tl.constexpr, DV1: tl.constexpr, DV_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr, HALF_PAD: tl.constexpr,
        FOLD: tl.constexpr, S_PAD: tl.constexpr, HP: tl.constexpr, PDL: tl.constexpr):
    """One (sequence, KV head, partition). ``ROPE``: ``q`` is the projection output before RoPE and the
    new token's key/value rows (``kn``/``vn``) are not in the cache yet: the program rotates its query
    heads itself (rotate-half pairs ``(i, i + DQK/2)`` at ``freq[kvh]``, rounded to the input dtype
    as ``kernels.rope`` does), scores the two halves as two dot products, and the program whose
    partition holds position ``len - 1`` writes the rotated key and the value into ``slot`` first.
    ``FOLD`` (with ``SPLIT``): the last partition of a (sequence, KV head) to finish, counted by
    ``cnt`` (zero before the launch, zero again after it), combines the partials into ``out``, so
    no second launch is needed. Head dims are read in at most two power-of-two chunks (``DQK0`` +
    ``DQK1``, ``DV0`` + ``DV1``; a second chunk of 0 means none), one MMA each: a compressed model's 80,
    88 or 96 is 64 + 32 instead of a 128-wide tile with up to a third of it masked (``dim_chunks``).
    ``HP`` > 1 (without ``ROPE``): the program serves ``HP`` consecutive KV heads (their query heads are
    its rows); a key tile is ``BLOCK_N`` positions x ``HP`` heads (column ``c``: position ``c // HP``,
    head ``c % HP``, so each slot's heads are one contiguous run), scored against every row and masked
    to each row's own head. The 16 padded query rows of an MHA program make that free in MMA work."""
    b = tl.program_id(0)
    kvp = tl.program_id(1)
    kvh = kvp * HP  # the program's first KV head
    sp = tl.program_id(2)
    pdl_wait(PDL)  # q, the lengths and the newest cache slot come from the kernels before
    seq_len = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, G_PAD)
    g_mask = (offs_g < group * HP) & (kvh + offs_g // group < kv_heads)
    heads = kvh * group + offs_g
    TILE: tl.constexpr = BLOCK_N * HP
    offs_c = tl.arange(0, TILE)
    row_head = tl.where(offs_g < group * HP, offs_g // group, 0)  # padded rows: head 0, finite scores
    col_head = offs_c % HP
    col_kvh = tl.minimum(kvh + col_head, kv_heads - 1)  # a partial last pack reads a real head, never stored
    offs_d = tl.arange(0, DQK0)
    d_mask = offs_d < DQK
    DQK1_N: tl.constexpr = DQK1 if DQK1 > 0 else 1  # a second chunk of 0: a 1-wide range, never read
    DV1_N: tl.constexpr = DV1 if DV1 > 0 else 1
    offs_d1 = DQK0 + tl.arange(0, DQK1_N)
    d1_mask = offs_d1 < DQK
    offs_e = tl.arange(0, DV0)
    e_mask = offs_e < DV
    offs_e1 = DV0 + tl.arange(0, DV1_N)
    e1_mask = offs_e1 < DV
    HALF: tl.constexpr = DQK // 2
    offs_i = tl.arange(0, HALF_PAD)
    i_mask = offs_i < HALF
    if ROPE:
        c, sn = _rope_cos_sin(tl.load(pos_ptr + b).to(tl.float32),
                              tl.load(freq_ptr + kvh * stride_f + offs_i, mask=i_mask, other=0.0))
        qrow = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_i[None, :]
        qm = g_mask[:, None] & i_mask[None, :]
        q1 = tl.load(qrow, mask=qm, other=0.0)
        q2 = tl.load(qrow + HALF, mask=qm, other=0.0)
        qa = (q1.to(tl.float32) * c[None, :] - q2.to(tl.float32) * sn[None, :]).to(q1.dtype)
        qb = (q2.to(tl.float32) * c[None, :] + q1.to(tl.float32) * sn[None, :]).to(q1.dtype)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if (slot >= 0) & (seq_len > 0) & ((seq_len - 1) // part_len == sp):
            kn = kn_ptr + b * stride_knb + kvh * stride_knh + offs_i
            k1 = tl.load(kn, mask=i_mask, other=0.0).to(tl.float32)
            k2 = tl.load(kn + HALF, mask=i_mask, other=0.0).to(tl.float32)
            blk_new = slot // block_size
            in_new = slot % block_size
            kd = k_ptr + blk_new * stride_kb + in_new * stride_ks + kvh * stride_kh + offs_i
            tl.store(kd, (k1 * c - k2 * sn).to(k_ptr.dtype.element_ty), mask=i_mask)
            tl.store(kd + HALF, (k2 * c + k1 * sn).to(k_ptr.dtype.element_ty), mask=i_mask)
            offs_v = tl.arange(0, DV_PAD)
            vn = tl.load(vn_ptr + b * stride_vnb + kvh * stride_vnh + offs_v, mask=offs_v < DV, other=0.0)
            tl.store(v_ptr + blk_new * stride_vb + in_new * stride_vs + kvh * stride_vh + offs_v,
                     vn.to(v_ptr.dtype.element_ty), mask=offs_v < DV)
            tl.debug_barrier()  # the whole program reads the new row back from the cache below
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if DQK1 > 0:
            q_hi = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d1[None, :],
                           mask=g_mask[:, None] & d1_mask[None, :], other=0.0)

    lo = sp * part_len
    hi = tl.minimum(lo + part_len, seq_len)
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, DV0), dtype=tl.float32)
    acc1 = tl.zeros((G_PAD, DV1_N), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        if HP == 1:
            pos = n0 + offs_c
        else:
            pos = n0 + offs_c // HP
        p_mask = pos < hi
        blk = tl.load(bt_ptr + b * stride_btb + pos // block_size, mask=p_mask, other=0).to(tl.int64)
        within = (pos % block_size).to(tl.int64)
        # rows start ALIGN_K elements apart at least: lets the loads vectorize on odd head dims
        if HP == 1:
            k_rows = tl.multiple_of(blk * stride_kb + within * stride_ks + kvh * stride_kh, ALIGN_K)
            v_rows = tl.multiple_of(blk * stride_vb + within * stride_vs + kvh * stride_vh, ALIGN_V)
        else:
            k_rows = tl.multiple_of(blk * stride_kb + within * stride_ks + col_kvh * stride_kh, ALIGN_K)
            v_rows = tl.multiple_of(blk * stride_vb + within * stride_vs + col_kvh * stride_vh, ALIGN_V)
        if ROPE:  # the two rotate-half halves of the keys against those of the queries
            km = p_mask[None, :] & i_mask[:, None]
            ka = tl.load(k_ptr + k_rows[None, :] + offs_i[:, None], mask=km, other=0.0)  # [HALF_PAD, BLOCK_N]
            kb = tl.load(k_ptr + k_rows[None, :] + HALF + offs_i[:, None], mask=km, other=0.0)
            s = mma(qb, kb, mma(qa, ka, tl.zeros((G_PAD, BLOCK_N), dtype=tl.float32), PRECISION), PRECISION)
        else:
            kt = tl.load(k_ptr + k_rows[None, :] + offs_d[:, None],
                         mask=p_mask[None, :] & d_mask[:, None], other=0.0)  # [DQK0, TILE]
            s = mma(q, kt, tl.zeros((G_PAD, TILE), dtype=tl.float32), PRECISION)
            if DQK1 > 0:
                kt1 = tl.load(k_ptr + k_rows[None, :] + offs_d1[:, None],
                              mask=p_mask[None, :] & d1_mask[:, None], other=0.0)  # [DQK1, TILE]
                s = mma(q_hi, kt1, s, PRECISION)
        s = s * scale_log2
        if HP == 1:
            s = tl.where(p_mask[None, :], s, float("-inf"))
        else:  # each row scores only its own head's columns
            s = tl.where(p_mask[None, :] & (row_head[:, None] == col_head[None, :]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every iteration has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + v_rows[:, None] + offs_e[None, :],
                     mask=p_mask[:, None] & e_mask[None, :], other=0.0)  # [BLOCK_N, DV0]
        acc = mma(p.to(vt.dtype), vt, acc * alpha[:, None], PRECISION)
        if DV1 > 0:
            vt1 = tl.load(v_ptr + v_rows[:, None] + offs_e1[None, :],
                          mask=p_mask[:, None] & e1_mask[None, :], other=0.0)  # [BLOCK_N, DV1]
            acc1 = mma(p.to(vt1.dtype), vt1, acc1 * alpha[:, None], PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0
    inv_l = 1.0 / tl.where(nonempty, l_i, 1.0)
    o = acc * inv_l[:, None]
    o1 = acc1 * inv_l[:, None]
    o_mask = g_mask[:, None] & e_mask[None, :]
    o1_mask = g_mask[:, None] & e1_mask[None, :]
    if SPLIT:
        o_row = o_ptr + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os
        tl.store(o_row + offs_e[None, :], o, mask=o_mask)
        if DV1 > 0:
            tl.store(o_row + offs_e1[None, :], o1, mask=o1_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + sp, lse, mask=g_mask)
        if FOLD:
            tl.debug_barrier()  # every thread's partial is stored before the release below
            n_split = tl.num_programs(2)
            cnt = cnt_ptr + b * tl.num_programs(1) + kvp
            if tl.atomic_add(cnt, 1, sem="acq_rel") == n_split - 1:
                offs_v = tl.arange(0, DV_PAD)
                _combine_group(o_ptr, lse_ptr, out_ptr, b, heads, g_mask, offs_v, offs_v < DV, n_split, stride_ob,
                               stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                               G_PAD, DV_PAD, S_PAD)
                tl.atomic_xchg(cnt, 0, sem="relaxed")  # ready for the next launch (graph replays too)
    else:
        o_row = o_ptr + b * stride_ob + heads[:, None] * stride_oh
        tl.store(o_row + offs_e[None, :], o.to(o_ptr.dtype.element_ty), mask=o_mask)
        if DV1 > 0:
            tl.store(o_row + offs_e1[None, :], o1.to(o_ptr.dtype.element_ty), mask=o1_mask)


@triton.jit
def _combine_group(o_ptr, lse_ptr, out_ptr, b, heads, g_mask, offs_e, e_mask, n_split, stride_ob, stride_oh,
                   stride_os, stride_lb, stride_lh, stride_outb, stride_outh, G_PAD: tl.constexpr,
                   DV_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """``_combine_kernel``'s sum for the query heads of one KV head, in the program that arrived last:
    the other programs' partials are read through L2 (``.cg``), never a stale L1 line."""
    offs_s = tl.arange(0, S_PAD)
    lse = tl.load(lse_ptr + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :],
                  mask=g_mask[:, None] & (offs_s < n_split)[None, :], other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m[:, None])  # [G_PAD, S_PAD]; empty partitions weigh 0
    o_mask = g_mask[:, None] & e_mask[None, :]
    acc = tl.zeros((G_PAD, DV_PAD), dtype=tl.float32)
    for i in range(0, n_split):
        w_i = tl.sum(tl.where(offs_s[None, :] == i, w, 0.0), axis=1)
        part = tl.load(o_ptr + b * stride_ob + heads[:, None] * stride_oh + i * stride_os + offs_e[None, :],
                       mask=o_mask, other=0.0, cache_modifier=".cg")
        acc += part * w_i[:, None]
    w_sum = tl.sum(w, axis=1)
    o = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    tl.store(out_ptr + b * stride_outb + heads[:, None] * stride_outh + offs_e[None, :],
             o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, num_splits, dv,
                    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                    S_PAD: tl.constexpr, DV_PAD: tl.constexpr, PDL: tl.constexpr):
    """out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse); all-empty gives 0."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    pdl_wait(PDL)
    offs_s = tl.arange(0, S_PAD)
    s_mask = offs_s < num_splits
    offs_e = tl.arange(0, DV_PAD)
    e_mask = offs_e < dv
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    w_sum = tl.sum(w, axis=0)
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_e[None, :],
                   mask=s_mask[:, None] & e_mask[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_e, o.to(out_ptr.dtype.element_ty), mask=e_mask)


def _alignment(cache: torch.Tensor) -> int:
    """Largest power of two (<= 8 elements) dividing the cache's base offset and row strides: the
    vector width a row load may use. An odd head dim (46) in a contiguous cache gives 2."""
    g = 8
    for v in (cache.stride(0), cache.stride(1), cache.stride(2), cache.data_ptr() // cache.element_size()):
        g = math.gcd(g, int(v))
    return max(1, g)


def programs_per_sm() -> int:
    """``MODEGPT_ATTN_PROGRAMS_PER_SM`` (default 2): how many attention programs per SM :func:`plan_splits`
    aims for. More splits a context into more, shorter partitions: at short contexts the kernel is bound by
    the latency of its serial key tiles, not by bytes (H200, session 12: at batch 16 and ~113 positions
    the 30 % checkpoint read its K/V at 35 % of the bandwidth ceiling, the original at 48 %). Session 13
    measured 4 and 8 only together with partitions cut from each sequence's own length (since removed):
    0.5-8 % slower at batch 1-64, so 2 stays."""
    return max(1, int(os.environ.get("MODEGPT_ATTN_PROGRAMS_PER_SM", "2")))


def plan_splits(batch: int, kv_heads: int, capacity: int, block_n: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, partition length). Aim for :func:`programs_per_sm` (default 2) programs per SM, at
    most 64 partitions of at least one key tile. A program's key tiles run one after another (~2.5 us
    each on the H200, latency-bound at decode sizes), the combine costs about one tile, so a context of
    3+ tiles is split as soon as batch x KV heads leaves SMs idle (batch 1: 32 programs on 132 SMs; at
    4-tile partitions minimum a 208-token context stayed one 8.2 us program per head)."""
    if num_splits is None:
        want = cdiv(programs_per_sm() * sm_count(device), max(1, batch * kv_heads))
        tiles = cdiv(capacity, block_n)
        num_splits = max(1, min(want, tiles, 64)) if tiles >= 3 else 1
    num_splits = max(1, min(int(num_splits), cdiv(capacity, block_n)))
    part_len = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    return cdiv(capacity, part_len), part_len


def _caches4(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches as ``[num_blocks, block_size, Hkv, d]`` (a flat ``[num_slots, Hkv, d]`` is block size 1)."""
    return tuple(c if c.dim() == 4 else c.unsqueeze(1) for c in (k_cache, v_cache))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, *, max_context_len: int | None = None,
                            num_splits: int | None = None, counters: torch.Tensor | None = None,
                            config: dict | None = None, compile_only: bool = False) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.decode_attention`.

    ``max_context_len`` (a host int, optional) bounds the partitions more tightly than the block
    table's capacity; ``num_splits`` overrides the split heuristic (tests, tuning). ``counters``: a
    zeroed int32 tensor of at least ``B * Hkv`` elements that no concurrent launch uses; with it a
    split context is combined by its last partition (one launch instead of two), and the counters
    are zero again afterwards. ``config`` overrides the launch configuration (``BLOCK_N``,
    ``num_warps``, ``num_stages``, ``DIM_CHUNKS``, ``KV_PACK``; :func:`auto_config` otherwise): for ``kernels.bench``'s
    sweep, which also uses ``compile_only`` (compile the kernels this call would launch, launch
    nothing: under Triton's ``AsyncCompileMode`` many configurations compile in parallel).
    """
    return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, out, max_context_len, num_splits, None,
                   counters, config, compile_only)


def rope_decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                 inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float, out: torch.Tensor | None = None, *,
                                 max_context_len: int | None = None, num_splits: int | None = None,
                                 counters: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.rope_decode_attention`: RoPE of the queries and of the
    new keys, the cache write of the new keys and values, and decode attention in one launch (two
    with a split context and no ``counters``: the partitions, then their combine; ``counters`` as in
    :func:`decode_attention_triton`). ``q`` is not modified."""
    B = context_lens.shape[0]
    hkv, half = inv_freq.shape
    d = 2 * half
    if inv_freq.dtype != torch.float32 or inv_freq.stride(-1) != 1 or d == 0:
        raise TypeError("inv_freq must be a non-empty float32 [Hkv, d/2] with unit last stride")
    kc, vc = _caches4(k_cache, v_cache)
    dv = vc.shape[3]
    H = q.shape[-1] // d if q.dim() == 2 else q.shape[1]
    qr = _rows(q, B, H, d, "q")
    kr = _rows(k, B, hkv, d, "k")
    vr = _rows(v, B, hkv, dv, "v")
    if positions.shape != (B,) or slot_mapping.shape != (B,):
        raise ValueError(f"positions and slot_mapping must be [{B}], got {tuple(positions.shape)} / "
                         f"{tuple(slot_mapping.shape)}")
    return _decode(qr, kc, vc, block_tables, context_lens, scale, out, max_context_len, num_splits,
                   (positions, inv_freq, slot_mapping, kr, vr), counters)


# The reference launch configuration (sessions 1-6 used it for every call): key tiles of 64 (16 under the
# interpreter, so loops run several iterations on small test shapes), 4 warps, 2 stages.
# DIM_CHUNKS False: head dims padded to one power of two (sessions 1-7); True: ``dim_chunks``.
# KV_PACK: KV heads per program (1 until session 8; more is opt-in and not yet timed on a GPU).
DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "DIM_CHUNKS": False, "KV_PACK": 1}
# A block table of at most this many positions counts as a short context (auto_config). The engine
# captures its decode graphs once per context class (server.engine.runner), so the capacity it passes
# here tracks the batch's longest context.
SHORT_CONTEXT = 256


# The narrowest second chunk. The H200 sweeps of session 8 (docs/BENCHMARKS.md; best chunked against
# best padded configuration): 96 as 64 + 32 was 0.97-1.26x, but 80 as 64 + 16 was 0.74-0.82x (16-wide
# tiles make poor loads and MMAs); read as 64 + 32, 80 was 1.10-1.23x.
MIN_CHUNK = 32


def dim_chunks(d: int, split: bool = True) -> tuple[int, int]:
    """The widths in which the kernel reads a head dim of ``d``: one power of two >= 16, or (``split``)
    two, ``(c0, c1)`` with ``c0 >= c1 >= MIN_CHUNK``, when they cover ``d`` in less (96 -> 64 + 32,
    80 -> 64 + 32, 160 -> 128 + 32; 112 stays 128, as 64 + 64 saves nothing). ``(w, 0)``: one chunk."""
    full = max(16, next_pow2(d))
    dm = cdiv(max(d, 1), MIN_CHUNK) * MIN_CHUNK
    c0 = 1 << (dm.bit_length() - 1)  # the largest power of two <= dm
    rest = dm - c0
    if not split or rest == 0:
        return full, 0
    c1 = max(MIN_CHUNK, next_pow2(rest))
    return (c0, c1) if c0 + c1 < full else (full, 0)


def auto_config(capacity: int, dqk: int, dv: int, batch: int = 1, group: int = 1) -> dict:
    """The launch configuration for a block table of ``capacity`` positions, these head dims, ``batch``
    sequences and ``group`` query heads per KV head, from the H200 sweeps (``kernels.bench.
    run_attention_sweep``, docs/BENCHMARKS.md; 32 heads, bf16; a CUDA graph fixes the configuration, so
    it can only follow what is known at capture: the table's width and the batch bucket):

    * session 7: short contexts want key tiles of 32 (1.01-1.24x), long ones with a head dim padded
      inside one chunk (112 in 128) a third pipeline stage (1.03-1.35x).
    * session 8: head dims read in two chunks (:func:`dim_chunks`; 96, 88 and 80 as 64 + 32), 0.97-1.26x
      of the best padded configuration; end to end (session 9, call 1) the 30 % checkpoint with them was
      1.07x faster at batch 256 and 1.05x at 64 than with padded 32-key tiles, and equal at 1-16.
    * session 9, several KV heads per program (``KV_PACK``) at ragged contexts (each sequence ``ctx - i %
      16`` long), multi-head attention: against the previous choice (32/4w/2s/cd short, 64/4w/2s/cd long)
      - short (112 positions), batch 64-256: ``16/4w/2s/cd/p4`` for dims <= 96, 1.17-1.39x (1.07x at
        128, where it loses at batch 64), and ``32/4w/2s/cd/p2`` for 128, 1.06-1.08x;
      - short, batch 16: no packing. 64-key tiles for dims <= 96 were 1.15x faster in the sweep, but
        end to end (call 3) the 30 % checkpoint was 0.8 % slower with them than with 32, so 32 stays;
      - long (1024), batch 16-256: ``32/4w/2s/cd/p2``, 1.06-1.34x (one case 0.98x: 80 dims at batch 16).
    Packing is used for multi-head attention only (``group == 1``, what was measured) and never for a
    dim padded inside one chunk (112: not measured); below batch 16 nothing changed (not swept)."""
    padded_one_chunk = any(c1 == 0 and c0 != d for d in (dqk, dv) for c0, c1 in [dim_chunks(d)])
    wide = max(dqk, dv) > 96  # one 128-wide chunk
    pack = group == 1 and not padded_one_chunk and batch >= 16  # where packing was measured
    cfg = dict(DEFAULT_CONFIG, DIM_CHUNKS=True)
    if capacity <= SHORT_CONTEXT:
        if pack and batch >= 64:
            return dict(cfg, BLOCK_N=32, KV_PACK=2) if wide else dict(cfg, BLOCK_N=16, KV_PACK=4)
        return dict(cfg, BLOCK_N=32)
    if pack:
        return dict(cfg, BLOCK_N=32, KV_PACK=2)
    return dict(cfg, num_stages=3 if padded_one_chunk else 2)


def config_name(cfg: dict) -> str:
    """``"BLOCK_N/<warps>w/<stages>s"``, then ``"/cd"`` when head dims are read in chunks (``DIM_CHUNKS``)
    and ``"/p<n>"`` for n KV heads per program (``KV_PACK`` > 1): the names of ``kernels.bench``'s sweep
    and of ``MODEGPT_ATTN_CONFIG`` (:func:`parse_config`)."""
    c = dict(DEFAULT_CONFIG, **cfg)
    return ("{BLOCK_N}/{num_warps}w/{num_stages}s".format(**c) + ("/cd" if c["DIM_CHUNKS"] else "")
            + (f"/p{c['KV_PACK']}" if c["KV_PACK"] > 1 else ""))


def parse_config(name: str) -> dict:
    """The launch configuration a :func:`config_name` names (``"32/4w/2s/cd/p4"``), or ValueError."""
    m = re.fullmatch(r"(\d+)/(\d+)w/(\d+)s(/cd)?(?:/p(\d+))?", name.strip())
    if m is None:
        raise ValueError(f"attention config {name!r} is not BLOCK_N/<warps>w/<stages>s[/cd][/p<n>], "
                         "e.g. 64/4w/2s/cd")
    return _launch_config({"BLOCK_N": int(m[1]), "num_warps": int(m[2]), "num_stages": int(m[3]),
                           "DIM_CHUNKS": m[4] is not None, "KV_PACK": int(m[5] or 1)})


def _launch_config(config: dict | None, auto: dict | None = None) -> dict:
    """``config`` over ``auto`` (or :data:`DEFAULT_CONFIG`); key tiles of 16 under the interpreter unless
    ``config`` sets them."""
    cfg = dict(auto or DEFAULT_CONFIG, **({"BLOCK_N": 16} if interpret_mode() else {}))
    if config:
        unknown = set(config) - set(DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"unknown attention config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
        cfg.update(config)
    if cfg["BLOCK_N"] < 16 or cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1):
        raise ValueError(f"BLOCK_N must be a power of two >= 16, got {cfg['BLOCK_N']}")
    if cfg["KV_PACK"] < 1 or cfg["KV_PACK"] & (cfg["KV_PACK"] - 1):
        raise ValueError(f"KV_PACK must be a power of two >= 1, got {cfg['KV_PACK']}")
    return cfg


def _start(kernel, grid, compile_only: bool, *args, **kwargs) -> None:
    if compile_only:
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _decode(q, k_cache, v_cache, block_tables, context_lens, scale, out, max_context_len, num_splits, rope,
            counters=None, config=None, compile_only=False):
    B, H, dqk = q.shape
    kc, vc = _caches4(k_cache, v_cache)
    _, block_size, hkv, dqk_c = kc.shape
    dv = vc.shape[3]
    if dqk_c != dqk or vc.shape[:3] != kc.shape[:3] or H % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match caches {tuple(kc.shape)} / {tuple(vc.shape)}")
    if q.stride(-1) != 1 or kc.stride(-1) != 1 or vc.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, caches and block_tables need unit stride in their last dim")
    if out is None:
        out = torch.empty((B, H, dv), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if rope is not None:
        positions, inv_freq, slots, kn, vn = rope
        if inv_freq.shape != (hkv, dqk // 2) or dqk % 2:
            raise ValueError(f"inv_freq {tuple(inv_freq.shape)} does not match {hkv} KV heads of {dqk}")
        extra = (positions, inv_freq, slots, kn, vn)
        extra_strides = (inv_freq.stride(0), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1))
    else:
        extra = (context_lens,) * 5  # unused under ROPE=False
        extra_strides = (0,) * 5
    if dv == 0:  # nothing to attend into (the new key still goes to the cache)
        if rope is not None:
            rope_qkv_triton_(q.clone(), kn, vn, positions, inv_freq, k_cache, v_cache, slots)
        return out.zero_()
    group = H // hkv
    capacity = block_tables.shape[1] * block_size
    if max_context_len is not None:
        capacity = min(capacity, int(max_context_len))
    capacity = max(capacity, 1)
    # the RoPE variant writes one KV head per program (never packed): it keeps the unpacked choice
    cfg = _launch_config(config, auto_config(capacity, dqk, dv, B if rope is None else 1, group))
    hp = min(cfg["KV_PACK"], next_pow2(hkv)) if rope is None else 1  # RoPE writes one KV head per program
    packs = cdiv(hkv, hp)
    splits, part_len = plan_splits(B, packs, capacity, cfg["BLOCK_N"], q.device, num_splits)
    g_pad, dv_pad = max(16, next_pow2(group * hp)), max(16, next_pow2(dv))
    dqk0, dqk1 = dim_chunks(dqk, cfg["DIM_CHUNKS"] and rope is None)  # RoPE scores the two halves instead
    dv0, dv1 = dim_chunks(dv, cfg["DIM_CHUNKS"])
    meta = dict(G_PAD=g_pad, DQK0=dqk0, DQK1=dqk1, DV0=dv0, DV1=dv1, DV_PAD=dv_pad, BLOCK_N=cfg["BLOCK_N"],
                PRECISION=dot_precision(q.dtype), ROPE=rope is not None, HALF_PAD=max(16, next_pow2(dqk // 2)),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], HP=hp, **pdl_meta(q.device))
    meta.update(DQK=dqk, DV=dv, ALIGN_K=_alignment(kc), ALIGN_V=_alignment(vc))
    common = (q, kc, vc, block_tables, context_lens)
    sizes = (group, hkv, block_size, part_len, float(scale) * _LOG2E,
             q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
             vc.stride(0), vc.stride(1), vc.stride(2), block_tables.stride(0))
    s_pad = max(2, next_pow2(splits))
    if splits == 1:
        _start(_attn_partition_kernel, (B, packs, 1), compile_only,
            *common, out, out, *extra, out, context_lens, *sizes, out.stride(0), out.stride(1), 0, 0, 0,
            *extra_strides, 0, 0, SPLIT=False, FOLD=False, S_PAD=s_pad, **meta)
        return out
    part = workspace((B, H, splits, dv), q.device)
    lse = workspace((B, H, splits), q.device)
    fold = counters is not None
    if fold and (counters.dtype != torch.int32 or counters.numel() < B * hkv or not counters.is_contiguous()):
        raise ValueError(f"counters must be a contiguous int32 tensor of at least {B * hkv} zeros")
    _start(_attn_partition_kernel, (B, packs, splits), compile_only,
        *common, part, lse, *extra, out, counters if fold else context_lens, *sizes, part.stride(0), part.stride(1),
        part.stride(2), lse.stride(0), lse.stride(1), *extra_strides, out.stride(0), out.stride(1),
        SPLIT=True, FOLD=fold, S_PAD=s_pad, **meta)
    if not fold:
        _start(_combine_kernel, (B, H), compile_only,
            part, lse, out, splits, dv, part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            S_PAD=s_pad, DV_PAD=dv_pad, num_warps=4, **pdl_meta(q.device))
    return out
