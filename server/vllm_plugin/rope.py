"""RoPE at the kept original frequencies: every KV head of a ModeGPT layer has its own frequencies.

vLLM's `get_rope` rotates every head at the same frequencies, which a compressed layer does not
(docs/CHECKPOINT.md: kept dimension j of KV head g rotates at `inv_freq[qk_index[g][j] mod d/2]`).
The math is the serving engine's own (`server.engine.ops.rope_angles` / `apply_rope`, float32), on
vLLM's flat token layout `[T, heads, dim]`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from compressor.rope import rope_inv_freq
from server.engine.model import layer_rope_freqs
from server.engine.ops import apply_rope, rope_angles


class GatheredRope(nn.Module):
    """Rotates the query and key heads of one layer (on one tensor-parallel rank).

    `kv_heads` are the global indices of this rank's KV heads; the rank's query heads are the
    `group` heads reading each of them, in order (vLLM's QKVParallelLinear sharding).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, qk_index: list[list[int]],
                 kv_heads: list[int], group: int):
        super().__init__()
        with torch.device("cpu"):
            freqs = layer_rope_freqs(rope_inv_freq(head_dim, theta, scaling), qk_index, head_dim)  # [Hkv, qk/2]
            freqs = freqs[torch.tensor(kv_heads, dtype=torch.long)]
        self.group = group
        self.register_buffer("freqs", freqs.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q `[T, kv_heads * group, qk_dim]`, k `[T, kv_heads, qk_dim]` -> rotated, same shapes."""
        t, n_kv, dim = k.shape
        cos, sin = rope_angles(positions, self.freqs)
        q = apply_rope(q.view(t, n_kv, self.group, dim), cos, sin).view(t, n_kv * self.group, dim)
        k = apply_rope(k.view(t, n_kv, 1, dim), cos, sin).view(t, n_kv, dim)
        return q, k
