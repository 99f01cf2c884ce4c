"""Per-layer attention shapes of a ModeGPT checkpoint as vLLM's attention backends see them.

vLLM's `Attention` layer takes one head size for queries, keys and values, and a backend supports a
fixed set of head sizes (CPU: 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512; FlashAttention:
multiples of 8 up to 256). A ModeGPT layer keeps `qk_dim` query/key and `v_dim` value dimensions per
head (any integers), so each layer is given the smallest supported head size that holds both: q and k
are zero-padded (the dot products do not change), v is zero-padded and the padded output columns are
dropped before `o_proj`. Layers may get different head sizes; vLLM >= 0.11 keeps them in one KV-cache
group with per-layer specs. The cost is KV-cache bytes (and attention FLOPs): see `kv_bytes_per_token`.

Nothing here imports vLLM, so the project venv can report shapes and costs too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MAX_HEAD_SIZE = 1024


@dataclass(frozen=True)
class AttentionShape:
    qk_dim: int  # kept query/key dimensions per head
    v_dim: int  # kept value dimensions per head
    head_size: int  # what the attention backend and the KV cache get per head, for K and for V

    @property
    def padded(self) -> bool:
        return self.head_size != self.qk_dim or self.head_size != self.v_dim


def padded_head_size(qk_dim: int, v_dim: int, supports: Callable[[int], bool]) -> int:
    """The smallest head size >= max(qk_dim, v_dim) that the backend supports."""
    need = max(qk_dim, v_dim, 1)
    for size in range(need, MAX_HEAD_SIZE + 1):
        if supports(size):
            return size
    raise ValueError(f"no supported attention head size >= {need} (tried up to {MAX_HEAD_SIZE})")


def attention_shapes(config: dict, supports: Callable[[int], bool]) -> list[AttentionShape]:
    out = []
    for i, layer in enumerate(config["layers"]):
        qk, v = int(layer["qk_dim"]), int(layer["v_dim"])
        if qk <= 0 or v <= 0:
            raise NotImplementedError(f"layer {i}: qk_dim={qk}, v_dim={v}; layers without attention are not supported")
        out.append(AttentionShape(qk, v, padded_head_size(qk, v, supports)))
    return out


def kv_bytes_per_token(config: dict, shapes: list[AttentionShape], dtype_bytes: int, padded: bool = True) -> int:
    """KV-cache bytes per token over all layers (all KV heads, one copy: per GPU divide by TP where
    KV heads are split). `padded=False` gives what the checkpoint itself needs (K: qk_dim, V: v_dim)."""
    n_kv = int(config["num_key_value_heads"])
    per_head = (lambda s: 2 * s.head_size) if padded else (lambda s: s.qk_dim + s.v_dim)
    return sum(n_kv * per_head(s) * dtype_bytes for s in shapes)


def padding_report(config: dict, supports: Callable[[int], bool], dtype_bytes: int) -> dict:
    """What padding costs for this checkpoint on a backend: per-layer head sizes and KV bytes/token."""
    shapes = attention_shapes(config, supports)
    padded = kv_bytes_per_token(config, shapes, dtype_bytes, padded=True)
    unpadded = kv_bytes_per_token(config, shapes, dtype_bytes, padded=False)
    return {"head_sizes": [s.head_size for s in shapes], "padded_layers": sum(s.padded for s in shapes),
            "kv_bytes_per_token_padded": padded, "kv_bytes_per_token_unpadded": unpadded,
            "kv_padding_overhead": round(padded / unpadded - 1, 4)}


def tensor_parallel_problems(config: dict, tp: int) -> list[str]:
    """Why the checkpoint cannot be split over `tp` ranks (empty when it can).

    Query heads split evenly; KV heads split evenly or are replicated (tp a multiple of their count);
    every layer's MLP width splits evenly. Per-head dims (qk_dim, v_dim) are never split.
    """
    problems = []
    n_heads, n_kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    if n_heads % tp:
        problems.append(f"num_attention_heads={n_heads} is not divisible by {tp}")
    if n_kv % tp and tp % n_kv:
        problems.append(f"num_key_value_heads={n_kv} neither divides nor is divisible by {tp}")
    widths = [(i, int(layer["intermediate_size"])) for i, layer in enumerate(config["layers"])]
    bad = [f"{i}:{w}" for i, w in widths if w % tp]
    if bad:
        problems.append(f"MLP widths not divisible by {tp} (layer:width) {', '.join(bad[:8])}"
                        + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    return problems


def check_tensor_parallel(config: dict, tp: int) -> None:
    problems = tensor_parallel_problems(config, tp)
    if problems:
        raise ValueError(f"this ModeGPT checkpoint cannot run with tensor_parallel_size={tp}: " + "; ".join(problems))
