"""The layer-by-layer compression driver: MODEL spec -> ModeGPT checkpoint.

Memory: one decoder layer lives on the device at a time, with the calibration hidden states
``[N, L, d]`` and the float64 correlations of that layer; weights stream from the source (safetensors
shards, or generated on the device for ``random:`` presets) and compressed layers go back to the CPU.

Passes:
1. (BI allocation only) run the original model once over the calibration set to get each layer's
   Block Influence score, then allocate per-layer sparsity.
2. Per layer: collect the attention statistics on the layer's input, compress query-key (Type II)
   and value-output (Type III); collect the MLP correlation on the input that the compressed
   attention produces; compress the MLP (Type I). With ``sequential=True`` the next layer is
   calibrated on the output of this compressed layer, so later layers see (and correct for) the
   error of earlier ones; with ``sequential=False`` (default, as in the paper: it measured as well or
   better, docs/COMPRESSION.md) every layer sees the original model's activations.
3. (``head_rank_ratio``, off by default) factorize the LM head by whitened SVD on the correlation of
   the final normed hidden states of the same stream, and the embedding with it (``head.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .allocation import LayerSizes, allocate, block_influence, kept_sizes, realised_ratio, resolve_alignment
from .calibration import calibration_ids
from .checkpoint import write_checkpoint
from .decompose import gather_qk, nystrom_mlp, qk_select, svd_vo
from .head import factorize_head, final_hidden_correlation, head_rank
from .loading import source_config, source_globals, source_layer
from .modeling import ModeGPTConfig, ModeGPTDecoderLayer
from .schema import block_linear_params, total_params
from .sources import resolve


@dataclass
class CompressOptions:
    ratio: float
    calib: str = "wikitext2"
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    allocation: str = "bi"
    device: str = "cpu"
    eps: float = 0.1
    cap: float = 0.8
    ridge: float = 0.1
    refit_damping: float = 0.0
    align: int | None = None  # None: by model size (allocation.resolve_alignment)
    head_align: int | None = None
    sequential: bool = False
    head_rank_ratio: float | None = None  # factorize the LM head + embedding keeping this rank fraction (head.py)
    head_untie: bool = False  # tied models: factorize head and embedding separately instead of sharing
    head_whiten: bool = True  # head: activation-whitened SVD (False: plain SVD)
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    dtype: torch.dtype | None = None  # compute/storage dtype; default: the source's (bf16 on CUDA)
    extra: dict = field(default_factory=dict)

    def defaults(self) -> "CompressOptions":
        """Calibration size: the paper's 128 x 2048 on CUDA; 32 x 256 on CPU (minutes for 135M)."""
        on_gpu = self.device.startswith("cuda")
        self.calib_samples = self.calib_samples or (128 if on_gpu else 32)
        self.calib_seqlen = self.calib_seqlen or (2048 if on_gpu else 256)
        return self


class _Stream:
    """The calibration hidden states, processed in micro-batches of sequences."""

    def __init__(self, x: torch.Tensor, batch: int):
        self.x, self.batch = x, batch

    def chunks(self):
        for s in range(0, self.x.shape[0], self.batch):
            yield slice(s, s + self.batch)


def _layer_module(cfg: ModeGPTConfig, i: int, weights: dict[str, torch.Tensor]) -> ModeGPTDecoderLayer:
    with torch.device("meta"):
        layer = ModeGPTDecoderLayer(cfg, i)
    prefix = f"model.layers.{i}."
    layer.load_state_dict({k[len(prefix):]: v for k, v in weights.items()}, strict=True, assign=True)
    return layer.eval()


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)


@torch.inference_mode()
def _attention_stats(layer: ModeGPTDecoderLayer, stream: _Stream, cfg: ModeGPTConfig):
    attn = layer.self_attn
    d = cfg.head_dim
    c_x = torch.zeros(cfg.hidden_size, cfg.hidden_size, dtype=torch.float64, device=stream.x.device)
    q_sq = torch.zeros(attn.n_heads, d, dtype=torch.float64, device=stream.x.device)
    k_sq = torch.zeros(attn.n_kv, d, dtype=torch.float64, device=stream.x.device)
    tokens = 0
    for sl in stream.chunks():
        h = layer.input_norm(stream.x[sl]).flatten(0, 1)
        hd = h.double()
        c_x += hd.T @ hd
        q_sq += attn.q_proj(h).double().pow(2).sum(0).view(attn.n_heads, d)
        k_sq += attn.k_proj(h).double().pow(2).sum(0).view(attn.n_kv, d)
        tokens += h.shape[0]
    return c_x / tokens, q_sq / tokens, k_sq / tokens


@torch.inference_mode()
def _run_attention(layer: ModeGPTDecoderLayer, stream: _Stream) -> torch.Tensor:
    out = torch.empty_like(stream.x)
    for sl in stream.chunks():
        x = stream.x[sl]
        out[sl] = x + layer.self_attn(layer.input_norm(x), _positions(x), None, None)
    return out


@torch.inference_mode()
def _mlp_stats(layer: ModeGPTDecoderLayer, h: _Stream, width: int) -> torch.Tensor:
    mlp = layer.mlp
    c = torch.zeros(width, width, dtype=torch.float64, device=h.x.device)
    tokens = 0
    for sl in h.chunks():
        z = layer.post_attention_norm(h.x[sl]).flatten(0, 1)
        a = mlp.act(mlp.gate_proj(z)) * mlp.up_proj(z) if mlp.gated else mlp.act(mlp.up_proj(z))
        ad = a.double()
        c += ad.T @ ad
        tokens += a.shape[0]
    return c / tokens


@torch.inference_mode()
def _run_mlp(layer: ModeGPTDecoderLayer, h: _Stream) -> torch.Tensor:
    out = torch.empty_like(h.x)
    for sl in h.chunks():
        out[sl] = h.x[sl] + layer.mlp(layer.post_attention_norm(h.x[sl]))
    return out


def _compress_attention(w: dict, p: str, cfg: ModeGPTConfig, size: LayerSizes, stats) -> tuple[dict, list]:
    c_x, q_sq, k_sq = stats
    d, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    rope = cfg.position_type == "rope"
    a = p + "self_attn."
    out = dict(w)
    if size.qk_dim < d:
        index = qk_select(q_sq, k_sq, size.qk_dim, rope)
    else:
        index = [list(range(d))] * kv
    if size.qk_dim < d:
        group = heads // kv
        out[a + "q_proj.weight"], qb = gather_qk(w[a + "q_proj.weight"], w.get(a + "q_proj.bias"), index, d, group)
        out[a + "k_proj.weight"], kb = gather_qk(w[a + "k_proj.weight"], w.get(a + "k_proj.bias"), index, d, 1)
        if qb is not None:
            out[a + "q_proj.bias"], out[a + "k_proj.bias"] = qb, kb
    if size.v_dim < d:
        vo = svd_vo(c_x, w[a + "v_proj.weight"], w.get(a + "v_proj.bias"), w[a + "o_proj.weight"],
                    w.get(a + "o_proj.bias"), heads, kv, size.v_dim)
        dt = w[a + "v_proj.weight"].dtype
        out[a + "v_proj.weight"], out[a + "o_proj.weight"] = vo.v_weight.to(dt), vo.o_weight.to(dt)
        if vo.v_bias is not None:
            out[a + "v_proj.bias"] = vo.v_bias.to(dt)
        if vo.o_bias is not None:
            out[a + "o_proj.bias"] = vo.o_bias.to(dt)
    return out, index


def _compress_mlp(w: dict, p: str, cfg: ModeGPTConfig, keep: int, c: torch.Tensor, ridge: float,
                  damping: float) -> dict:
    m = p + "mlp."
    out = dict(w)
    width = w[m + "down_proj.weight"].shape[1]
    if keep >= width:
        return out
    res = nystrom_mlp(c, w[m + "down_proj.weight"], keep, ridge, damping)
    idx = res.index.to(w[m + "up_proj.weight"].device)
    names = ["up_proj"] + (["gate_proj"] if cfg.mlp_type == "gated" else [])
    for name in names:
        out[m + name + ".weight"] = w[m + name + ".weight"][idx]
        if m + name + ".bias" in w:
            out[m + name + ".bias"] = w[m + name + ".bias"][idx]
    out[m + "down_proj.weight"] = res.down.to(w[m + "down_proj.weight"].dtype)
    return out


def _embed(cfg: dict, globals_: dict, ids: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.embedding(ids, globals_["model.embed_tokens.weight"])
    if cfg.get("position_type") == "learned":
        pos = torch.arange(ids.shape[1], device=ids.device) + cfg.get("position_offset", 0)
        x = x + globals_["model.embed_positions.weight"][pos][None]
    return x


def compress(spec: str, out: Path, opts: CompressOptions, overwrite: bool = False) -> dict:
    """Compress MODEL ``spec`` into a checkpoint at ``out``; returns the compression report."""
    opts.defaults()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source = resolve(spec)
    dtype = opts.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg_full = source_config(source)
    n_layers = cfg_full["num_hidden_layers"]
    align, head_align = resolve_alignment(cfg_full, opts.align, opts.head_align)
    lm_head_rank = head_rank(cfg_full, opts.head_rank_ratio, align) if opts.head_rank_ratio else None
    tokenizer = source.load_tokenizer()
    ids = calibration_ids(tokenizer, opts.calib, opts.calib_samples, opts.calib_seqlen, cfg_full["vocab_size"],
                          opts.seed)
    if ids.shape[1] > cfg_full["max_position_embeddings"]:
        raise ValueError(f"--calib-seqlen {ids.shape[1]} exceeds the model's context {cfg_full['max_position_embeddings']}")
    globals_ = source_globals(source, cfg_full, device, dtype)
    x0 = _embed(cfg_full, globals_, ids.to(device))
    timings["load_and_calibration_data_s"] = time.perf_counter() - t_start

    hf_cfg = ModeGPTConfig(**{k: v for k, v in cfg_full.items() if k not in ("model_type", "architectures", "layers")},
                           layers=[dict(layer) for layer in cfg_full["layers"]])

    # pass 1: Block Influence of every original layer
    bi = [0.0] * n_layers
    if opts.allocation == "bi" and opts.ratio > 0:
        t = time.perf_counter()
        stream = _Stream(x0.clone(), opts.batch_size)
        for i in tqdm(range(n_layers), desc="block influence", disable=not opts.progress, unit="layer"):
            layer = _layer_module(hf_cfg, i, source_layer(source, cfg_full, i, device, dtype))
            h = _Stream(_run_attention(layer, stream), opts.batch_size)
            nxt = _run_mlp(layer, h)
            total, count = block_influence(stream.x, nxt)
            bi[i] = total / count
            stream.x = nxt
            del layer, h
        del stream
        timings["block_influence_s"] = time.perf_counter() - t
    phi = allocate(bi, opts.ratio, opts.eps, opts.cap, opts.allocation)
    sizes = kept_sizes(phi, cfg_full, align=align, rope_pairs=cfg_full["position_type"] == "rope",
                       head_align=head_align)

    # pass 2: compress layer by layer
    t = time.perf_counter()
    state = {k: v.cpu() for k, v in globals_.items()}
    layers_cfg, per_layer = [], []
    stream = _Stream(x0, opts.batch_size)
    t_attn = t_mlp = 0.0
    for i in tqdm(range(n_layers), desc=f"compress {opts.ratio:.0%}", disable=not opts.progress, unit="layer"):
        p = f"model.layers.{i}."
        w = source_layer(source, cfg_full, i, device, dtype)
        original = _layer_module(hf_cfg, i, w)
        ta = time.perf_counter()
        w, index = _compress_attention(w, p, hf_cfg, sizes[i], _attention_stats(original, stream, hf_cfg))
        spec_i = {"intermediate_size": cfg_full["layers"][i]["intermediate_size"], "qk_dim": sizes[i].qk_dim,
                  "v_dim": sizes[i].v_dim, "qk_index": index}
        hf_cfg.layers[i] = spec_i
        compressed = _layer_module(hf_cfg, i, w)
        h = _Stream(_run_attention(compressed if opts.sequential else original, stream), opts.batch_size)
        tm = time.perf_counter()
        t_attn += tm - ta
        if sizes[i].intermediate_size < spec_i["intermediate_size"]:
            c_mlp = _mlp_stats(original, h, spec_i["intermediate_size"])
            w = _compress_mlp(w, p, hf_cfg, sizes[i].intermediate_size, c_mlp, opts.ridge, opts.refit_damping)
            del c_mlp
        spec_i["intermediate_size"] = sizes[i].intermediate_size
        hf_cfg.layers[i] = spec_i
        compressed = _layer_module(hf_cfg, i, w)
        t_mlp += time.perf_counter() - tm
        stream.x = _run_mlp(compressed if opts.sequential else original, h)
        layers_cfg.append(spec_i)
        per_layer.append({"layer": i, "bi": bi[i], "sparsity": phi[i], **{k: v for k, v in spec_i.items() if k != "qk_index"}})
        state.update({k: v.to("cpu", dtype) for k, v in w.items()})
        del original, compressed, h, w
    timings["compress_s"] = time.perf_counter() - t
    timings["attention_s"], timings["mlp_s"] = t_attn, t_mlp

    cfg = dict(cfg_full)
    cfg["layers"] = layers_cfg
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    head = None
    if lm_head_rank is not None:
        t = time.perf_counter()
        c_head = final_hidden_correlation(hf_cfg, globals_, stream)
        cfg, state, head = factorize_head(cfg, state, c_head, lm_head_rank, opts.head_untie, opts.head_whiten)
        head["rank_ratio"] = opts.head_rank_ratio
        timings["head_s"] = time.perf_counter() - t
    cfg["modegpt"] = {
        "version": __version__,
        "source": {"spec": spec, **source.fingerprint},
        "ratio": opts.ratio,
        "realised_ratio": realised_ratio(cfg_full, sizes),
        "allocation": opts.allocation,
        "allocation_eps": opts.eps,
        "allocation_cap": opts.cap,
        "calibration": {"data": opts.calib, "samples": opts.calib_samples, "seqlen": opts.calib_seqlen,
                        "seed": opts.seed, "sequential": opts.sequential},
        "ridge": opts.ridge,
        "refit_damping": opts.refit_damping,
        "align": align,
        "head_align": head_align,
    }
    if head is not None:
        cfg["modegpt"]["lm_head"] = {k: head[k] for k in ("rank_ratio", "rank", "shared", "untied", "whiten")}
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "ratio": opts.ratio,
        "block_linear_params": {"original": block_linear_params(cfg_full), "compressed": block_linear_params(cfg)},
        "total_params": {"original": total_params(cfg_full), "compressed": total_params(cfg)},
        "layers": per_layer,
        "lm_head": head,
        "timings": timings,
        "device": str(device),
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "options": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(opts).items()},
    }
    bl, tp = report["block_linear_params"], report["total_params"]
    report["block_linear_ratio"] = 1 - bl["compressed"] / bl["original"]
    report["whole_model_ratio"] = 1 - tp["compressed"] / tp["original"]
    write_checkpoint(Path(out), cfg, state, source.tokenizer_dir, report, overwrite=overwrite)
    return report
