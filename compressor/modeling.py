"""``ModeGPTForCausalLM``: the Hugging Face model class of a ModeGPT checkpoint.

One architecture covers every supported family (the family adapters map their weights onto it):
per-layer MLP widths, per-layer q/k and v head dimensions, GQA, RoPE at kept original frequencies or
learned positions, RMS or layer norm, optional biases, factorized linears and a factorized embedding /
LM head (shared when tied). The format is specified in ``docs/CHECKPOINT.md``. ``import compressor``
registers it with the ``Auto*`` classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a
checkpoint without ``trust_remote_code``.

This class is the reference implementation (evaluation, ``generate()``, calibration forwards). The
serving engine in ``server/engine`` has its own lean implementation of the same formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .rope import apply_rope, gathered_inv_freq, rope_inv_freq


_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ModeGPTConfig(PretrainedConfig):
    model_type = "modegpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        norm_type: str = "rms",
        norm_eps: float = 1e-6,
        mlp_type: str = "gated",
        hidden_act: str = "silu",
        position_type: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling_params: dict | None = None,
        position_offset: int = 0,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        layers: list[dict] | None = None,
        linear_ranks: dict[str, int] | None = None,
        modegpt: dict | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.mlp_type = mlp_type
        self.hidden_act = hidden_act
        self.position_type = position_type
        self.rope_theta = rope_theta
        self.rope_scaling_params = rope_scaling_params
        self.position_offset = position_offset
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.layers = layers or []
        self.linear_ranks = linear_ranks or {}
        self.modegpt = modegpt or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LowRankLinear(nn.Module):
    """``y = (x @ A.T) @ B.T + bias``: a linear stored as two factors of rank ``r``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)


class LowRankEmbedding(nn.Module):
    """``E[ids]`` for an embedding ``E ~ B A`` stored as factors ``A [r, dim]``, ``B [num, r]``: ``B[ids] @ A``.
    The same factors serve a tied LM head as a ``LowRankLinear`` (``logits = (h @ A.T) @ B.T``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.weight_a = nn.Parameter(torch.empty(rank, embedding_dim))
        self.weight_b = nn.Parameter(torch.empty(num_embeddings, rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_b) @ self.weight_a


def make_linear(config: ModeGPTConfig, path: str, n_in: int, n_out: int, bias: bool) -> nn.Module:
    rank = config.linear_ranks.get(path)
    return LowRankLinear(n_in, n_out, rank, bias) if rank is not None else nn.Linear(n_in, n_out, bias=bias)


def make_embedding(config: ModeGPTConfig) -> nn.Module:
    rank = config.linear_ranks.get("model.embed_tokens")
    if rank is None:
        return nn.Embedding(config.vocab_size, config.hidden_size)
    return LowRankEmbedding(config.vocab_size, config.hidden_size, rank)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModeGPTConfig) -> nn.Module:
    if config.norm_type == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class ModeGPTAttention(nn.Module):
    def __init__(self, config: ModeGPTConfig, layer_idx: int):
        super().__init__()
        spec = config.layers[layer_idx]
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.qk_dim, self.v_dim = spec["qk_dim"], spec["v_dim"]
        self.scale = config.head_dim**-0.5  # the ORIGINAL head dim: Q S S^T K^T approximates Q K^T
        self.rope = config.position_type == "rope"
        if self.rope:
            full = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_params)
            self.inv_freq = gathered_inv_freq(full, spec["qk_index"])  # plain tensor, not a buffer
        d, p = config.hidden_size, f"model.layers.{layer_idx}.self_attn."
        self.q_proj = make_linear(config, p + "q_proj", d, self.n_heads * self.qk_dim, config.qkv_bias)
        self.k_proj = make_linear(config, p + "k_proj", d, self.n_kv * self.qk_dim, config.qkv_bias)
        self.v_proj = make_linear(config, p + "v_proj", d, self.n_kv * self.v_dim, config.qkv_bias)
        self.o_proj = make_linear(config, p + "o_proj", self.n_heads * self.v_dim, d, config.o_bias)

    def forward(self, x, positions, mask, cache: Cache | None):
        b, t, _ = x.shape
        group = self.n_heads // self.n_kv
        q = self.q_proj(x).view(b, t, self.n_heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.v_dim).transpose(1, 2)
        if self.rope and self.qk_dim:
            inv = self.inv_freq.to(x.device)
            q = apply_rope(q, positions, inv.repeat_interleave(group, dim=0))
            k = apply_rope(k, positions, inv)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))


class ModeGPTMLP(nn.Module):
    def __init__(self, config: ModeGPTConfig, layer_idx: int):
        super().__init__()
        width, d, p = config.layers[layer_idx]["intermediate_size"], config.hidden_size, f"model.layers.{layer_idx}.mlp."
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = make_linear(config, p + "gate_proj", d, width, config.mlp_bias)
        self.up_proj = make_linear(config, p + "up_proj", d, width, config.mlp_bias)
        self.down_proj = make_linear(config, p + "down_proj", width, d, config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class ModeGPTDecoderLayer(nn.Module):
    def __init__(self, config: ModeGPTConfig, layer_idx: int):
        super().__init__()
        self.input_norm = make_norm(config)
        self.self_attn = ModeGPTAttention(config, layer_idx)
        self.post_attention_norm = make_norm(config)
        self.mlp = ModeGPTMLP(config, layer_idx)

    def forward(self, x, positions, mask, cache=None):
        x = x + self.self_attn(self.input_norm(x), positions, mask, cache)
        return x + self.mlp(self.post_attention_norm(x))


class ModeGPTPreTrainedModel(PreTrainedModel):
    config_class = ModeGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["ModeGPTDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, (LowRankLinear, LowRankEmbedding)):
            module.weight_a.data.normal_(0.0, std)
            module.weight_b.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


def positions_from_mask(attention_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
    """Position of each of the last ``t`` tokens: its index among the non-padding tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + t]


def causal_mask(attention_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
    """Boolean ``[B, 1, t, past + t]`` mask: causal, minus padding; a query always sees itself."""
    s = past + t
    i = torch.arange(t, device=attention_mask.device)[:, None] + past
    j = torch.arange(s, device=attention_mask.device)[None, :]
    allowed = (j <= i)[None] & attention_mask[:, None, :s].bool()
    allowed |= (j == i)[None]
    return allowed[:, None]


class ModeGPTModel(ModeGPTPreTrainedModel):
    def __init__(self, config: ModeGPTConfig):
        super().__init__(config)
        self.embed_tokens = make_embedding(config)
        if config.position_type == "learned":
            n_pos = config.max_position_embeddings + config.position_offset
            self.embed_positions = nn.Embedding(n_pos, config.hidden_size)
        self.layers = nn.ModuleList(ModeGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, t)
        if self.config.position_type == "learned":
            x = x + self.embed_positions(position_ids + self.config.position_offset)
        mask = causal_mask(attention_mask, past, t)
        for layer in self.layers:
            x = layer(x, position_ids, mask, past_key_values)
        return self.norm(x), past_key_values


class ModeGPTForCausalLM(ModeGPTPreTrainedModel, GenerationMixin):
    # every parameter of lm_head (weight, or weight_a / weight_b) ties to the embedding's of the same name
    _tied_weights_keys = {"lm_head": "model.embed_tokens"}

    def __init__(self, config: ModeGPTConfig):
        super().__init__(config)
        self.model = ModeGPTModel(config)
        # a tied head has the embedding's shape and factorization (docs/CHECKPOINT.md)
        head = "model.embed_tokens" if config.tie_word_embeddings else "lm_head"
        self.lm_head = make_linear(config, head, config.hidden_size, config.vocab_size, False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, inputs_embeds=None, logits_to_keep=0, cache=None, **kwargs):
        # transformers >= 5.2x calls the KV cache `cache`; earlier releases `past_key_values`
        cache = cache if cache is not None else past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, bool(use_cache), inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    @classmethod
    def from_modegpt(cls, config: dict | ModeGPTConfig, state_dict: dict[str, torch.Tensor]) -> "ModeGPTForCausalLM":
        """Build the model from a config dict and a state dict (weights are used as given, not copied)."""
        if isinstance(config, dict):
            config = ModeGPTConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if config.tie_word_embeddings:
            for name, _ in list(model.lm_head.named_parameters()):
                setattr(model.lm_head, name, getattr(model.model.embed_tokens, name))
            missing = [m for m in missing if not m.startswith("lm_head.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()
