"""Triton gathered RoPE: rotate projection outputs and write them straight into the KV cache.

One program per (token, block of heads). It loads the token's position, the rotary frequencies
of each head's KV head (``inv_freq[h // group]``: MoDeGPT keeps a different subset of rotary pairs
per KV head, so frequencies are gathered, not shared), rotates the two halves (rotate-half
pairing ``(i, i + d/2)``) in fp32 and stores to the destination row: the same token row (queries,
in place allowed) or the cache slot ``slot_mapping[t]`` (keys; slots < 0 are skipped, e.g. padding
tokens). Values can ride along (``v``/``v_out``): the same slot, no rotation, so one launch
replaces rope + two cache copies. ``rope_qkv_triton_`` does a layer's queries (in place), keys
and values in ONE launch: its programs past the query blocks take the key heads. The kernel is a
pure stream (read x once, write once) of a few KB per decode token, so it is latency-bound: each
program takes about 256 rotated pairs (a few heads), which spreads even one token over a dozen
programs. Nothing is autotuned.

Angles: ``fp32(position * inv_freq)``, the value HF computes; cos/sin then see angles up to
~1e5 rad, where hardware approximations (``sin.approx``) lose accuracy, so the angle is first
reduced to [-pi, pi] with a two-constant (Cody-Waite) 2*pi, adding ~1e-7 absolute error.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, pdl_meta
from ._tl import pdl_wait
from .reference import _flat_cache

@triton.jit
def rope_cos_sin(pos, f):
    """``(cos, sin)`` of the fp32 angles ``pos * f``, reduced to [-pi, pi] first (module doc)."""
    ang = pos * f
    # 2*pi = 6.28125 + 0.00193530717958647...; k * 6.28125 is exact in fp32 for |k| < 2^16
    k = tl.floor(ang * 0.15915494309189535 + 0.5)
    red = (ang - k * 6.28125) - k * 0.0019353071795864769
    return tl.cos(red), tl.sin(red)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, freq_ptr, pos, src, dst, offs_h, h_mask, group, half, stride_xh, stride_f,
                  stride_oh, HALF_PAD: tl.constexpr):
    """Rotate heads ``offs_h`` of token row ``src`` of x into row ``dst`` of out (fp32 math)."""
    offs_i = tl.arange(0, HALF_PAD)
    mask = h_mask[:, None] & (offs_i < half)[None, :]
    f = tl.load(freq_ptr + (offs_h // group)[:, None] * stride_f + offs_i[None, :], mask=mask, other=0.0)
    c, s = rope_cos_sin(pos, f)
    xp = x_ptr + src + offs_h[:, None] * stride_xh + offs_i[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
    op = out_ptr + dst + offs_h[:, None] * stride_oh + offs_i[None, :]
    tl.store(op, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + half, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(v_ptr, vout_ptr, src, dst, offs_h, h_mask, dv, stride_vh, stride_voh, DV_PAD: tl.constexpr):
    offs_d = tl.arange(0, DV_PAD)
    vmask = h_mask[:, None] & (offs_d < dv)[None, :]
    vv = tl.load(v_ptr + src + offs_h[:, None] * stride_vh + offs_d[None, :], mask=vmask, other=0.0)
    tl.store(vout_ptr + dst + offs_h[:, None] * stride_voh + offs_d[None, :], vv.to(vout_ptr.dtype.element_ty),
             mask=vmask)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, freq_ptr, out_ptr, slot_ptr, v_ptr, vout_ptr,
                 heads, group, half, dv,
                 stride_xt, stride_xh, stride_f, stride_ot, stride_oh,
                 stride_vt, stride_vh, stride_vot, stride_voh,
                 HAS_SLOTS: tl.constexpr, HAS_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HALF_PAD: tl.constexpr, DV_PAD: tl.constexpr, PDL: tl.constexpr):
    tok = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pdl_wait(PDL)
    h_mask = offs_h < heads
    if HAS_SLOTS:
        dst = tl.load(slot_ptr + tok).to(tl.int64)
    else:
        dst = tok.to(tl.int64)
    if dst >= 0:
        pos = tl.load(pos_ptr + tok).to(tl.float32)
        t64 = tok.to(tl.int64)
        _rotate_heads(x_ptr, out_ptr, freq_ptr, pos, t64 * stride_xt, dst * stride_ot, offs_h, h_mask, group,
                      half, stride_xh, stride_f, stride_oh, HALF_PAD)
        if HAS_V:
            _copy_heads(v_ptr, vout_ptr, t64 * stride_vt, dst * stride_vot, offs_h, h_mask, dv, stride_vh,
                        stride_voh, DV_PAD)


@triton.jit
def _rope_qkv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, slot_ptr, kc_ptr, vc_ptr,
                     num_q_heads, num_kv_heads, group, half, dv, q_blocks,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_f,
                     stride_kcs, stride_kch, stride_vcs, stride_vch,
                     BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, DV_PAD: tl.constexpr, PDL: tl.constexpr):
    """One launch for a layer's decode/prefill tokens: programs ``[0, q_blocks)`` of axis 1 rotate
    query heads in place, the rest rotate key heads into their cache slot and copy the values there."""
    tok = tl.program_id(0)
    blk = tl.program_id(1)
    pdl_wait(PDL)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    t64 = tok.to(tl.int64)
    if blk < q_blocks:
        offs_h = blk * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr, q_ptr, freq_ptr, pos, t64 * stride_qt, t64 * stride_qt, offs_h, offs_h < num_q_heads,
                      group, half, stride_qh, stride_f, stride_qh, HALF_PAD)
    else:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            offs_h = (blk - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_mask = offs_h < num_kv_heads
            _rotate_heads(k_ptr, kc_ptr, freq_ptr, pos, t64 * stride_kt, slot * stride_kcs, offs_h, h_mask, 1,
                          half, stride_kh, stride_f, stride_kch, HALF_PAD)
            _copy_heads(v_ptr, vc_ptr, t64 * stride_vt, slot * stride_vcs, offs_h, h_mask, dv, stride_vh,
                        stride_vch, DV_PAD)


def _rows(t: torch.Tensor, T: int, heads: int, d: int, what: str) -> torch.Tensor:
    """View ``t`` (``[T, heads*d]`` or ``[T, heads, d]``, any row stride) as ``[T, heads, d]``
    with unit stride inside a head."""
    r = t.view(T, heads, d) if t.dim() == 2 else t
    if r.shape != (T, heads, d) or r.stride(-1) != 1:
        raise ValueError(f"{what}: expected [T={T}, {heads}*{d}] with unit last stride, got "
                         f"{tuple(t.shape)} strides {t.stride()}")
    return r


def _block_heads(heads: int, half_pad: int, dv_pad: int) -> int:
    """Heads per program: about 256 rotated pairs, so a decode step's few tokens still spread over
    many programs (one program per token measured 4.9 us per launch on the H200, latency-bound)."""
    return max(1, min(next_pow2(heads), 256 // max(half_pad, dv_pad // 2)))


def rope_qkv_triton_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.rope_qkv_` (same contract): one launch."""
    T = positions.shape[0]
    hkv, half = inv_freq.shape
    d = 2 * half
    if inv_freq.dtype != torch.float32 or inv_freq.stride(-1) != 1:
        raise TypeError("inv_freq must be float32 [Hkv, d/2] with unit last stride")
    H = q.shape[-1] // d if q.dim() == 2 else q.shape[1]
    if H % hkv or H == 0:
        raise ValueError(f"{H} query heads do not group over {hkv} KV heads")
    qr = _rows(q, T, H, d, "q")
    kr = _rows(k, T, hkv, d, "k")
    kc, vc = _flat_cache(k_cache), _flat_cache(v_cache)
    dv = vc.shape[-1]
    vr = _rows(v, T, hkv, dv, "v")
    if kc.shape[1:] != (hkv, d) or vc.shape[:2] != kc.shape[:2] or kc.stride(-1) != 1 or vc.stride(-1) != 1:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold {hkv} heads of "
                         f"{d} / {dv}")
    if slot_mapping.shape != (T,):
        raise ValueError(f"slot_mapping must be [{T}], got {tuple(slot_mapping.shape)}")
    if T == 0:
        return q
    half_pad = max(2, next_pow2(half))
    dv_pad = max(2, next_pow2(dv))
    block_h = _block_heads(H, half_pad, dv_pad)
    q_blocks = triton.cdiv(H, block_h)
    grid = (T, q_blocks + triton.cdiv(hkv, block_h))
    _rope_qkv_kernel[grid](
        qr, kr, vr, positions, inv_freq, slot_mapping, kc, vc, H, hkv, H // hkv, half, dv, q_blocks,
        qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1), inv_freq.stride(0),
        kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        BLOCK_H=block_h, HALF_PAD=half_pad, DV_PAD=dv_pad, num_warps=2, **pdl_meta(q.device))
    return q


def rope_gather_triton_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                        out: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                        v: torch.Tensor | None = None, v_out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of :func:`kernels.dispatch.rope_gather_` (same contract)."""
    T = positions.shape[0]
    hkv, half = inv_freq.shape
    d = 2 * half
    heads = x.shape[-1] // d if x.dim() == 2 else x.shape[1]
    if heads % hkv or heads == 0:
        raise ValueError(f"{heads} heads do not group over {hkv} KV heads")
    if inv_freq.dtype != torch.float32 or inv_freq.stride(-1) != 1:
        raise TypeError("inv_freq must be float32 [Hkv, d/2] with unit last stride")
    xr = _rows(x, T, heads, d, "x")
    if slot_mapping is None:
        dst = _rows(out, T, heads, d, "out")
    else:
        dst = _flat_cache(out)
        if dst.shape[1:] != (heads, d) or dst.stride(-1) != 1 or slot_mapping.shape != (T,):
            raise ValueError(f"cache {tuple(out.shape)} does not hold {heads} heads of {d}")
    has_v = v is not None
    if has_v:
        if v_out is None:
            raise ValueError("v needs v_out")
        vdst = _flat_cache(v_out) if slot_mapping is not None else v_out.view(T, heads, -1)
        dv = vdst.shape[-1]
        vr = _rows(v, T, heads, dv, "v")
    else:
        vdst, vr, dv = dst, xr, 1
    if T == 0:
        return out
    half_pad = max(2, next_pow2(half))
    dv_pad = max(2, next_pow2(dv))
    block_h = _block_heads(heads, half_pad, dv_pad)
    grid = (T, triton.cdiv(heads, block_h))
    _rope_kernel[grid](
        xr, positions, inv_freq, dst, slot_mapping if slot_mapping is not None else positions, vr, vdst,
        heads, heads // hkv, half, dv,
        xr.stride(0), xr.stride(1), inv_freq.stride(0), dst.stride(0), dst.stride(1),
        vr.stride(0), vr.stride(1), vdst.stride(0), vdst.stride(1),
        HAS_SLOTS=slot_mapping is not None, HAS_V=has_v, BLOCK_H=block_h,
        HALF_PAD=half_pad, DV_PAD=dv_pad, num_warps=2, **pdl_meta(x.device))
    return out
