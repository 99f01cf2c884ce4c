"""Triton: residual add + RMSNorm in one pass, and the SwiGLU epilogue ``silu(gate) * up``.

Why (docs/BENCHMARKS.md, H200 step profile): a LLaMA-7B decode step spends about 2.2 ms of its
6.8 ms inside the CUDA graph on work that does not scale with the weights: hundreds of small
launches. The PyTorch RMSNorm is seven element-wise kernels (cast, square, mean, rsqrt, multiply,
cast, scale) and each residual add one more; two norms and two adds per layer are 16 launches per
layer, 512 for 32 layers. ``add_rms_norm`` makes them two per layer; ``silu_mul`` turns the
activation's two launches into one.

Numerics follow the PyTorch sequence they replace (``server.engine.ops``) exactly:
``s = round(x + d)`` is the new residual stream; ``h = round(weight * round(s * rsqrt(mean(s^2) +
eps)))`` with the normalisation in fp32; ``silu_mul``: ``round(round(silu(g)) * u)``.
One program per row; the row is loaded whole (hidden sizes up to 16k fit one block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, pdl_meta
from ._tl import pdl_wait


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, h_ptr, n_cols, eps,
                         stride_x, stride_d, stride_s, stride_h,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: may load before the PDL wait
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # the residual stream, in the model dtype
        tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    else:
        s = x
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / n_cols
    normed = (sf * tl.math.rsqrt(var + eps)).to(x.dtype)
    h = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    tl.store(o_ptr + row * stride_o + cols, out, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, cols]`` with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        residual_out: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s) * weight)`` with ``s = x + delta`` (``s = x`` when ``delta`` is None)."""
    x2 = _rows(x)
    n_rows, n = x2.shape
    d2 = _rows(delta) if delta is not None else None
    s2 = residual_out.view(n_rows, n) if residual_out is not None else (
        torch.empty_like(x2) if delta is not None else x2)
    h2 = out.view(n_rows, n) if out is not None else torch.empty_like(x2)
    if n_rows:
        _add_rms_norm_kernel[(n_rows,)](
            x2, d2 if d2 is not None else x2, weight, s2, h2, n, float(eps),
            x2.stride(0), (d2 if d2 is not None else x2).stride(0), s2.stride(0), h2.stride(0),
            HAS_DELTA=delta is not None, BLOCK=next_pow2(n), num_warps=4 if n <= 4096 else 8, **pdl_meta(x2.device))
    return s2.view(x.shape), h2.view(x.shape)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (row-strided views, e.g. halves of a fused gate/up output, are fine)."""
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n = g2.shape
    o2 = out.view(n_rows, n) if out is not None else torch.empty((n_rows, n), dtype=gate.dtype, device=gate.device)
    block = min(1024, next_pow2(n))
    if n_rows:
        _silu_mul_kernel[(n_rows, triton.cdiv(n, block))](g2, u2, o2, n, g2.stride(0), u2.stride(0), o2.stride(0),
                                                          BLOCK=block, num_warps=4, **pdl_meta(g2.device))
    return o2.view(gate.shape)
