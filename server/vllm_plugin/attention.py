"""One ModeGPT attention layer on vLLM: per-layer q/k and v head dims, GQA, gathered RoPE, padding.

`qkv_proj` is a `QKVParallelLinear` with `head_size=qk_dim` and `v_head_size=v_dim` (the checkpoint's
own widths, so weights load unpadded). Before vLLM's `Attention` the heads are zero-padded to the
layer's backend head size (`shapes.padded_head_size`); after it the padded value columns are dropped,
and `o_proj` (`RowParallelLinear`) reads `heads * v_dim`. The softmax scale is that of the ORIGINAL
head dim (`config.head_dim ** -0.5`), whatever was kept.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig

from server.engine.ops import softmax_scale
from server.vllm_plugin.rope import GatheredRope
from server.vllm_plugin.shapes import AttentionShape


def _rank_kv_heads(qkv: QKVParallelLinear) -> list[int]:
    """Global indices of this rank's KV heads (split evenly, or replicated when TP > KV heads)."""
    if qkv.num_kv_head_replicas > 1:
        return [qkv.tp_rank // qkv.num_kv_head_replicas]
    return list(range(qkv.tp_rank * qkv.num_kv_heads, (qkv.tp_rank + 1) * qkv.num_kv_heads))


class ModeGPTAttention(nn.Module):
    def __init__(self, config, layer: dict, shape: AttentionShape, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.qk_dim, self.v_dim, self.head_size = shape.qk_dim, shape.v_dim, shape.head_size
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size, head_size=self.qk_dim, v_head_size=self.v_dim,
            total_num_heads=config.num_attention_heads, total_num_kv_heads=config.num_key_value_heads,
            bias=config.qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.n_heads, self.n_kv = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.splits = [self.n_heads * self.qk_dim, self.n_kv * self.qk_dim, self.n_kv * self.v_dim]
        self.o_proj = RowParallelLinear(
            input_size=config.num_attention_heads * self.v_dim, output_size=config.hidden_size,
            bias=config.o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rope = None
        if config.position_type == "rope":
            self.rope = GatheredRope(config.head_dim, config.rope_theta, config.rope_scaling_params,
                                     layer["qk_index"], _rank_kv_heads(self.qkv_proj), self.n_heads // self.n_kv)
        self.attn = Attention(self.n_heads, self.head_size, softmax_scale(config.head_dim), num_kv_heads=self.n_kv,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def _pad(self, x: Tensor) -> Tensor:
        """`[T, heads, d]` -> `[T, heads * head_size]`, zero-padded per head."""
        if x.shape[-1] != self.head_size:
            x = F.pad(x, (0, self.head_size - x.shape[-1]))
        return x.reshape(x.shape[0], -1)

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(self.splits, dim=-1)
        t = q.shape[0]
        q = q.reshape(t, self.n_heads, self.qk_dim)
        k = k.reshape(t, self.n_kv, self.qk_dim)
        if self.rope is not None:
            q, k = self.rope(positions, q, k)
        out = self.attn(self._pad(q), self._pad(k), self._pad(v.reshape(t, self.n_kv, self.v_dim)))
        if self.v_dim != self.head_size:
            out = out.view(t, self.n_heads, self.head_size)[..., : self.v_dim]
        out, _ = self.o_proj(out.reshape(t, self.n_heads * self.v_dim))
        return out
