"""`ModeGPTForCausalLM` for vLLM: the architecture of docs/CHECKPOINT.md on vLLM's parallel layers.

Read from the checkpoint's `config.json` (a `compressor.ModeGPTConfig`, registered with transformers
by the plugin): per-layer MLP widths, per-layer q/k and v head dims with gathered RoPE, GQA, RMS or
layer norm, learned or rotary positions, optional biases, tied embeddings. Like vLLM's DeciLM
(Nemotron-NAS), each decoder layer builds its own shapes; vLLM keeps one KV-cache spec per layer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.selector import get_attn_backend

from server.vllm_plugin.attention import ModeGPTAttention
from server.vllm_plugin.mlp import ModeGPTMLP
from server.vllm_plugin.shapes import attention_shapes, check_tensor_parallel
from server.vllm_plugin.weights import load_weights


def make_norm(config) -> nn.Module:
    if config.norm_type == "rms":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def attention_backend(head_dim: int, dtype: torch.dtype, cache_dtype: str = "auto"):
    """The attention backend class vLLM picks for the model's ORIGINAL head dim; its
    `supports_head_size` decides the padding. Needs a current vLLM config (model init has one)."""
    return get_attn_backend(head_dim, dtype, cache_dtype)


class ModeGPTDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, index: int, shape, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        layer = config.layers[index]
        self.input_norm = make_norm(config)
        self.self_attn = ModeGPTAttention(config, layer, shape, vllm_config.cache_config, vllm_config.quant_config,
                                          prefix=f"{prefix}.self_attn")
        self.post_attention_norm = make_norm(config)
        self.mlp = ModeGPTMLP(config, int(layer["intermediate_size"]), vllm_config.quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        x = x + self.self_attn(positions, self.input_norm(x))
        return x + self.mlp(self.post_attention_norm(x))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class ModeGPTModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        plain = config.to_dict()
        check_tensor_parallel(plain, get_tensor_model_parallel_world_size())
        cache_dtype = vllm_config.cache_config.cache_dtype if vllm_config.cache_config else "auto"
        backend = attention_backend(config.head_dim, torch.get_default_dtype(), cache_dtype)
        self.shapes = attention_shapes(plain, backend.supports_head_size)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.position_offset, self.embed_positions = 0, None
        if config.position_type == "learned":
            self.position_offset = int(config.position_offset)
            self.embed_positions = nn.Embedding(config.max_position_embeddings + self.position_offset,
                                                config.hidden_size)
        self.layers = nn.ModuleList(
            ModeGPTDecoderLayer(vllm_config, i, shape, prefix=f"{prefix}.layers.{i}")
            for i, shape in enumerate(self.shapes))
        self.norm = make_norm(config)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.position_offset)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class ModeGPTForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ModeGPTModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return load_weights(self, weights, dict(self.config.linear_ranks or {}),
                            gated=self.config.mlp_type == "gated", tied=bool(self.config.tie_word_embeddings))
