"""Per-family adapters: how a Hugging Face architecture maps onto the ModeGPT representation.

An adapter is data, not a pipeline: a function from the HF config to the ModeGPT config fields, and
the HF name of every ModeGPT weight. Everything else (calibration, decomposition, checkpointing,
serving) is shared and never sees the family. Adding a family means adding one small adapter here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config: Callable[[dict], dict]  # HF config dict -> ModeGPT global fields
    global_names: dict[str, str]  # ModeGPT name -> HF name
    layer_names: dict[str, str]  # ModeGPT name (after "model.layers.{i}.") -> HF name with "{i}"


def _rope_fields(hf: dict) -> dict:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    return {"position_type": "rope", "rope_theta": float(theta), "rope_scaling_params": scaling}


def _llama_config(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return {
        "norm_type": "rms",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "mlp_type": "gated",
        "hidden_act": hf.get("hidden_act", "silu"),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        **_rope_fields(hf),
    }


def _qwen2_config(hf: dict) -> dict:
    # Qwen2: q/k/v carry biases, o_proj does not. The value bias folds into an o_proj bias when
    # compressed, so the ModeGPT layer has o_bias (zero-initialised for the identity conversion).
    return {**_llama_config(hf), "qkv_bias": True, "o_bias": True, "mlp_bias": False}


def _opt_config(hf: dict) -> dict:
    if not hf.get("do_layer_norm_before", True):
        raise ValueError("OPT with do_layer_norm_before=False (opt-350m) is not supported")
    if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
        raise ValueError("OPT with word_embed_proj_dim != hidden_size (opt-350m) is not supported")
    heads = hf["num_attention_heads"]
    return {
        "norm_type": "layer",
        "norm_eps": 1e-5,
        "mlp_type": "plain",
        "hidden_act": hf.get("activation_function", "relu"),
        "head_dim": hf["hidden_size"] // heads,
        "num_key_value_heads": heads,
        "qkv_bias": bool(hf.get("enable_bias", True)),
        "o_bias": bool(hf.get("enable_bias", True)),
        "mlp_bias": bool(hf.get("enable_bias", True)),
        "position_type": "learned",
        "position_offset": 2,
        "intermediate_size": hf["ffn_dim"],
    }


_LLAMA_LAYER = {
    "input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LLAMA_BIASES = {k.replace(".weight", ".bias"): v.replace(".weight", ".bias")
                 for k, v in _LLAMA_LAYER.items() if "proj" in k}
_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

_OPT_LAYER = {}
for _ours, _theirs in {
    "input_norm": "self_attn_layer_norm",
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.o_proj": "self_attn.out_proj",
    "post_attention_norm": "final_layer_norm",
    "mlp.up_proj": "fc1",
    "mlp.down_proj": "fc2",
}.items():
    for _p in ("weight", "bias"):
        _OPT_LAYER[f"{_ours}.{_p}"] = f"model.decoder.layers.{{i}}.{_theirs}.{_p}"

FAMILIES = [
    Family("llama", ("llama", "mistral"), _llama_config, _LLAMA_GLOBAL, {**_LLAMA_LAYER, **_LLAMA_BIASES}),
    Family("qwen2", ("qwen2",), _qwen2_config, _LLAMA_GLOBAL, {**_LLAMA_LAYER, **_LLAMA_BIASES}),
    Family(
        "opt",
        ("opt",),
        _opt_config,
        {
            "model.embed_tokens.weight": "model.decoder.embed_tokens.weight",
            "model.embed_positions.weight": "model.decoder.embed_positions.weight",
            "model.norm.weight": "model.decoder.final_layer_norm.weight",
            "model.norm.bias": "model.decoder.final_layer_norm.bias",
            "lm_head.weight": "lm_head.weight",
        },
        _OPT_LAYER,
    ),
]
SUPPORTED = sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}")


def modegpt_config(hf: dict) -> dict:
    """The ModeGPT config of an uncompressed HF model (every layer at full size, all rotary pairs kept)."""
    family = family_for(hf.get("model_type", ""))
    fields = family.config(hf)
    n_layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    head_dim = fields["head_dim"]
    width = fields.pop("intermediate_size", None) or hf["intermediate_size"]
    full_index = list(range(head_dim))
    layers = [
        {"intermediate_size": width, "qk_dim": head_dim, "v_dim": head_dim,
         "qk_index": [full_index] * fields["num_key_value_heads"]}
        for _ in range(n_layers)
    ]
    return {
        "model_type": "modegpt",
        "architectures": ["ModeGPTForCausalLM"],
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", family.name == "opt")),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": hf.get("eos_token_id"),
        "pad_token_id": hf.get("pad_token_id"),
        "source_family": family.name,
        "layers": layers,
        **fields,
    }


def hf_name(family: Family, name: str) -> str | None:
    """The HF weight name holding ModeGPT weight ``name``, or None if the family has no such weight."""
    if name in family.global_names:
        return family.global_names[name]
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        template = family.layer_names.get(rest)
        return template.format(i=idx) if template else None
    return None
