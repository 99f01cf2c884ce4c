"""Rotary position embedding frequencies, including the gather at kept dimensions.

A ModeGPT layer keeps, for each KV head, a subset of the original rotary pairs (``qk_index`` in the
config, rotate-half layout ``[p_1..p_m, p_1+d/2..p_m+d/2]``). Kept dimension ``j`` keeps its original
frequency ``inv_freq[qk_index[j] mod d/2]``, so the compressed head rotates exactly like the
original restricted to the kept coordinates.
"""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The ``head_dim // 2`` inverse frequencies, with HF's ``linear`` and ``llama3`` scaling.

    Computed in float32 exactly as transformers does, so an uncompressed model matches it bit for bit.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def gathered_inv_freq(inv_freq: torch.Tensor, qk_index: list[list[int]]) -> torch.Tensor:
    """Per-KV-head inverse frequencies of the kept pairs: ``[Hkv, qk_dim // 2]``.

    ``qk_index[g]`` is in rotate-half layout, so its first half names the kept pairs.
    """
    half = inv_freq.shape[0]
    idx = torch.tensor([row[: len(row) // 2] for row in qk_index], dtype=torch.long, device="cpu")
    return inv_freq[idx % half]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, d]`` at ``positions [B, T]`` with per-head ``inv_freq [heads, d/2]``."""
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq.to(torch.float32)[None, :, None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin
