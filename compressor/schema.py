"""The weight names and shapes a ModeGPT config implies (see ``docs/CHECKPOINT.md``)."""
from __future__ import annotations


def _linear(out: dict, cfg: dict, path: str, n_in: int, n_out: int, bias: bool) -> None:
    rank = (cfg.get("linear_ranks") or {}).get(path)
    if rank is None:
        out[path + ".weight"] = (n_out, n_in)
    else:
        out[path + ".weight_a"] = (rank, n_in)
        out[path + ".weight_b"] = (n_out, rank)
    if bias:
        out[path + ".bias"] = (n_out,)


def _norm(out: dict, cfg: dict, path: str) -> None:
    out[path + ".weight"] = (cfg["hidden_size"],)
    if cfg["norm_type"] == "layer":
        out[path + ".bias"] = (cfg["hidden_size"],)


def layer_weights(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of decoder layer ``i``."""
    spec, d = cfg["layers"][i], cfg["hidden_size"]
    h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = f"model.layers.{i}."
    out: dict[str, tuple[int, ...]] = {}
    _norm(out, cfg, p + "input_norm")
    _linear(out, cfg, p + "self_attn.q_proj", d, h * spec["qk_dim"], cfg["qkv_bias"])
    _linear(out, cfg, p + "self_attn.k_proj", d, hkv * spec["qk_dim"], cfg["qkv_bias"])
    _linear(out, cfg, p + "self_attn.v_proj", d, hkv * spec["v_dim"], cfg["qkv_bias"])
    _linear(out, cfg, p + "self_attn.o_proj", h * spec["v_dim"], d, cfg["o_bias"])
    _norm(out, cfg, p + "post_attention_norm")
    width = spec["intermediate_size"]
    if cfg["mlp_type"] == "gated":
        _linear(out, cfg, p + "mlp.gate_proj", d, width, cfg["mlp_bias"])
    _linear(out, cfg, p + "mlp.up_proj", d, width, cfg["mlp_bias"])
    _linear(out, cfg, p + "mlp.down_proj", width, d, cfg["mlp_bias"])
    return out


def global_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the weights outside the decoder layers. The embedding ``[vocab, hidden]`` and the
    LM head are factorized like a linear when ``linear_ranks`` lists them (``weight ~ weight_b @ weight_a``);
    a tied head has no weights of its own."""
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    out: dict[str, tuple[int, ...]] = {}
    _linear(out, cfg, "model.embed_tokens", d, vocab, False)
    if cfg.get("position_type") == "learned":
        n_pos = cfg["max_position_embeddings"] + cfg.get("position_offset", 0)
        out["model.embed_positions.weight"] = (n_pos, d)
    _norm(out, cfg, "model.norm")
    if not cfg.get("tie_word_embeddings"):
        _linear(out, cfg, "lm_head", d, vocab, False)
    return out


def all_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    out = global_weights(cfg)
    for i in range(cfg["num_hidden_layers"]):
        out.update(layer_weights(cfg, i))
    return out


def block_linear_params(cfg: dict) -> int:
    """Parameters of the decoder blocks' linear weights (the denominator of the compression ratio)."""
    return sum(
        _numel(shape)
        for i in range(cfg["num_hidden_layers"])
        for name, shape in layer_weights(cfg, i).items()
        if "_proj.weight" in name
    )


def total_params(cfg: dict) -> int:
    return sum(_numel(s) for s in all_weights(cfg).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
