"""A lean implementation of the ModeGPT architecture (docs/CHECKPOINT.md) for serving.

Design decisions:
- One model class for every checkpoint (original models are converted to this format on load), built
  from `(config: dict, state_dict: dict[str, Tensor])`. Every layer has its own MLP width, its own
  `qk_dim` / `v_dim` per head and its own RoPE frequencies gathered through `qk_index`.
- The forward takes a FLAT batch (`input_ids [T]`, `positions [T]`) plus an `AttentionMetadata`
  that says how the tokens split into sequences: first `num_decode` one-token decode sequences, then
  prefill chunks (each the last `query_len` tokens of a `context_len`-long sequence). K/V are written
  into per-layer paged caches at `slot_mapping`, then attention reads the context back through block
  tables. With `kv_caches=None` (teacher-forced scoring) each prefill sequence attends to itself only
  and nothing is stored.
- All per-op math goes through `server.engine.ops.OPS` so Triton kernels can replace single ops.
- The softmax scale is `config["head_dim"] ** -0.5` (the ORIGINAL head dim), whatever was kept.
- Logits are computed only for the rows in `logits_indices` (the lm_head is the biggest matmul) and
  returned in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compressor.rope import rope_inv_freq
from server.engine import ops
from server.engine.ops import OPS

# ---------------------------------------------------------------------------------------- metadata


@dataclass
class AttentionMetadata:
    """How the flat token batch maps onto sequences and the paged KV cache.

    Token order in the flat batch: `num_decode` decode tokens (one per sequence), then the prefill
    chunks in order. Device tensors are used by kernels; the python lists drive the per-sequence
    prefill loop (host values, so no device sync is needed to read them).
    """

    num_decode: int = 0
    slot_mapping: Tensor | None = None  # [T] int64, cache slot of each token (None: no cache)
    decode_block_tables: Tensor | None = None  # [num_decode, M] int64
    decode_context_lens: Tensor | None = None  # [num_decode] int64, length incl. the new token
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_context_lens: list[int] = field(default_factory=list)
    prefill_block_tables: list[Tensor] = field(default_factory=list)  # per prefill seq: [m_i] int64
    block_size: int = 16
    # zeroed int32 [>= num_decode * Hkv], one per model (runner): lets the decode attention kernel combine a
    # split context in its last partition instead of a second launch (kernels.dispatch.decode_attention)
    attn_counters: Tensor | None = None

    @staticmethod
    def no_cache(query_lens: list[int]) -> "AttentionMetadata":
        """Metadata for full-sequence forwards without a KV cache (scoring)."""
        return AttentionMetadata(prefill_query_lens=list(query_lens), prefill_context_lens=list(query_lens))


# ---------------------------------------------------------------------------------------- rope


def layer_rope_freqs(inv_freq: Tensor, qk_index: list[list[int]], head_dim: int) -> Tensor:
    """Per-KV-head frequencies `[Hkv, qk_dim/2]` for one layer: kept dim j rotates at
    `inv_freq[qk_index[g][j] % (head_dim/2)]`; the rotate-half partner j + qk_dim/2 must share it."""
    idx = torch.tensor(qk_index, dtype=torch.long)
    if idx.numel() == 0:
        return torch.zeros(len(qk_index), 0)
    full = inv_freq[idx % (head_dim // 2)]  # [Hkv, qk_dim]
    m = idx.shape[1] // 2
    if idx.shape[1] % 2 or not torch.equal(full[:, :m], full[:, m:]):
        raise ValueError("RoPE qk_index must keep rotary pairs whole: [p_1..p_m, p_1+d/2..p_m+d/2]")
    return full[:, :m].contiguous()


# ---------------------------------------------------------------------------------------- modules


class Linear(nn.Module):
    """A dense or factorized linear (`X.weight` or `X.weight_a` / `X.weight_b`, optional `X.bias`)."""

    def __init__(self, sd: dict[str, Tensor], name: str, device, dtype):
        super().__init__()

        def take(key: str) -> nn.Parameter | None:
            t = sd.get(f"{name}.{key}")
            return None if t is None else nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

        self.weight = take("weight")
        self.weight_a = take("weight_a")
        self.weight_b = take("weight_b")
        self.bias = take("bias")
        if self.weight is None and (self.weight_a is None or self.weight_b is None):
            raise KeyError(f"missing weights for linear {name!r}")

    @property
    def out_features(self) -> int:
        return (self.weight if self.weight is not None else self.weight_b).shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            return OPS["linear"](x, self.weight, self.bias)
        return OPS["factorized_linear"](x, self.weight_a, self.weight_b, self.bias)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` of the `[out, in]` weight, i.e. an embedding lookup (factorized: `B[ids] @ A`)."""
        if self.weight is not None:
            return self.weight[ids]
        return self.weight_b[ids] @ self.weight_a


class FusedLinear(nn.Module):
    """Several dense linears that read the same input, as ONE matmul over their concatenated weights
    (q/k/v; gate/up): one GEMM launch instead of three or two, which matters at decode, where a
    step is hundreds of small launches (docs/BENCHMARKS.md, H200 step profile). `forward` returns the
    parts as views of one output. `of(...)` returns None when a part is factorized (low-rank), so the
    caller keeps separate `Linear`s."""

    def __init__(self, weight: Tensor, bias: Tensor | None, sizes: list[int]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes

    @staticmethod
    def of(sd: dict[str, Tensor], names: list[str], device, dtype) -> "FusedLinear | None":
        ws = [sd.get(f"{n}.weight") for n in names]
        if any(w is None for w in ws):
            return None
        bs = [sd.get(f"{n}.bias") for n in names]
        if any(b is not None for b in bs):
            bs = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for b, w in zip(bs, ws)]
            bias = torch.cat([b.to(device=device, dtype=dtype) for b in bs])
        else:
            bias = None
        weight = torch.cat([w.to(device=device, dtype=dtype) for w in ws])
        return FusedLinear(weight, bias, [w.shape[0] for w in ws])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.fused(x).split(self.sizes, dim=-1)

    def fused(self, x: Tensor) -> Tensor:
        """The one matmul's output, the parts side by side along the last dim."""
        return OPS["linear"](x, self.weight, self.bias)


class Norm(nn.Module):
    def __init__(self, sd: dict[str, Tensor], name: str, norm_type: str, eps: float, device, dtype):
        super().__init__()
        self.weight = nn.Parameter(sd[f"{name}.weight"].to(device=device, dtype=dtype), requires_grad=False)
        b = sd.get(f"{name}.bias")
        self.bias = None if b is None else nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
        if norm_type not in ("rms", "layer"):
            raise ValueError(f"norm_type must be 'rms' or 'layer', got {norm_type!r}")
        self.op = "rms_norm" if norm_type == "rms" else "layer_norm"
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return OPS[self.op](x, self.weight, self.bias, self.eps)

    def add(self, x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
        """`(x + delta, norm(x + delta))` as one op (`delta` None: `(x, norm(x))`)."""
        return OPS["add_norm"](x, delta, self.weight, self.bias, self.eps, self.op)


class Attention(nn.Module):
    def __init__(self, config: dict, layer_cfg: dict, sd: dict[str, Tensor], prefix: str, inv_freq, device, dtype):
        super().__init__()
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config["num_key_value_heads"])
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.qk_dim = int(layer_cfg["qk_dim"])
        self.v_dim = int(layer_cfg["v_dim"])
        self.scale = ops.softmax_scale(int(config["head_dim"]))
        names = [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        self.qkv = FusedLinear.of(sd, names, device, dtype)  # None when a projection is factorized
        if self.qkv is None:
            self.q_proj, self.k_proj, self.v_proj = (Linear(sd, n, device, dtype) for n in names)
            widths = [lin.out_features for lin in (self.q_proj, self.k_proj, self.v_proj)]
        else:
            widths = self.qkv.sizes
        self.o_proj = Linear(sd, f"{prefix}.o_proj", device, dtype)
        for w, n, d in zip(widths, (self.num_heads, self.num_kv_heads, self.num_kv_heads),
                           (self.qk_dim, self.qk_dim, self.v_dim)):
            if w != n * d:
                raise ValueError(f"{prefix}: projection width {w} != {n} heads x {d}")
        self.use_rope = config["position_type"] == "rope"
        if self.use_rope:
            freqs = layer_rope_freqs(inv_freq, layer_cfg["qk_index"], int(config["head_dim"]))
            self.register_buffer("rope_freqs", freqs.to(device), persistent=False)

    def forward(self, x: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor] | None,
                meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        return self.attend(q, k, v, positions, kv_cache, meta)

    def decode_only_rope(self, kv_cache: tuple[Tensor, Tensor] | None, meta: AttentionMetadata, T: int) -> bool:
        """Whether a step of `T` tokens is decode-only with RoPE and a KV cache (the path of
        `decode_from_hidden` and of `attend`'s first branch)."""
        return kv_cache is not None and self.use_rope and self.qk_dim > 0 and T > 0 and meta.num_decode == T

    def decode_from_hidden(self, h: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor],
                           meta: AttentionMetadata) -> Tensor:
        """A decode-only step from the normed hidden states (fused q/k/v weight): projection, RoPE, cache
        write and attention as one op (with the kernels: the projection's epilogue does RoPE and the
        cache write), then the output projection."""
        o = OPS["qkv_rope_decode_attention"](h, self.qkv.weight, self.qkv.bias, self.qkv.sizes, positions,
                                             self.rope_freqs, kv_cache[0], kv_cache[1], meta.slot_mapping,
                                             meta.decode_block_tables, meta.decode_context_lens, self.scale,
                                             meta.block_size, meta.attn_counters)
        return self.o_proj(o.reshape(h.shape[0], self.num_heads * self.v_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor] | None,
               meta: AttentionMetadata) -> Tensor:
        """Everything after the q/k/v projection: RoPE, the cache, attention, the output projection."""
        T = q.shape[0]
        Hkv, G = self.num_kv_heads, self.num_heads // self.num_kv_heads
        rope = self.use_rope and self.qk_dim > 0
        if self.decode_only_rope(kv_cache, meta, T):  # decode only: RoPE, cache, attention
            o = OPS["rope_decode_attention"](q, k, v, positions, self.rope_freqs, kv_cache[0], kv_cache[1],
                                             meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                                             self.scale, meta.block_size, meta.attn_counters)
            return self.o_proj(o.reshape(T, self.num_heads * self.v_dim))
        if kv_cache is not None:  # K/V go to the cache; attention reads them back from there
            if rope:
                q = OPS["rope_store_kv"](q, k, v, positions, self.rope_freqs, kv_cache[0], kv_cache[1],
                                         meta.slot_mapping)
            else:
                OPS["store_kv"](k.view(T, Hkv, self.qk_dim), v.view(T, Hkv, self.v_dim), kv_cache[0], kv_cache[1],
                                meta.slot_mapping)
            q = q.reshape(T, self.num_heads, self.qk_dim)
        else:
            q = q.view(T, Hkv, G, self.qk_dim)
            k = k.view(T, Hkv, 1, self.qk_dim)
            if rope:
                cos, sin = OPS["rope_angles"](positions, self.rope_freqs)
                q = OPS["apply_rope"](q, cos, sin)
                k = OPS["apply_rope"](k, cos, sin)
            q = q.reshape(T, self.num_heads, self.qk_dim)
            k = k.reshape(T, Hkv, self.qk_dim)
            v = v.view(T, Hkv, self.v_dim)
        outs = []
        nd = meta.num_decode
        if nd:
            outs.append(OPS["decode_attention"](q[:nd], kv_cache[0], kv_cache[1], meta.decode_block_tables,
                                                meta.decode_context_lens, self.scale, meta.block_size,
                                                meta.attn_counters))
        start = nd
        for i, (ql, cl) in enumerate(zip(meta.prefill_query_lens, meta.prefill_context_lens)):
            qi = q[start:start + ql]
            if kv_cache is None:  # scoring: the chunk is the whole sequence
                ki, vi = k[start:start + ql], v[start:start + ql]
            else:
                slots = meta.slot_mapping[start:start + ql] if ql == cl else \
                    ops.gather_slots(meta.prefill_block_tables[i], meta.block_size)[:cl]
                ki, vi = kv_cache[0][slots], kv_cache[1][slots]
            outs.append(OPS["prefill_attention"](qi, ki, vi, self.scale))
            start += ql
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return self.o_proj(o.reshape(T, self.num_heads * self.v_dim))


class MLP(nn.Module):
    def __init__(self, config: dict, sd: dict[str, Tensor], prefix: str, device, dtype):
        super().__init__()
        self.gated = config["mlp_type"] == "gated"
        if config["mlp_type"] not in ("gated", "plain"):
            raise ValueError(f"mlp_type must be 'gated' or 'plain', got {config['mlp_type']!r}")
        self.act = config["hidden_act"]
        if self.act not in ops.ACTIVATIONS:
            raise ValueError(f"hidden_act {self.act!r} not supported: {sorted(ops.ACTIVATIONS)}")
        self.gate_up = FusedLinear.of(sd, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], device, dtype) \
            if self.gated else None
        if self.gate_up is None:
            self.gate_proj = Linear(sd, f"{prefix}.gate_proj", device, dtype) if self.gated else None
            self.up_proj = Linear(sd, f"{prefix}.up_proj", device, dtype)
        self.down_proj = Linear(sd, f"{prefix}.down_proj", device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None and self.down_proj.weight is not None:  # the common case: one fused op
            return OPS["gated_mlp"](x, self.gate_up.weight, self.gate_up.bias, self.act, self.down_proj.weight,
                                    self.down_proj.bias)
        if self.gate_up is not None:
            h = OPS["gated_mlp_act"](*self.gate_up(x), self.act)
        elif self.gated:
            h = OPS["gated_mlp_act"](self.gate_proj(x), self.up_proj(x), self.act)
        else:
            h = OPS["plain_mlp_act"](self.up_proj(x), self.act)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_cfg, sd, i, inv_freq, device, dtype):
        super().__init__()
        p = f"model.layers.{i}"
        nt, eps = config["norm_type"], float(config.get("norm_eps", 1e-5))
        self.input_norm = Norm(sd, f"{p}.input_norm", nt, eps, device, dtype)
        self.self_attn = Attention(config, layer_cfg, sd, f"{p}.self_attn", inv_freq, device, dtype)
        self.post_attention_norm = Norm(sd, f"{p}.post_attention_norm", nt, eps, device, dtype)
        self.mlp = MLP(config, sd, f"{p}.mlp", device, dtype)

    def forward(self, x, delta, positions, kv_cache, meta):
        """`x` the residual stream, `delta` the previous layer's output not yet added to it (None for
        the first layer): each add is fused with the norm after it, and (ops `norm_linear` /
        `norm_gated_mlp`) with the fused matmul after that. Returns the same pair."""
        attn, mlp, n1, n2 = self.self_attn, self.mlp, self.input_norm, self.post_attention_norm
        if attn.qkv is not None and attn.decode_only_rope(kv_cache, meta, x.shape[0]):
            x, h = n1.add(x, delta)
            a = attn.decode_from_hidden(h, positions, kv_cache, meta)
        elif attn.qkv is not None:
            x, qkv = OPS["norm_linear"](x, delta, n1.weight, n1.bias, n1.eps, n1.op, attn.qkv.weight, attn.qkv.bias)
            a = attn.attend(*qkv.split(attn.qkv.sizes, dim=-1), positions, kv_cache, meta)
        else:
            x, h = n1.add(x, delta)
            a = attn(h, positions, kv_cache, meta)
        if mlp.gate_up is not None and mlp.down_proj.weight is not None:
            return OPS["norm_gated_mlp"](x, a, n2.weight, n2.bias, n2.eps, n2.op, mlp.gate_up.weight, mlp.gate_up.bias,
                                         mlp.act, mlp.down_proj.weight, mlp.down_proj.bias)
        x, h = n2.add(x, a)
        return x, mlp(h)


class ModeGPTModel(nn.Module):
    """The serving model. `forward(input_ids, positions, kv_caches, meta, logits_indices)`."""

    def __init__(self, config: dict, state_dict: dict[str, Tensor], device="cpu", dtype=torch.float32):
        super().__init__()
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        n = int(config["num_hidden_layers"])
        if len(config["layers"]) != n:
            raise ValueError(f"config has {len(config['layers'])} layer entries for {n} layers")
        sd = state_dict
        # [vocab, hidden], dense or factorized; a tied LM head is this same module (logits = h @ E.T)
        self.embed_tokens = Linear(sd, "model.embed_tokens", device, dtype)
        self.learned_positions = config["position_type"] == "learned"
        if config["position_type"] not in ("rope", "learned"):
            raise ValueError(f"position_type must be 'rope' or 'learned', got {config['position_type']!r}")
        self.position_offset = int(config.get("position_offset", 0))
        if self.learned_positions:
            self.embed_positions = nn.Parameter(sd["model.embed_positions.weight"].to(device=device, dtype=dtype),
                                                requires_grad=False)
        inv_freq = rope_inv_freq(int(config["head_dim"]), float(config.get("rope_theta", 10000.0)),
                                 config.get("rope_scaling_params")) if config["position_type"] == "rope" else None
        self.layers = nn.ModuleList(
            DecoderLayer(config, config["layers"][i], sd, i, inv_freq, device, dtype) for i in range(n))
        self.norm = Norm(sd, "model.norm", config["norm_type"], float(config.get("norm_eps", 1e-5)), device, dtype)
        if config.get("tie_word_embeddings", False):
            self.lm_head = self.embed_tokens
        else:  # dense or factorized (lm_head.weight_a / weight_b): the low-rank kernel applies on CUDA
            self.lm_head = Linear(sd, "lm_head", device, dtype)

    # ---- shapes the KV cache needs
    def kv_shapes(self) -> list[tuple[int, int, int]]:
        """Per layer `(num_kv_heads, qk_dim, v_dim)`."""
        return [(l.self_attn.num_kv_heads, l.self_attn.qk_dim, l.self_attn.v_dim) for l in self.layers]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def hidden_states(self, input_ids: Tensor, positions: Tensor, kv_caches, meta: AttentionMetadata) -> Tensor:
        x = self.embed_tokens.rows(input_ids)
        if self.learned_positions:
            x = x + self.embed_positions[positions + self.position_offset]
        delta = None
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, positions, None if kv_caches is None else kv_caches[i], meta)
        return self.norm.add(x, delta)[1]

    def compute_logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h).float()

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]] | None,
                meta: AttentionMetadata, logits_indices: Tensor | None = None) -> Tensor:
        """Float32 logits `[len(logits_indices), vocab]` (all tokens when `logits_indices` is None)."""
        return self.logits(input_ids, positions, kv_caches, meta, logits_indices)

    def logits(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]] | None,
               meta: AttentionMetadata, logits_indices: Tensor | None = None) -> Tensor:
        """`forward` without its inference-mode wrapper, for `torch.compile` (the caller provides the
        mode): dynamo fails on the wrapped one ("Cannot set version_counter for inference tensor",
        torch 2.13)."""
        h = self.hidden_states(input_ids, positions, kv_caches, meta)
        if logits_indices is not None:
            h = h[logits_indices]
        return self.compute_logits(h)
