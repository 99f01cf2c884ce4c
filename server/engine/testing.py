"""Tiny random ModeGPT checkpoints and a tiny byte-level tokenizer, for tests of the engine and the API.

They follow docs/CHECKPOINT.md: per-layer qk_dim / v_dim / MLP widths, qk_index keeping whole rotary
pairs, GQA, optional factorized linears. Weights are scaled so that logits are well spread (greedy
decoding then has no near-ties, which makes "batched == alone" comparisons meaningful).
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model compressed is a model served faster",
    "hello world, hello tokens, hello bytes",
    "continuous batching keeps the accelerator busy",
]


def llama_like_config(vocab_size: int = 300, rope_scaling: dict | None = None, seed: int = 0,
                      linear_ranks: dict[str, int] | None = None) -> dict:
    """Llama-like: RoPE, RMS norm, gated SiLU MLP, GQA 4/2, head_dim 16, per-layer dims differ."""
    rng = random.Random(seed)
    head_dim, n_kv = 16, 2
    half = head_dim // 2
    layers = []
    for qk, v, inter in ((10, 6, 40), (16, 16, 96), (6, 12, 24)):
        m = qk // 2
        qk_index = []
        for _ in range(n_kv):
            pairs = sorted(rng.sample(range(half), m))
            qk_index.append(pairs + [p + half for p in pairs])
        layers.append({"intermediate_size": inter, "qk_dim": qk, "v_dim": v, "qk_index": qk_index})
    return {
        "model_type": "modegpt", "architectures": ["ModeGPTForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": len(layers),
        "num_attention_heads": 4, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": 256, "norm_type": "rms", "norm_eps": 1e-5, "mlp_type": "gated",
        "hidden_act": "silu", "position_type": "rope", "rope_theta": 10000.0, "rope_scaling_params": rope_scaling,
        "qkv_bias": False, "o_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "layers": layers,
        "linear_ranks": linear_ranks if linear_ranks is not None else {
            "model.layers.0.self_attn.q_proj": 12, "model.layers.1.mlp.down_proj": 20},
        "modegpt": {"source": "tiny-random", "ratio": 0.3, "version": 1},
    }


def opt_like_config(vocab_size: int = 300, seed: int = 1) -> dict:
    """OPT-like: learned positions (offset 2), layer norm with bias, plain ReLU MLP, biases, tied
    embeddings, MHA (4/4), odd qk_dim / v_dim in one layer."""
    rng = random.Random(seed)
    head_dim, n_kv = 16, 4
    layers = []
    for qk, v, inter in ((7, 5, 48), (12, 16, 80)):
        qk_index = [sorted(rng.sample(range(head_dim), qk)) for _ in range(n_kv)]
        layers.append({"intermediate_size": inter, "qk_dim": qk, "v_dim": v, "qk_index": qk_index})
    return {
        "model_type": "modegpt", "architectures": ["ModeGPTForCausalLM"],
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": len(layers),
        "num_attention_heads": 4, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": 128, "norm_type": "layer", "norm_eps": 1e-5, "mlp_type": "plain",
        "hidden_act": "relu", "position_type": "learned", "position_offset": 2,
        "qkv_bias": True, "o_bias": True, "mlp_bias": True, "tie_word_embeddings": True,
        "layers": layers, "linear_ranks": {},
        "modegpt": {"source": "tiny-random-opt", "ratio": 0.3, "version": 1},
    }


def random_state_dict(config: dict, seed: int = 0, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random weights with the names and shapes of docs/CHECKPOINT.md (drawn in float32 on `device`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    D, H, Hkv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    ranks = config.get("linear_ranks") or {}
    sd: dict[str, Tensor] = {}

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def lin(name: str, out: int, inp: int, bias: bool):
        if name in ranks:
            r = ranks[name]
            sd[f"{name}.weight_a"] = rand(r, inp, scale=inp ** -0.5)
            sd[f"{name}.weight_b"] = rand(out, r, scale=r ** -0.5)
        else:
            sd[f"{name}.weight"] = rand(out, inp, scale=inp ** -0.5)
        if bias:
            sd[f"{name}.bias"] = rand(out, scale=0.1)

    def norm(name: str):
        sd[f"{name}.weight"] = 1.0 + rand(D, scale=0.1)
        if config["norm_type"] == "layer":
            sd[f"{name}.bias"] = rand(D, scale=0.1)

    tied = config["tie_word_embeddings"]
    sd["model.embed_tokens.weight"] = rand(config["vocab_size"], D, scale=0.3 if tied else 1.0)
    if config["position_type"] == "learned":
        sd["model.embed_positions.weight"] = rand(config["max_position_embeddings"] + config.get("position_offset", 0),
                                                  D, scale=0.2 if tied else 0.5)
    for i, lc in enumerate(config["layers"]):
        p = f"model.layers.{i}"
        dk, dv, inter = lc["qk_dim"], lc["v_dim"], lc["intermediate_size"]
        norm(f"{p}.input_norm")
        lin(f"{p}.self_attn.q_proj", H * dk, D, config["qkv_bias"])
        lin(f"{p}.self_attn.k_proj", Hkv * dk, D, config["qkv_bias"])
        lin(f"{p}.self_attn.v_proj", Hkv * dv, D, config["qkv_bias"])
        lin(f"{p}.self_attn.o_proj", D, H * dv, config["o_bias"])
        norm(f"{p}.post_attention_norm")
        if config["mlp_type"] == "gated":
            lin(f"{p}.mlp.gate_proj", inter, D, config["mlp_bias"])
        lin(f"{p}.mlp.up_proj", inter, D, config["mlp_bias"])
        lin(f"{p}.mlp.down_proj", D, inter, config["mlp_bias"])
    norm("model.norm")
    if not config["tie_word_embeddings"]:
        sd["lm_head.weight"] = rand(config["vocab_size"], D, scale=3 * D ** -0.5)
    return sd


def byte_tokenizer(vocab_size: int = 300, eos: str = "<eos>"):
    """A byte-level BPE tokenizer (`tokenizers`) trained on a tiny ASCII corpus, wrapped as a transformers
    fast tokenizer. Non-ASCII characters are never merged, so they split into one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def assert_same_generations(ref: dict, got: dict, logprob_tol: float) -> None:
    """Two `run_to_completion` results: the same tokens per request, and the chosen tokens' logprobs
    within `logprob_tol` (e.g. kernels on against off, batched against alone)."""
    import pytest

    assert ref.keys() == got.keys()
    for k in ref:
        assert [e.token_id for e in ref[k]] == [e.token_id for e in got[k]], k
        for x, y in zip(ref[k], got[k]):
            assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=logprob_tol)


def realigned_config(config: dict, full_width: int, align: int, head_align: int) -> dict:
    """The same per-layer allocation as ``config`` (a ModeGPT checkpoint's config.json) with sizes
    rounded the way ``compressor.allocation.kept_sizes(align=..., head_align=...)`` rounds them.

    For timing only (``kernels/run_h200.sh``: what does alignment buy on the GPU?): each layer's
    sparsity is read back as ``1 - intermediate_size / full_width`` and re-rounded, holding the total
    ratio; ``qk_index`` keeps each KV head's first kept pairs (extended with the unused ones)."""
    from compressor.allocation import kept_sizes, realised_ratio

    head_dim = int(config["head_dim"])
    half = head_dim // 2
    phi = [1.0 - layer["intermediate_size"] / full_width for layer in config["layers"]]
    full = dict(config, layers=[{"intermediate_size": full_width} for _ in config["layers"]])
    sizes = kept_sizes(phi, full, align=align, head_align=head_align, rope_pairs=True)
    layers = []
    for layer, s in zip(config["layers"], sizes):
        m = s.qk_dim // 2
        qk_index = []
        for idx in layer["qk_index"]:
            pairs = sorted(set(idx[: len(idx) // 2]))
            pairs = (pairs + [p for p in range(half) if p not in pairs])[:m]
            pairs.sort()
            qk_index.append(pairs + [p + half for p in pairs])
        layers.append({"intermediate_size": s.intermediate_size, "qk_dim": s.qk_dim, "v_dim": s.v_dim,
                       "qk_index": qk_index})
    meta = dict(config.get("modegpt", {}), align=align, head_align=head_align,
                realised_ratio=realised_ratio(full, sizes))
    return dict(config, layers=layers, modegpt=meta)
