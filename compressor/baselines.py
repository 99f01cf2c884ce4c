"""Baselines built in the same harness, at the same decoder-block parameter count as MoDeGPT.

- ``svd``: activation-whitened truncated SVD of every decoder linear (SVD-LLM style, no update):
  with ``C = L L^T`` the Cholesky factor of the linear's input correlation, ``W ~ U_r S_r V_r^T L^-1``
  is the rank-r optimum of ``||(W - W') L||_F`` (the layer-output error on the calibration data).
  Stored as factorized linears (``linear_ranks``); rank ``r = (1 - ratio) m n / (m + n)``.
- ``prune``: structured pruning by activation norm, no refit: MLP channels by ``||a_j||``, RoPE pairs
  of each KV head by the key activation norm, value dimensions by ``||v_j||`` (with the matching
  ``o_proj`` columns). Same per-layer kept sizes as uniform MoDeGPT.

Both calibrate on the original model's activations (no sequential propagation).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .allocation import allocate, kept_sizes, resolve_alignment
from .calibration import calibration_ids
from .checkpoint import write_checkpoint
from .decompose import whitened_svd
from .loading import source_config, source_globals, source_layer
from .modeling import ModeGPTConfig
from .pipeline import CompressOptions, _attention_stats, _embed, _layer_module, _mlp_stats, _positions, _Stream
from .schema import block_linear_params, total_params
from .sources import resolve


@torch.inference_mode()
def _input_correlations(layer, stream: _Stream, cfg: ModeGPTConfig):
    """Correlations of the inputs of every linear of an original layer (q/k/v, o, gate/up, down)."""
    c_x, _, _ = _attention_stats(layer, stream, cfg)
    attn = layer.self_attn
    n_o = attn.n_heads * attn.v_dim
    c_o = torch.zeros(n_o, n_o, dtype=torch.float64, device=stream.x.device)
    hidden = torch.empty_like(stream.x)
    captured = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    tokens = 0
    for sl in stream.chunks():
        x = stream.x[sl]
        hidden[sl] = x + attn(layer.input_norm(x), _positions(x), None, None)
        o_in = captured["x"].flatten(0, 1).double()
        c_o += o_in.T @ o_in
        tokens += o_in.shape[0]
    hook.remove()
    h = _Stream(hidden, stream.batch)
    c_h = torch.zeros_like(c_x)
    for sl in h.chunks():
        z = layer.post_attention_norm(h.x[sl]).flatten(0, 1).double()
        c_h += z.T @ z
    c_a = _mlp_stats(layer, h, layer.mlp.down_proj.in_features)
    return {"qkv": c_x, "o": c_o / tokens, "mlp_in": c_h / tokens, "down": c_a}, h


def _svd_layer(w: dict, p: str, corr: dict, ratio: float, ranks: dict) -> dict:
    groups = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "self_attn.o_proj": "o",
              "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down"}
    out = dict(w)
    for name, cname in groups.items():
        key = p + name + ".weight"
        if key not in w:
            continue
        m, n = w[key].shape
        rank = max(1, int((1 - ratio) * m * n / (m + n)))
        a, b = whitened_svd(w[key], corr[cname], rank)
        del out[key]
        out[p + name + ".weight_a"], out[p + name + ".weight_b"] = a.to(w[key].dtype), b.to(w[key].dtype)
        ranks[p + name] = rank
    return out


def _prune_layer(w: dict, p: str, cfg: ModeGPTConfig, size, stats, c_mlp) -> tuple[dict, list]:
    c_x, _, k_sq = stats
    d, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group, a, out = heads // kv, p + "self_attn.", dict(w)
    half = d // 2
    index = []
    for g in range(kv):
        if cfg.position_type == "rope":
            pairs = torch.topk(k_sq[g, :half] + k_sq[g, half:], size.qk_dim // 2).indices.sort().values.tolist()
            index.append(pairs + [q + half for q in pairs])
        else:
            index.append(torch.topk(k_sq[g], size.qk_dim).indices.sort().values.tolist())
    q_rows = [h * d + j for h in range(heads) for j in index[h // group]]
    k_rows = [g * d + j for g in range(kv) for j in index[g]]
    for proj, rows in (("q_proj", q_rows), ("k_proj", k_rows)):
        out[a + proj + ".weight"] = w[a + proj + ".weight"][rows]
        if a + proj + ".bias" in w:
            out[a + proj + ".bias"] = w[a + proj + ".bias"][rows]
    # value dims by ||v_j||^2 = diag(W_v C W_v^T) (+ bias^2)
    v_w = w[a + "v_proj.weight"].double()
    v_sq = torch.einsum("ij,jk,ik->i", v_w, c_x, v_w)
    if a + "v_proj.bias" in w:
        v_sq = v_sq + w[a + "v_proj.bias"].double() ** 2
    v_index = [torch.topk(v_sq[g * d:(g + 1) * d], size.v_dim).indices.sort().values.tolist() for g in range(kv)]
    v_rows = [g * d + j for g in range(kv) for j in v_index[g]]
    o_cols = [h * d + j for h in range(heads) for j in v_index[h // group]]
    out[a + "v_proj.weight"] = w[a + "v_proj.weight"][v_rows]
    if a + "v_proj.bias" in w:
        out[a + "v_proj.bias"] = w[a + "v_proj.bias"][v_rows]
    out[a + "o_proj.weight"] = w[a + "o_proj.weight"][:, o_cols]
    # MLP channels by activation norm
    m = p + "mlp."
    keep = torch.topk(torch.diagonal(c_mlp), size.intermediate_size).indices.sort().values.to(w[m + "up_proj.weight"].device)
    for name in ("gate_proj", "up_proj"):
        if m + name + ".weight" in w:
            out[m + name + ".weight"] = w[m + name + ".weight"][keep]
            if m + name + ".bias" in w:
                out[m + name + ".bias"] = w[m + name + ".bias"][keep]
    out[m + "down_proj.weight"] = w[m + "down_proj.weight"][:, keep]
    return out, index


def compress_baseline(method: str, spec: str, out: Path, opts: CompressOptions, overwrite: bool = False) -> dict:
    """Build the ``svd`` or ``prune`` baseline checkpoint at ``opts.ratio``."""
    if method not in ("svd", "prune"):
        raise ValueError(f"unknown baseline {method!r}; use 'svd' or 'prune'")
    opts.defaults()
    t0 = time.perf_counter()
    device = torch.device(opts.device)
    dtype = opts.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = resolve(spec)
    cfg_full = source_config(source)
    ids = calibration_ids(source.load_tokenizer(), opts.calib, opts.calib_samples, opts.calib_seqlen,
                          cfg_full["vocab_size"], opts.seed)
    globals_ = source_globals(source, cfg_full, device, dtype)
    stream = _Stream(_embed(cfg_full, globals_, ids.to(device)), opts.batch_size)
    hf_cfg = ModeGPTConfig(**{k: v for k, v in cfg_full.items() if k not in ("model_type", "architectures", "layers")},
                           layers=[dict(layer) for layer in cfg_full["layers"]])
    n = cfg_full["num_hidden_layers"]
    sizes = kept_sizes(allocate([0.0] * n, opts.ratio, method="uniform"), cfg_full,
                       align=resolve_alignment(cfg_full, opts.align, opts.head_align)[0],
                       rope_pairs=cfg_full["position_type"] == "rope")
    state = {k: v.cpu() for k, v in globals_.items()}
    layers_cfg, ranks = [dict(layer) for layer in cfg_full["layers"]], {}
    for i in tqdm(range(n), desc=f"{method} {opts.ratio:.0%}", disable=not opts.progress, unit="layer"):
        p = f"model.layers.{i}."
        w = source_layer(source, cfg_full, i, device, dtype)
        layer = _layer_module(hf_cfg, i, w)
        corr, h = _input_correlations(layer, stream, hf_cfg)
        if method == "svd":
            w = _svd_layer(w, p, corr, opts.ratio, ranks)
        else:
            stats = _attention_stats(layer, stream, hf_cfg)
            w, index = _prune_layer(w, p, hf_cfg, sizes[i], stats, corr["down"])
            layers_cfg[i] = {"intermediate_size": sizes[i].intermediate_size, "qk_dim": sizes[i].qk_dim,
                             "v_dim": sizes[i].v_dim, "qk_index": index}
        with torch.inference_mode():
            stream.x = torch.cat([h.x[sl] + layer.mlp(layer.post_attention_norm(h.x[sl])) for sl in h.chunks()])
        state.update({k: v.to("cpu", dtype) for k, v in w.items()})
    cfg = dict(cfg_full, layers=layers_cfg, linear_ranks=ranks, torch_dtype=str(dtype).replace("torch.", ""))
    cfg["modegpt"] = {"version": __version__, "source": {"spec": spec, **source.fingerprint}, "ratio": opts.ratio,
                      "baseline": method, "calibration": {"data": opts.calib, "samples": opts.calib_samples,
                                                          "seqlen": opts.calib_seqlen, "seed": opts.seed}}
    bl = {"original": block_linear_params(cfg_full), "compressed": block_linear_params(cfg)}
    tp = {"original": total_params(cfg_full), "compressed": total_params(cfg)}
    report = {"baseline": method, "ratio": opts.ratio, "block_linear_params": bl, "total_params": tp,
              "block_linear_ratio": 1 - bl["compressed"] / bl["original"],
              "whole_model_ratio": 1 - tp["compressed"] / tp["original"],
              "timings": {"total_s": time.perf_counter() - t0}}
    write_checkpoint(Path(out), cfg, state, source.tokenizer_dir, report, overwrite=overwrite)
    return report
