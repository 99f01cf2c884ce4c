"""Checkpoint weight names (docs/CHECKPOINT.md) -> vLLM parameters, the vLLM loader way.

q/k/v load into the stacked `qkv_proj` (shards "q", "k", "v") and a gated MLP's gate/up into
`gate_up_proj` (shards 0, 1) through each parameter's `weight_loader`, which also slices them for
tensor parallelism; everything else keeps its name and loads with its own `weight_loader` or
`default_weight_loader`. A factorized module (`X.weight_a` [r, in], `X.weight_b` [out, r], listed in
`linear_ranks`: a linear, the embedding or the LM head) is multiplied out into `X.weight = B @ A` (in
float32) and loads like a dense one: served correctly and tensor-parallel, but without the low-rank
saving (the compressor's MoDeGPT checkpoints have no factorized linears; the SVD baselines do).
"""
from __future__ import annotations

from typing import Iterable, Iterator

from torch import Tensor, nn
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

# (checkpoint module suffix, vLLM module suffix, shard id)
STACKED = [
    (".self_attn.q_proj", ".self_attn.qkv_proj", "q"),
    (".self_attn.k_proj", ".self_attn.qkv_proj", "k"),
    (".self_attn.v_proj", ".self_attn.qkv_proj", "v"),
    (".mlp.gate_proj", ".mlp.gate_up_proj", 0),
    (".mlp.up_proj", ".mlp.gate_up_proj", 1),
]


def dense_weights(weights: Iterable[tuple[str, Tensor]], linear_ranks: dict[str, int]) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's weights with every factorized linear multiplied out into `X.weight`."""
    factors: dict[str, dict[str, Tensor]] = {}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if module in linear_ranks and leaf in ("weight_a", "weight_b"):
            pair = factors.setdefault(module, {})
            pair[leaf] = tensor
            if len(pair) == 2:
                del factors[module]
                a, b = pair["weight_a"], pair["weight_b"]
                yield f"{module}.weight", (b.float() @ a.float()).to(a.dtype)
            continue
        yield name, tensor
    if factors:
        raise ValueError(f"factorized linears with one factor missing: {sorted(factors)}")


def vllm_name(name: str, gated: bool) -> tuple[str, str | int | None]:
    """(vLLM parameter name, shard id or None) of a dense checkpoint weight."""
    for theirs, ours, shard in STACKED:
        if theirs in name and (gated or not theirs.startswith(".mlp.")):
            return name.replace(theirs, ours), shard
    return name, None


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Tensor]], linear_ranks: dict[str, int],
                 gated: bool, tied: bool) -> set[str]:
    """Load into `model`; returns the names of the parameters loaded (vLLM checks none is missing)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in dense_weights(weights, linear_ranks):
        if tied and name == "lm_head.weight":
            continue
        target, shard = vllm_name(name, gated)
        if target not in params:
            raise KeyError(f"checkpoint weight {name} has no vLLM parameter {target}")
        param = params[target]
        if shard is None:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)
        loaded.add(target)
    return loaded
