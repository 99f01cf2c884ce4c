"""Global sparsity allocation and the kept sizes of each layer.

MoDeGPT (Sec. 3.3) allocates per-layer sparsity ``phi = L * phi_avg * softmax(-s / eps)`` from the
Block Influence scores ``s`` (ShortGPT: ``1 - E[cos(x_l, x_{l+1})]``): layers that change the residual
stream little are compressed more. The closed form has no upper bound, so a per-layer cap is applied
and the excess is redistributed over the uncapped layers in proportion to their share.

Kept sizes are then rounded (MLP widths and head dims to hardware-friendly multiples, q/k dims to whole RoPE pairs)
and the MLP widths are nudged so that the removed fraction of decoder-block linear parameters matches
the requested ratio.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, chunk: int = 8192) -> tuple[float, int]:
    """Sum over tokens of ``1 - cos(x_in, x_out)`` and the token count (to be averaged by the caller).

    Computed in float64 a chunk of tokens at a time, so it never holds a float64 copy of the stream.
    """
    a, b = x_in.flatten(0, -2), x_out.flatten(0, -2)
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        cos = torch.nn.functional.cosine_similarity(a[s : s + chunk].double(), b[s : s + chunk].double(), dim=-1)
        total += float((1.0 - cos).sum())
    return total, a.shape[0]


def allocate(scores: list[float], ratio: float, eps: float = 0.1, cap: float = 0.8, method: str = "bi") -> list[float]:
    """Per-layer sparsity with mean exactly ``ratio``; ``method`` is ``"bi"`` or ``"uniform"``."""
    n = len(scores)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if method == "uniform" or ratio == 0.0:
        return [ratio] * n
    if method != "bi":
        raise ValueError(f"unknown allocation {method!r}; use 'bi' or 'uniform'")
    if ratio > cap:
        raise ValueError(f"ratio {ratio} is above the per-layer cap {cap}")
    weights = torch.softmax(-torch.tensor(scores, dtype=torch.float64) / eps, dim=0)
    phi = n * ratio * weights
    capped = torch.zeros(n, dtype=torch.bool)
    while bool((phi > cap + 1e-12).any()):
        capped |= phi > cap
        excess = float((phi[capped] - cap).sum())
        phi[capped] = cap
        free = ~capped
        phi[free] += excess * weights[free] / weights[free].sum()
    return phi.tolist()


@dataclass
class LayerSizes:
    intermediate_size: int
    qk_dim: int
    v_dim: int


def _layer_params(d_h: int, heads: int, kv: int, mlp_mats: int, s: LayerSizes) -> int:
    return (mlp_mats * d_h * s.intermediate_size + (heads + kv) * d_h * s.qk_dim + (kv + heads) * d_h * s.v_dim)


# auto alignment (`resolve_alignment`): models whose narrowest MLP is at least this wide round kept widths
# to 128 and head dims to 16; smaller ones to 8 and 8
WIDE_MLP = 2048


def resolve_alignment(cfg: dict, align: int | None = None, head_align: int | None = None) -> tuple[int, int]:
    """The rounding of kept sizes: the given values, or (None) by model size. A model with an MLP at least
    `WIDE_MLP` wide (LLaMA-2-7B: 11008) rounds MLP widths to 128 and head dims to 16: on the H200 that
    made the 30 % checkpoint of LLaMA-2-7B 1.04x faster at batch 256 and 1.01-1.03x at 1-64 than widths
    rounded to 8 (cuBLAS tiles; docs/BENCHMARKS.md, session 9), and on SmolLM2-135M at 25 % the same
    rounding (coarser there: 128 of 1536) cost no quality (docs/COMPRESSION.md). Smaller models keep 8
    and 8 (the finest sizes whose bf16 cache rows stay 16-byte aligned)."""
    wide = min(layer["intermediate_size"] for layer in cfg["layers"]) >= WIDE_MLP
    return (align if align is not None else (128 if wide else 8),
            head_align if head_align is not None else (16 if wide else 8))


def kept_sizes(phi: list[float], cfg: dict, align: int = 8, rope_pairs: bool = True,
               head_align: int = 8) -> list[LayerSizes]:
    """Round ``(1 - phi_l)`` of each module's inner size, then hold the total ratio with MLP widths.

    MLP widths round to multiples of ``align``; kept q/k and v head dims to multiples of ``head_align``
    (q/k also to whole rotary pairs): a 16-byte-aligned bf16 cache row is what lets the decode
    attention kernel stream the cache at full bandwidth (kernels/NOTES.md: 46/38 dims ran at 0.42 TB/s
    against 4 TB/s for 64). ``head_align=1`` gives the finest sizes."""
    d_h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["head_dim"]
    mlp_mats = 3 if cfg["mlp_type"] == "gated" else 2
    widths = [layer["intermediate_size"] for layer in cfg["layers"]]
    pair = 2 if rope_pairs else 1
    qk_step = math.lcm(pair, head_align)

    def round_to(x: float, m: int, hi: int) -> int:
        return int(min(hi, max(m, m * round(x / m))))

    sizes = []
    for p, width in zip(phi, widths):
        keep = 1.0 - p
        sizes.append(LayerSizes(
            intermediate_size=width if p == 0 else round_to(keep * width, align, width),
            qk_dim=round_to(keep * head_dim, qk_step, head_dim),
            v_dim=round_to(keep * head_dim, head_align, head_dim),
        ))
    full = [LayerSizes(w, head_dim, head_dim) for w in widths]
    target = sum((1 - p) * _layer_params(d_h, heads, kv, mlp_mats, f) for p, f in zip(phi, full))
    unit = align * mlp_mats * d_h
    # nudge MLP widths (one alignment unit at a time) towards the target parameter count
    for _ in range(4 * len(sizes) * max(1, max(widths) // align)):
        kept = sum(_layer_params(d_h, heads, kv, mlp_mats, s) for s in sizes)
        gap = kept - target
        if abs(gap) <= unit / 2:
            break
        step = -align if gap > 0 else align
        # the layer whose realised keep-fraction is furthest from planned, in the needed direction
        def err(i: int) -> float:
            return (sizes[i].intermediate_size / widths[i]) - (1 - phi[i])
        candidates = [i for i in range(len(sizes)) if phi[i] > 0 and 0 < sizes[i].intermediate_size + step <= widths[i]]
        if not candidates:
            break
        i = max(candidates, key=err) if step < 0 else min(candidates, key=err)
        sizes[i].intermediate_size += step
    return sizes


def realised_ratio(cfg_full: dict, sizes: list[LayerSizes]) -> float:
    d_h, heads, kv = cfg_full["hidden_size"], cfg_full["num_attention_heads"], cfg_full["num_key_value_heads"]
    mlp_mats = 3 if cfg_full["mlp_type"] == "gated" else 2
    head_dim = cfg_full["head_dim"]
    full = sum(_layer_params(d_h, heads, kv, mlp_mats, LayerSizes(l["intermediate_size"], head_dim, head_dim))
               for l in cfg_full["layers"])
    kept = sum(_layer_params(d_h, heads, kv, mlp_mats, s) for s in sizes)
    return 1.0 - kept / full

