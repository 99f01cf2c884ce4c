"""Plain PyTorch implementations of the kernels' contracts.

These are the CPU path (and the fallback whenever Triton is unavailable or disabled with
``MODEGPT_KERNELS=torch``). They define the semantics the Triton kernels must match, compute in
fp32 (like the kernels' accumulators) and return the input dtype. They favour clarity over speed.
"""
from __future__ import annotations

import torch


def lowrank_linear_torch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = (x @ A.T) @ B.T + bias`` with A ``[r, in]``, B ``[out, r]``; any leading dims on x.

    16-bit inputs: two matmuls in the input dtype (fp32 accumulation inside the matmuls), exactly
    the unfused sequence the Triton kernel replaces. The intermediate is rounded to the input
    dtype between the two products, as in the kernel.
    """
    t = torch.matmul(x, A.t())
    y = torch.matmul(t, B.t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    if out is not None:
        return out.copy_(y)
    return y


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kernels.dispatch.linear`: cuBLAS (``F.linear``)."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y if out is None else out.copy_(y)


def _flat_cache(cache: torch.Tensor) -> torch.Tensor:
    """View a ``[num_slots, heads, d]`` or paged ``[num_blocks, block_size, heads, d]`` cache as
    ``[num_slots, heads, d]`` (slot = block * block_size + offset)."""
    if cache.dim() == 4:
        return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3])
    if cache.dim() != 3:
        raise ValueError(f"cache must be 3-D or 4-D, got shape {tuple(cache.shape)}")
    return cache


def apply_rope_torch(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` ``[T, heads, d]`` in fp32; head h uses ``inv_freq[h // group]``."""
    T, heads, d = x.shape
    hkv, half = inv_freq.shape
    group = heads // hkv
    freqs = inv_freq.float().repeat_interleave(group, dim=0)  # [heads, half]
    ang = positions.float()[:, None, None] * freqs[None]  # [T, heads, half]
    cos, sin = torch.cos(ang), torch.sin(ang)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_gather_torch_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                       out: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                       v: torch.Tensor | None = None, v_out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kernels.dispatch.rope_gather_` (see there for the contract)."""
    hkv, half = inv_freq.shape
    d = 2 * half
    T = positions.shape[0]
    xr = x.reshape(T, -1, d)
    rot = apply_rope_torch(xr, positions, inv_freq).to(out.dtype)
    if slot_mapping is None:
        out.view(T, -1, d).copy_(rot)
        if v is not None:
            v_out.view(T, *v_out.shape[-2:]).copy_(v.reshape(T, v_out.shape[-2], v_out.shape[-1]))
        return out
    slots = slot_mapping.long()
    keep = slots >= 0
    flat = _flat_cache(out)
    flat[slots[keep]] = rot[keep]
    if v is not None:
        vflat = _flat_cache(v_out)
        vr = v.reshape(T, vflat.shape[1], vflat.shape[2]).to(vflat.dtype)
        vflat[slots[keep]] = vr[keep]
    return out


def rope_qkv_torch_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`kernels.dispatch.rope_qkv_`: queries in place, keys and values to the cache."""
    T, d = positions.shape[0], 2 * inv_freq.shape[-1]
    qh = q.view(T, -1, d)
    rope_gather_torch_(qh, positions, inv_freq, qh)
    rope_gather_torch_(k, positions, inv_freq, k_cache, slot_mapping, v, v_cache)
    return qh


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kernels.dispatch.decode_attention`.

    Gathers every sequence's keys and values through its block table up to the table's capacity
    (``block_tables.shape[1] * block_size``), masks positions ``>= context_lens[b]``, fp32 softmax,
    GQA by grouping query heads over their KV head. An empty context gives a zero output. No host
    synchronisation, so it is CUDA-graph capturable (but it reads the whole table's capacity).
    """
    B, H, dqk = q.shape
    kc = k_cache if k_cache.dim() == 4 else k_cache.unsqueeze(1)
    vc = v_cache if v_cache.dim() == 4 else v_cache.unsqueeze(1)
    block_size, hkv, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    group = H // hkv
    cap = block_tables.shape[1] * block_size
    pos = torch.arange(cap, device=q.device)
    blocks = block_tables[:, pos // block_size].long()  # [B, cap]
    k = kc[blocks, pos % block_size].float()  # [B, cap, hkv, dqk]
    v = vc[blocks, pos % block_size].float()  # [B, cap, hkv, dv]
    qg = q.float().reshape(B, hkv, group, dqk)  # q may be a row-strided view (of a fused q/k/v output)
    s = torch.einsum("bgqd,bngd->bgqn", qg, k) * scale  # [B, hkv, group, cap]
    valid = pos[None, :] < context_lens.long()[:, None]  # [B, cap]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty context: all -inf -> NaN -> 0
    o = torch.einsum("bgqn,bngd->bgqd", p, v).reshape(B, H, dv)
    if out is None:
        return o.to(q.dtype)
    out.copy_(o)
    return out


def rope_decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kernels.dispatch.rope_decode_attention`: :func:`rope_qkv_torch_` on a copy
    of the queries, then :func:`decode_attention_torch`."""
    qr = rope_qkv_torch_(q.clone(), k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    return decode_attention_torch(qr, k_cache, v_cache, block_tables, context_lens, scale, out)


def add_rms_norm_torch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       residual_out: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (rounded to x's dtype; ``x`` itself when ``delta`` is None) and HF Llama's
    RMSNorm of it: normalise in fp32, round, scale by ``weight``. Returns ``(s, h)``."""
    s = x if delta is None else x + delta
    sf = s.float()
    h = weight * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    if residual_out is not None and delta is not None:
        s = residual_out.copy_(s)
    if out is not None:
        h = out.copy_(h)
    return s, h


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``, each step rounded to the input dtype (the unfused PyTorch sequence)."""
    y = torch.nn.functional.silu(gate) * up
    return y if out is None else out.copy_(y)
