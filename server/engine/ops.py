"""The per-op math of the ModeGPT forward, one small function per op.

Design: every op the model runs lives here as a plain PyTorch function and is looked up through the
`OPS` table at call time (`ops.OPS["rms_norm"](...)`), so a Triton package (`kernels/`, owned
elsewhere) can swap in a fused version with `register_op(name, fn)` without touching the model code.
The reference versions favour correctness and readability: norms, RoPE angles and softmax run in
float32 and cast back, attention is plain SDPA (prefill) or a masked matmul over gathered K/V
(decode). They are also CUDA-graph safe: no host syncs, no data-dependent shapes on the decode path.

Shapes use T = tokens in the flat batch, H = query heads, Hkv = KV heads, G = H // Hkv,
Dk = qk_dim (kept query/key dim per head), Dv = v_dim (kept value dim per head).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------- norms


def rms_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """HF Llama RMSNorm: normalize in float32, cast back, scale (bias allowed for generality)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if bias is None else out + bias


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm computed in float32 (stable in bf16), cast back to the input dtype."""
    w = weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


NORMS = {"rms_norm": rms_norm, "layer_norm": layer_norm}


def add_norm(x: Tensor, delta: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float,
             norm: str) -> tuple[Tensor, Tensor]:
    """Residual add then norm: `(s, norm(s))` with `s = x + delta` (`x` when `delta` is None), `norm`
    one of `NORMS`. One fusable op: the Triton version does the add and the RMSNorm in one pass."""
    s = x if delta is None else x + delta
    return s, NORMS[norm](s, weight, bias, eps)


# ---------------------------------------------------------------------------------------- linears


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def factorized_linear(x: Tensor, weight_a: Tensor, weight_b: Tensor, bias: Tensor | None) -> Tensor:
    """`y = (x @ A.T) @ B.T + bias` with A `[r, in]`, B `[out, r]` (docs/CHECKPOINT.md)."""
    return F.linear(F.linear(x, weight_a), weight_b, bias)


# ------------------------------------------------------------------------------------ activations


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "tanh": torch.tanh,
}


def gated_mlp_act(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """act(gate) * up, the middle of a gated MLP (one fusable op)."""
    return ACTIVATIONS[act](gate) * up


def gated_mlp_down(gate_up: Tensor, act: str, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The rest of a gated MLP after its fused gate/up matmul: ``down(act(gate) * up)`` with
    ``gate_up`` ``[T, 2I]`` (gate first) and the dense down weight ``[H, I]`` (one fusable op)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return OPS["linear"](OPS["gated_mlp_act"](gate, up, act), weight, bias)


def gated_mlp(x: Tensor, gate_up_weight: Tensor, gate_up_bias: Tensor | None, act: str, weight: Tensor,
              bias: Tensor | None) -> Tensor:
    """A whole gated MLP with a fused gate/up weight ``[2I, H]`` (gate rows first) and a dense down
    weight ``[H, I]``: ``down(act(gate) * up)`` (one fusable op)."""
    return OPS["gated_mlp_down"](OPS["linear"](x, gate_up_weight, gate_up_bias), act, weight, bias)


def norm_linear(x: Tensor, delta: Tensor | None, norm_weight: Tensor, norm_bias: Tensor | None, eps: float,
                norm: str, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """`add_norm` then the linear that reads its output: `(s, linear(norm(s), weight, bias))` (one
    fusable op: the norm's per-row scale can be applied after the matmul)."""
    s, h = OPS["add_norm"](x, delta, norm_weight, norm_bias, eps, norm)
    return s, OPS["linear"](h, weight, bias)


def norm_gated_mlp(x: Tensor, delta: Tensor | None, norm_weight: Tensor, norm_bias: Tensor | None, eps: float,
                   norm: str, gate_up_weight: Tensor, gate_up_bias: Tensor | None, act: str, weight: Tensor,
                   bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """`add_norm` then the gated MLP that reads its output: `(s, gated_mlp(norm(s), ...))` (one fusable op)."""
    s, h = OPS["add_norm"](x, delta, norm_weight, norm_bias, eps, norm)
    return s, OPS["gated_mlp"](h, gate_up_weight, gate_up_bias, act, weight, bias)


def plain_mlp_act(up: Tensor, act: str) -> Tensor:
    return ACTIVATIONS[act](up)


# ------------------------------------------------------------------------------------------- rope


def rope_angles(positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin `[T, Hkv, Dk/2]` for per-KV-head frequencies `freqs [Hkv, Dk/2]` (float32)."""
    ang = positions.to(torch.float32)[:, None, None] * freqs[None]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE with pairing (j, j + Dk/2).

    x: `[T, Hkv, G, Dk]` (queries) or `[T, Hkv, 1, Dk]` (keys); cos/sin `[T, Hkv, Dk/2]`.
    Computed in float32, cast back.
    """
    m = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :m], xf[..., m:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_store_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, freqs: Tensor, k_cache: Tensor,
                  v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """The attention input step with a KV cache, as one op: rotate queries and keys at the kept
    frequencies `freqs [Hkv, Dk/2]`, write the rotated keys and the values into the caches at
    `slot_mapping`, return the rotated queries `[T, H, Dk]`.

    q `[T, H * Dk]`, k `[T, Hkv * Dk]`, v `[T, Hkv * Dv]` are the projection outputs. The Triton
    version (`kernels.dispatch.rope_qkv_`) rotates q in place and writes k and v straight into the
    cache in one launch, without materialising the rotated keys.
    """
    T = q.shape[0]
    Hkv, m = freqs.shape
    cos, sin = rope_angles(positions, freqs)
    qr = apply_rope(q.view(T, Hkv, -1, 2 * m), cos, sin).reshape(T, -1, 2 * m)
    kr = apply_rope(k.view(T, Hkv, 1, 2 * m), cos, sin).reshape(T, Hkv, 2 * m)
    store_kv(kr, v.view(T, Hkv, -1), k_cache, v_cache, slot_mapping)
    return qr


# -------------------------------------------------------------------------------------- kv cache


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write this step's K `[T, Hkv, Dk]` / V `[T, Hkv, Dv]` into the flat slot caches
    `[num_slots, Hkv, D]` at `slot_mapping [T]` (padding tokens point at the scratch block 0)."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_slots(block_table: Tensor, block_size: int) -> Tensor:
    """Slot indices `[B, M * block_size]` for block tables `[B, M]` (or `[M]` -> `[M * bs]`)."""
    offs = torch.arange(block_size, device=block_table.device, dtype=block_table.dtype)
    slots = block_table.unsqueeze(-1) * block_size + offs
    return slots.flatten(-2)


# ------------------------------------------------------------------------------------- attention


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of the last L query tokens of one sequence over its S >= L context tokens.

    q `[L, H, Dk]`, k `[S, Hkv, Dk]`, v `[S, Hkv, Dv]` -> `[L, H, Dv]`. Query i sits at context
    position S - L + i. K and V may have different head dims (SDPA allows Ev != E).
    """
    L, H, _ = q.shape
    S, Hkv, _ = k.shape
    g = H // Hkv
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if L == S:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        mask = j <= (S - L + i)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    block_size: int,
    counters: Tensor | None = None,
) -> Tensor:
    """One query token per sequence over its paged context (a masked matmul; CUDA-graph safe).

    q `[B, H, Dk]`; caches `[num_slots, Hkv, D]`; block_tables `[B, M]`; context_lens `[B]` (the
    length including the token being decoded, >= 1). Returns `[B, H, Dv]`. The gathered width is
    M * block_size, fixed by the caller (a CUDA-graph bucket or the batch maximum); slots beyond a
    sequence's length are masked. Scores are accumulated by the matmul in the model dtype, softmax
    in float32. `counters` (`AttentionMetadata.attn_counters`) are for the Triton kernel, which
    replaces this whole function on the GPU; unused here.
    """
    B, H, Dk = q.shape
    Hkv = k_cache.shape[1]
    g = H // Hkv
    slots = gather_slots(block_tables, block_size)  # [B, S]
    k = k_cache[slots]  # [B, S, Hkv, Dk]
    v = v_cache[slots]  # [B, S, Hkv, Dv]
    qg = q.view(B, Hkv, g, Dk).to(k.dtype)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k).float() * scale
    S = slots.shape[1]
    pad = torch.arange(S, device=q.device)[None, :] >= context_lens[:, None].to(torch.long)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bkgs,bskd->bkgd", p, v)
    return out.reshape(B, H, v.shape[-1]).to(q.dtype)


def rope_decode_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, freqs: Tensor, k_cache: Tensor,
                          v_cache: Tensor, slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                          scale: float, block_size: int, counters: Tensor | None = None) -> Tensor:
    """A decode-only step's attention from the projection outputs: `rope_store_kv` (RoPE, K/V into
    the cache) then `decode_attention`; `[B, H, Dv]`. With the kernels this is the RoPE launch and
    one attention launch (`counters`, the model's `AttentionMetadata.attn_counters`, let the attention
    kernel combine a split context itself); `MODEGPT_ROPE_ATTENTION=1` makes it one launch
    (`kernels.dispatch.rope_decode_attention`), measured slower on the H200, so opt-in."""
    qr = OPS["rope_store_kv"](q, k, v, positions, freqs, k_cache, v_cache, slot_mapping)
    return OPS["decode_attention"](qr, k_cache, v_cache, block_tables, context_lens, scale, block_size, counters)


def qkv_rope_decode_attention(h: Tensor, weight: Tensor, bias: Tensor | None, sizes: list[int], positions: Tensor,
                              freqs: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                              block_tables: Tensor, context_lens: Tensor, scale: float, block_size: int,
                              counters: Tensor | None = None) -> Tensor:
    """A decode-only step's attention from the normed hidden states: the fused q/k/v projection
    (`weight` `[H*Dk + Hkv*Dk + Hkv*Dv, hidden]`, parts of widths `sizes`), then `rope_decode_attention`;
    `[B, H, Dv]`. With the kernels, at decode sizes the projection's epilogue does the RoPE and the
    cache write (`kernels.dispatch.linear_rope_qkv_`: one launch for projection, RoPE and cache, then
    the attention launch)."""
    q, k, v = OPS["linear"](h, weight, bias).split(sizes, dim=-1)
    return OPS["rope_decode_attention"](q, k, v, positions, freqs, k_cache, v_cache, slot_mapping, block_tables,
                                        context_lens, scale, block_size, counters)


# ------------------------------------------------------------------------------------------- table

OPS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "layer_norm": layer_norm,
    "add_norm": add_norm,
    "linear": linear,
    "factorized_linear": factorized_linear,
    "gated_mlp_act": gated_mlp_act,
    "gated_mlp_down": gated_mlp_down,
    "gated_mlp": gated_mlp,
    "norm_linear": norm_linear,
    "norm_gated_mlp": norm_gated_mlp,
    "plain_mlp_act": plain_mlp_act,
    "rope_angles": rope_angles,
    "apply_rope": apply_rope,
    "store_kv": store_kv,
    "rope_store_kv": rope_store_kv,
    "prefill_attention": prefill_attention,
    "decode_attention": decode_attention,
    "rope_decode_attention": rope_decode_attention,
    "qkv_rope_decode_attention": qkv_rope_decode_attention,
}
_DEFAULTS = dict(OPS)


def register_op(name: str, fn: Callable) -> None:
    """Replace one op (e.g. with a Triton kernel). The signature must match the reference."""
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known: {sorted(OPS)}")
    OPS[name] = fn


def reset_ops() -> None:
    """Restore every op to its reference PyTorch version."""
    OPS.clear()
    OPS.update(_DEFAULTS)


def use_kernels() -> bool:
    """Route the ops the `kernels` package implements through `kernels.dispatch` (PROCESS-WIDE: the op
    table is global, so every engine of the process uses them). Covered: factorized linears
    (`lowrank_linear`), RoPE at the kept frequencies fused with the K/V cache write (`rope_qkv_`, one launch per layer),
    paged decode attention with a split context combined in the same launch (the model's counters; opt-in,
    `MODEGPT_ROPE_ATTENTION=1`: RoPE and the cache write in that launch too, `rope_decode_attention`),
    residual add + RMSNorm (`add_rms_norm`), the SwiGLU (`silu_mul`; at decode sizes fused into the
    gate/up matmul's epilogue, `swiglu_mlp`, or into the down projection's input, `swiglu_linear`) and paged decode attention (our flat `[num_slots, Hkv, D]` caches are viewed as
    `[num_blocks, block_size, Hkv, D]`, the layout the kernels read). `kernels.dispatch` still decides
    per call (Triton on CUDA, PyTorch elsewhere, `MODEGPT_KERNELS=torch` to force PyTorch). Dense
    linears go through `dispatch.linear` too: a skinny weight-streaming kernel at decode sizes.
    Returns False (and changes nothing) when the package is not importable."""
    try:
        from kernels import dispatch
    except ImportError:
        return False

    def fold(counters):  # A/B switch: MODEGPT_ATTN_COMBINE_FOLD=0 keeps the split combine as its own launch
        return None if os.environ.get("MODEGPT_ATTN_COMBINE_FOLD", "1").strip() == "0" else counters

    def paged(cache, block_size):  # our flat [num_slots, Hkv, D] cache as the kernels' [blocks, block_size, Hkv, D]
        return cache.view(-1, block_size, cache.shape[1], cache.shape[2])

    def decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size, counters=None):
        # q is usually a row-strided view of the fused q/k/v output: the kernel reads it through its
        # strides (a .contiguous() here was one copy launch per layer from batch 2 up, ~3 us each on the
        # H200, session 11's step trace)
        q = q if q.stride(-1) == 1 else q.contiguous()
        return dispatch.decode_attention(q, paged(k_cache, block_size), paged(v_cache, block_size),
                                         block_tables, context_lens, scale, counters=fold(counters))

    def rope_decode(q, k, v, positions, freqs, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale,
                    block_size, counters=None):
        # MODEGPT_ROPE_ATTENTION=1: RoPE and the cache write inside the attention kernel. Off by default: on
        # the H200 it measured 0.7 % slower at batch 1 and 7-13 % slower at 64 than the RoPE launch followed by
        # attention; at 16 0.9 % faster for the 30 % checkpoint only (docs/BENCHMARKS.md, sessions 6 and 13)
        if os.environ.get("MODEGPT_ROPE_ATTENTION", "0").strip() != "1":
            return rope_decode_attention(q, k, v, positions, freqs, k_cache, v_cache, slot_mapping, block_tables,
                                         context_lens, scale, block_size, counters)
        return dispatch.rope_decode_attention(q, k, v, positions, freqs, paged(k_cache, block_size),
                                              paged(v_cache, block_size), slot_mapping, block_tables,
                                              context_lens, scale, counters=fold(counters))

    def qkv_rope_decode(h, weight, bias, sizes, positions, freqs, k_cache, v_cache, slot_mapping, block_tables,
                        context_lens, scale, block_size, counters=None):
        # MODEGPT_QKV_ROPE=1: the projection with RoPE and the cache write as its epilogue (one launch fewer per
        # layer). Opt-in: on the H200 it timed 0.59-1.07x of the projection + RoPE launch it replaces (bf16,
        # CUDA graphs, session 7; kernels/NOTES.md), and end to end 0.993-0.998x at batch 1 and 16 (session 12);
        # where it is on, a timed pick per shape still decides.
        # MODEGPT_ROPE_ATTENTION=1 moves RoPE into the attention kernel instead.
        if (os.environ.get("MODEGPT_QKV_ROPE", "0").strip() != "1"
                or os.environ.get("MODEGPT_ROPE_ATTENTION", "0").strip() == "1"):
            return qkv_rope_decode_attention(h, weight, bias, sizes, positions, freqs, k_cache, v_cache, slot_mapping,
                                             block_tables, context_lens, scale, block_size, counters)
        q = dispatch.linear_rope_qkv_(h, weight, bias, sizes[0] // (2 * freqs.shape[1]), positions, freqs,
                                      paged(k_cache, block_size), paged(v_cache, block_size), slot_mapping)
        return decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size, counters)

    def lowrank(x, weight_a, weight_b, bias):
        return dispatch.lowrank_linear(x, weight_a, weight_b, bias)

    def rope_store(q, k, v, positions, freqs, k_cache, v_cache, slot_mapping):
        return dispatch.rope_qkv_(q, k, v, positions, freqs, k_cache, v_cache, slot_mapping)

    def add_norm_k(x, delta, weight, bias, eps, norm):
        if norm != "rms_norm" or bias is not None:
            return add_norm(x, delta, weight, bias, eps, norm)
        return dispatch.add_rms_norm(x, delta, weight, eps)

    def gated_act_k(gate, up, act):
        if act not in ("silu", "swish"):
            return gated_mlp_act(gate, up, act)
        return dispatch.silu_mul(gate, up)

    def gated_down_k(gate_up, act, weight, bias):
        if act not in ("silu", "swish"):
            return gated_mlp_down(gate_up, act, weight, bias)
        return dispatch.swiglu_linear(gate_up, weight, bias)

    def gated_mlp_k(x, gate_up_weight, gate_up_bias, act, weight, bias):
        if act not in ("silu", "swish"):
            return gated_mlp(x, gate_up_weight, gate_up_bias, act, weight, bias)
        return dispatch.swiglu_mlp(x, gate_up_weight, gate_up_bias, weight, bias)

    def norm_linear_k(x, delta, norm_weight, norm_bias, eps, norm, weight, bias):
        if norm != "rms_norm" or norm_bias is not None:
            return norm_linear(x, delta, norm_weight, norm_bias, eps, norm, weight, bias)
        return dispatch.add_rms_norm_linear(x, delta, norm_weight, eps, weight, bias)

    def norm_gated_mlp_k(x, delta, norm_weight, norm_bias, eps, norm, gate_up_weight, gate_up_bias, act, weight, bias):
        if norm != "rms_norm" or norm_bias is not None or act not in ("silu", "swish"):
            return norm_gated_mlp(x, delta, norm_weight, norm_bias, eps, norm, gate_up_weight, gate_up_bias, act,
                                  weight, bias)
        return dispatch.add_rms_norm_swiglu_mlp(x, delta, norm_weight, eps, gate_up_weight, gate_up_bias, weight, bias)

    register_op("linear", dispatch.linear)
    register_op("decode_attention", decode)
    register_op("rope_decode_attention", rope_decode)
    register_op("qkv_rope_decode_attention", qkv_rope_decode)
    register_op("factorized_linear", lowrank)
    register_op("rope_store_kv", rope_store)
    register_op("add_norm", add_norm_k)
    register_op("gated_mlp_act", gated_act_k)
    register_op("gated_mlp_down", gated_down_k)
    register_op("gated_mlp", gated_mlp_k)
    register_op("norm_linear", norm_linear_k)
    register_op("norm_gated_mlp", norm_gated_mlp_k)
    return True


def softmax_scale(head_dim: int) -> float:
    """The scale is ALWAYS that of the original head dim, whatever qk_dim was kept."""
    return 1.0 / math.sqrt(head_dim)
