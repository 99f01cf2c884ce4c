"""The one place that decides Triton or PyTorch for the model's custom ops.

Policy (read per call, so tests and operators can flip it at run time):

* ``MODEGPT_KERNELS=torch``: always the PyTorch reference (``kernels.reference``).
* default (``auto``): Triton when every tensor is on a CUDA device and Triton imports; otherwise
  PyTorch. CPU tensors always take PyTorch...
* ...except under ``MODEGPT_KERNELS=triton`` with ``TRITON_INTERPRET=1``, where CPU tensors run the
  Triton kernels on Triton's CPU interpreter (the tests' way to check the kernels without a GPU).
* Inputs a kernel does not support (dtypes other than fp32/fp16/bf16, mixed dtypes, odd rotary
  dims, no unit inner stride) take the PyTorch path.
* ``lowrank_linear`` in ``auto`` mode uses Triton only up to ``MODEGPT_LOWRANK_TRITON_MAX_TOKENS``
  tokens (default **0**: never) and two cuBLAS matmuls above. Measured on the H200 on 2026-11-28 and
  again on 2026-11-29 (``kernels.bench``, bf16, LLaMA-2 7B/13B MLP shapes, ranks 25-75 %): the fused
  kernel ran at 0.57-0.82x of two cuBLAS calls at 1-64 tokens and 0.40-0.87x at 256-8192, so
  ``auto`` never picks it: it runs the two matmuls through ``linear`` (so each decode-sized stage
  takes the faster of the skinny kernel and cuBLAS, measured per shape). That keeps the promise
  "never slower than two cuBLAS calls" by dispatch while the fused kernel stays available
  (``MODEGPT_KERNELS=triton`` or a positive threshold) for the work in kernels/NOTES.md. The one-launch
  decode kernel ``lowrank.lowrank_decode_triton`` measured 0.72-1.11x of two cuBLAS calls (2026-11-29)
  and is not routed to either; it also shares one counter block per device, so two engines on separate
  streams of one GPU must not run it concurrently. At decode sizes (rows <= ``skinny_max_tokens()``)
  the two stages are picked as a pair (``skinny_linear.lowrank_pick``: the shrink skinny, split over K
  (``lowrank.shrink_split_triton``) or cuBLAS, the expand skinny or cuBLAS, timed together, because
  with PDL a skinny expand overlaps a Triton shrink; two cuBLAS calls are preferred unless another
  pair times 3 % faster): 1.01-1.30x of two cuBLAS calls at one token and rank 25 % on the H200
  (session 10, docs/BENCHMARKS.md), 1.3x for 7B's down projection with the split shrink.
* ``linear`` (dense) in ``auto`` mode uses the skinny Triton kernel (``kernels.skinny_linear``) for
  at most ``MODEGPT_SKINNY_MAX_TOKENS`` rows (default and cap 64: decode steps) on the weight shapes where
  it timed faster than cuBLAS (once per shape, ``skinny_linear.beats_cublas``), cuBLAS otherwise.
* ``swiglu_linear`` (a gated MLP's SwiGLU + down projection) at decode sizes runs as one skinny
  launch that applies the SwiGLU while loading its input, where that timed faster than
  ``silu_mul`` + ``linear`` (per shape, like ``linear``).
* ``swiglu_mlp`` (the whole gated MLP) at decode sizes: the gate/up skinny launch with the SwiGLU
  as its epilogue, then the down ``linear``, where that timed faster than ``linear`` +
  ``swiglu_linear`` (per shape).
* ``add_rms_norm_linear`` / ``add_rms_norm_swiglu_mlp`` (a residual add + RMSNorm and the matmul
  after it) fold the norm into the skinny matmul at decode sizes under ``MODEGPT_FUSED_NORM=1``
  (off by default: 4-22 % slower on the H200 at 1-16 tokens, docs/BENCHMARKS.md session 6); otherwise
  ``add_rms_norm`` then the matmul.
* ``decode_attention`` picks its launch configuration from the block table's width and the head dims
  (``decode_attention.auto_config``: head dims read in power-of-two chunks, 96 = 64 + 32; key tiles of
  32 for tables of at most 256 positions, 64 above, with three pipeline stages for a dim padded inside
  one chunk; measured on the H200, sessions 7 and 8);
  ``MODEGPT_ATTN_CONFIG=BLOCK_N/<warps>w/<stages>s[/cd]`` forces one for A/B runs (``/cd``: chunked dims).
* ``linear_rope_qkv_`` (a layer's fused q/k/v projection, RoPE and KV-cache write) at decode sizes is one
  skinny launch with the rotation and the cache write as its epilogue (``skinny_linear_rope_triton``), in
  ``auto`` mode where that timed faster than ``linear`` + ``rope_qkv_`` (per shape, ``rope_qkv_pick``);
  otherwise that chain.
* ``decode_attention`` with ``counters`` combines a split context in its last partition (one launch);
  ``rope_decode_attention`` also does the RoPE and the new token's cache write in that launch
  (the engine's ``MODEGPT_ROPE_ATTENTION=1``; off by default, slower at 1 and 64 sequences on the H200).
* On SM90+ GPUs our kernels use programmatic dependent launch (``_common.pdl_enabled``;
  ``MODEGPT_PDL=0`` turns it off): a kernel's weight loads start while the previous kernel finishes.
  So the weights given to ``linear``/``swiglu_linear``/``swiglu_mlp``/``lowrank_linear`` must not be
  written by the kernel launched just before on the same stream (model weights never are).
* In ``auto`` mode an unexpected Triton failure (e.g. a compiler resource error on an untested
  GPU) is reported once as a warning and the call falls back to PyTorch; ``MODEGPT_KERNELS=triton``
  is strict and raises, so tests and benchmarks never measure the fallback by accident.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _common, reference
from ._common import HAVE_TRITON, SUPPORTED_DTYPES, interpret_mode

if HAVE_TRITON:
    # Imported eagerly: a lazy ``from .decode_attention import ...`` would rebind the package
    # attribute ``kernels.decode_attention`` from this module's function to the submodule.
    from .decode_attention import decode_attention_triton, parse_config, rope_decode_attention_triton
    from .fused_norm import add_rms_norm_triton, silu_mul_triton
    from .lowrank import lowrank_linear_triton, shrink_split_triton
    from .rope import rope_gather_triton_, rope_qkv_triton_
    from .skinny_linear import MAX_M as _SKINNY_MAX_M
    from .skinny_linear import m_pad as _skinny_m_pad
    from .skinny_linear import (_timed_pick, beats_cublas, dense_pick, lowrank_pick, norm_skinny_linear_triton,
                                skinny_linear_triton, split_k_applies, split_k_mode)

_ENV = "MODEGPT_KERNELS"
_LOWRANK_MAX_ENV = "MODEGPT_LOWRANK_TRITON_MAX_TOKENS"
_SKINNY_MAX_ENV = "MODEGPT_SKINNY_MAX_TOKENS"
_FUSED_NORM_ENV = "MODEGPT_FUSED_NORM"
_ATTN_CONFIG_ENV = "MODEGPT_ATTN_CONFIG"
_warned: set[str] = set()


def kernels_mode() -> str:
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{_ENV} must be auto, torch or triton, not {mode!r}")
    return mode


def backend_for(*tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"torch"`` for a call on these tensors (``None`` entries are ignored)."""
    mode = kernels_mode()
    if mode == "torch" or not HAVE_TRITON:
        return "torch"
    ts = [t for t in tensors if t is not None]
    if ts and all(t.is_cuda for t in ts):
        return "triton"
    if mode == "triton" and interpret_mode() and ts and all(t.device.type == "cpu" for t in ts):
        return "triton"
    return "torch"


def lowrank_triton_max_tokens() -> int:
    return int(os.environ.get(_LOWRANK_MAX_ENV, "0"))


def _run(name: str, triton_fn, torch_fn, tensors, supported: bool):
    if not supported or backend_for(*tensors) != "triton":
        return torch_fn()
    if kernels_mode() == "triton":
        return triton_fn()
    try:
        return triton_fn()
    except Exception as exc:  # noqa: BLE001 - any kernel failure falls back, loudly, once
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"kernels.{name}: Triton path failed ({exc!r}); using PyTorch", RuntimeWarning)
        return torch_fn()


def lowrank_backend(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> str:
    """Where :func:`lowrank_linear` runs: the general policy, dtype support, and (``auto`` mode)
    the token threshold above which cuBLAS is faster."""
    if backend_for(x, A, B, bias, out) != "triton":
        return "torch"
    if not (x.dtype in SUPPORTED_DTYPES and A.dtype == x.dtype and B.dtype == x.dtype
            and A.dim() == 2 and B.dim() == 2):
        return "torch"
    if kernels_mode() == "auto" and x.numel() > lowrank_triton_max_tokens() * x.shape[-1]:
        return "torch"  # prefill-sized: two cuBLAS matmuls are faster (see the module doc)
    return "triton"


def lowrank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ A.T) @ B.T + bias`` for a factorized linear: A ``[r, in]``, B ``[out, r]``, x
    ``[..., in]`` -> ``[..., out]`` in x's dtype (fp32 accumulation). ``out`` (optional,
    ``[..., out]``, x's dtype) receives the result, e.g. a static buffer of a captured graph."""
    ok = lowrank_backend(x, A, B, bias, out) == "triton"

    def tri():
        return lowrank_linear_triton(x, A, B, bias, out)

    def two_linears():  # on CUDA, decode-sized: the faster pair of skinny kernels / cuBLAS calls
        if not x.is_cuda or kernels_mode() == "torch":
            return reference.lowrank_linear_torch(x, A, B, bias, out)
        rows = x.numel() // max(1, x.shape[-1])
        if _skinny_ok(x, A, None, rows) and B.dtype == x.dtype and B.stride(-1) == 1:
            x2 = x.reshape(rows, x.shape[-1])
            first, second = lowrank_pick(x2, A, B, bias)
            if first == "split":
                t = shrink_split_triton(x2, A)
            else:
                t = skinny_linear_triton(x2, A) if first == "skinny" else torch.nn.functional.linear(x2, A)
            if second == "skinny":
                return skinny_linear_triton(t.view(*x.shape[:-1], -1), B, bias, out)
            y = torch.nn.functional.linear(t, B, bias).view(*x.shape[:-1], -1)
        else:
            y = linear(linear(x, A), B, bias)
        return y if out is None else out.copy_(y)

    return _run("lowrank_linear", tri, two_linears, (x, A, B, bias, out), ok)


def skinny_max_tokens() -> int:
    """Rows up to which ``linear`` takes the skinny Triton kernel (env, default 64, capped at 64; 16 before
    session 10, whose H200 A/B at batch 64 made the 30 % checkpoint 1.012x faster with 64, the original 0.998x)."""
    return min(int(os.environ.get(_SKINNY_MAX_ENV, "64")), _SKINNY_MAX_M if HAVE_TRITON else 0)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> bool:
    """Whether the skinny kernel supports this call (dtypes, layout, decode-sized ``rows``)."""
    return (x.dtype in SUPPORTED_DTYPES and weight.dtype == x.dtype and weight.dim() == 2 and weight.stride(-1) == 1
            and (bias is None or bias.dtype == x.dtype) and 0 < rows <= skinny_max_tokens())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``x @ W.T + bias`` (W ``[out, in]``): the skinny Triton kernel for decode-sized x (at
    most :func:`skinny_max_tokens` rows) where it timed faster than cuBLAS, cuBLAS otherwise; with
    ``MODEGPT_SKINNY_SPLIT_K`` (opt-in) also a K-split kernel for 2-64 tokens (``skinny_linear.dense_pick``)."""
    rows = x.numel() // max(1, x.shape[-1])
    ok = _skinny_ok(x, weight, bias, rows)
    choice = "ours"
    if ok and backend_for(x, weight, bias, out) == "triton":
        x2 = x.reshape(rows, x.shape[-1])
        split_ok = (out is None or out.is_contiguous()) and split_k_applies(x2, weight, bias)
        if split_ok and split_k_mode() == "force":
            choice = "split"
        elif kernels_mode() == "auto":
            choice = dense_pick(x2, weight, bias)  # per shape, measured once
            if choice == "split" and not split_ok:
                choice = "ours"
            ok = choice != "theirs"

    def tri():
        if choice == "split":  # MODEGPT_SKINNY_SPLIT_K: K split over ~2 waves of programs, no bias
            return shrink_split_triton(x, weight, out)
        return skinny_linear_triton(x, weight, bias, out)

    return _run("linear", tri, lambda: reference.linear_torch(x, weight, bias, out), (x, weight, bias, out), ok)


def rope_gather_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, out: torch.Tensor,
                 slot_mapping: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 v_out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply gathered rotate-half RoPE to projection outputs and store them; returns ``out``.

    ``x``: ``[T, heads * d]`` (or ``[T, heads, d]``; a row-strided view into a fused QKV output is
    fine); ``positions``: ``[T]`` ints; ``inv_freq``: fp32 ``[Hkv, d/2]``, the original rotary
    frequencies of the pairs each KV head kept (``inv_freq[qk_index[g][:d/2] mod head_dim/2]``).
    Head ``h`` rotates at ``inv_freq[h // (heads / Hkv)]``, so pass ``heads = H`` for queries and
    ``Hkv`` for keys. Angles are ``fp32(position * inv_freq)`` as in HF.

    Destination: with ``slot_mapping=None``, ``out`` is ``[T, heads, d]`` (may be ``x`` itself:
    in place); otherwise ``out`` is a KV cache ``[num_slots, heads, d]`` or paged
    ``[num_blocks, block_size, heads, d]`` (slot = block * block_size + offset) and token t goes
    to slot ``slot_mapping[t]``; negative slots are skipped. ``v`` ``[T, heads * d_v]`` with
    ``v_out`` (the value cache, same layout) is copied to the same slots unrotated.
    """
    d = 2 * inv_freq.shape[-1]
    ok = (x.dtype in SUPPORTED_DTYPES and inv_freq.dtype == torch.float32 and out.dtype in SUPPORTED_DTYPES
          and x.stride(-1) == 1 and out.stride(-1) == 1 and d > 0
          and (v is None or (v.dtype in SUPPORTED_DTYPES and v.stride(-1) == 1)))

    def tri():
        return rope_gather_triton_(x, positions, inv_freq, out, slot_mapping, v, v_out)

    return _run("rope_gather_", tri,
                lambda: reference.rope_gather_torch_(x, positions, inv_freq, out, slot_mapping, v, v_out),
                (x, positions, inv_freq, out, slot_mapping, v, v_out), ok)


def rope_qkv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> torch.Tensor:
    """A layer's RoPE and cache write in one call: ``q`` ``[T, H * d]`` is rotated in place (query
    head h at ``inv_freq[h // (H / Hkv)]``), ``k`` ``[T, Hkv * d]`` is rotated into ``k_cache`` and
    ``v`` ``[T, Hkv * d_v]`` copied into ``v_cache`` at ``slot_mapping`` (negative slots skipped),
    i.e. :func:`rope_gather_` for the queries and for the keys with values, as ONE launch on the
    GPU. Row-strided views into a fused QKV output are fine. Returns q as ``[T, H, d]``."""
    d = 2 * inv_freq.shape[-1]
    ok = (q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and k_cache.dtype == q.dtype
          and v_cache.dtype == q.dtype and inv_freq.dtype == torch.float32 and d > 0
          and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)

    def tri():
        return rope_qkv_triton_(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping).view(
            positions.shape[0], -1, d)

    return _run("rope_qkv_", tri,
                lambda: reference.rope_qkv_torch_(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping),
                (q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping), ok)


def attention_config() -> dict | None:
    """``MODEGPT_ATTN_CONFIG`` (e.g. ``32/4w/2s/cd``, see ``decode_attention.parse_config``): one launch
    configuration for every decode attention call, for A/B runs; None (the kernel's own choice) when
    unset. A malformed value raises ValueError."""
    name = os.environ.get(_ATTN_CONFIG_ENV, "").strip()
    return parse_config(name) if name and HAVE_TRITON else None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, max_context_len: int | None = None,
                     counters: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention: ``q`` ``[B, H, d_qk]`` against each sequence's first
    ``context_lens[b]`` cached keys/values -> ``[B, H, d_v]``.

    Caches are ``[num_blocks, block_size, Hkv, d]`` (as :func:`rope_gather_` writes them; a 3-D
    ``[num_slots, Hkv, d]`` cache means ``block_size = 1``), ``block_tables`` ``[B, max_blocks]``
    int32 maps position ``p`` to block ``block_tables[b, p // block_size]``. ``scale`` is the
    softmax scale (MoDeGPT: the ORIGINAL ``head_dim ** -0.5``). Query head h reads KV head
    ``h // (H / Hkv)``. ``max_context_len`` (host int) only narrows the work partitioning.
    ``counters`` (GPU): a zeroed int32 buffer of at least ``B * Hkv`` that no concurrent call shares
    (the engine keeps one per model); with it a split context is combined by the last partition to
    finish instead of a second launch.
    """
    ok = (q.dtype in SUPPORTED_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
          and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
          and block_tables.stride(-1) == 1)

    config = attention_config()

    def tri():
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out,
                                       max_context_len=max_context_len, counters=counters, config=config)

    def ref():
        return reference.decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, out)

    return _run("decode_attention", tri, ref, (q, k_cache, v_cache, block_tables, context_lens, out), ok)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                          scale: float, out: torch.Tensor | None = None,
                          max_context_len: int | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's attention from the raw projection outputs: :func:`rope_qkv_` (RoPE of the
    queries and keys at the kept frequencies, keys and values written to the cache at
    ``slot_mapping``) then :func:`decode_attention`, with ``q`` ``[B, H * d]``, ``k`` ``[B, Hkv * d]``
    and ``v`` ``[B, Hkv * d_v]`` (row-strided views of a fused QKV output are fine; ``q`` is not
    modified). On the GPU it is one launch: each attention program rotates its query heads, and the
    program that owns the newest position writes the new key and value before it reads the cache
    (two launches fewer per layer than the two ops with ``counters``, as in :func:`decode_attention`;
    one fewer without, where a split context needs its combine launch)."""
    d = 2 * inv_freq.shape[-1]
    ok = (q.dtype in SUPPORTED_DTYPES and all(t.dtype == q.dtype for t in (k, v, k_cache, v_cache))
          and inv_freq.dtype == torch.float32 and d > 0 and block_tables.stride(-1) == 1
          and all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache)))

    def tri():
        return rope_decode_attention_triton(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
                                            block_tables, context_lens, scale, out, max_context_len=max_context_len,
                                            counters=counters)

    def ref():
        return reference.rope_decode_attention_torch(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
                                                     block_tables, context_lens, scale, out)

    return _run("rope_decode_attention", tri, ref,
                (q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, block_tables, context_lens, out), ok)


_MAX_NORM_COLS = 1 << 16  # one program holds a whole row


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_out: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``(s, rms_norm(s) * weight)`` with ``s = x + delta`` (``x`` when
    ``delta`` is None). ``x``/``delta`` ``[..., n]``, ``weight`` ``[n]``, one dtype. The two outputs
    may be given (``residual_out``, ``out``)."""
    ok = (x.dtype in SUPPORTED_DTYPES and weight.dtype == x.dtype and weight.is_contiguous()
          and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape))
          and 0 < x.shape[-1] <= _MAX_NORM_COLS)

    def tri():
        return add_rms_norm_triton(x, delta, weight, eps, residual_out, out)

    return _run("add_rms_norm", tri, lambda: reference.add_rms_norm_torch(x, delta, weight, eps, residual_out, out),
                (x, delta, weight, residual_out, out), ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The SwiGLU epilogue ``silu(gate) * up`` in one pass (``gate``/``up`` ``[..., n]``, one dtype)."""
    ok = gate.dtype in SUPPORTED_DTYPES and up.dtype == gate.dtype and gate.shape == up.shape

    def tri():
        return silu_mul_triton(gate, up, out)

    return _run("silu_mul", tri, lambda: reference.silu_mul_torch(gate, up, out), (gate, up, out), ok)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's down projection with its SwiGLU: ``linear(silu(gate) * up, weight, bias)`` for a
    fused gate/up output ``gate_up`` ``[..., 2K]`` (gate first) and ``weight`` ``[N, K]``.

    At decode sizes (rows <= :func:`skinny_max_tokens`) the skinny kernel computes the SwiGLU while
    loading its activation tile: one launch instead of two, and no ``[M, K]`` round trip through
    memory. In ``auto`` mode only for the shapes where that timed faster than the two-launch chain
    (``beats_cublas(..., gated=True)``); otherwise :func:`silu_mul` then :func:`linear`."""
    K = weight.shape[-1] if weight.dim() == 2 else -1
    rows = gate_up.numel() // max(1, gate_up.shape[-1])
    ok = (gate_up.shape[-1] == 2 * K and gate_up.dtype in SUPPORTED_DTYPES and weight.dtype == gate_up.dtype
          and weight.stride(-1) == 1 and gate_up.stride(-1) == 1 and (bias is None or bias.dtype == gate_up.dtype)
          and 0 < rows <= skinny_max_tokens())
    if ok and kernels_mode() == "auto" and backend_for(gate_up, weight, bias, out) == "triton":
        ok = beats_cublas(gate_up.reshape(rows, 2 * K), weight, bias, gated=True)

    def tri():
        return skinny_linear_triton(gate_up, weight, bias, out, gated=True)

    def chain():
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(silu_mul(gate, up), weight, bias, out)

    return _run("swiglu_linear", tri, chain, (gate_up, weight, bias, out), ok)


def swiglu_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None,
               weight: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """A whole SwiGLU MLP: ``linear(silu(gate) * up, weight, bias)`` with ``gate | up = linear(x,
    gate_up_weight, gate_up_bias)`` (a fused ``[2I, H]`` weight, gate rows first; down ``weight``
    ``[H, I]``).

    At decode sizes there are two ways, timed against each other once per shape in CUDA graphs
    (``mlp_pick``): the gate/up skinny launch with the SwiGLU in its epilogue (it writes ``[M, I]``)
    followed by :func:`linear`; or :func:`linear` for gate/up followed by :func:`swiglu_linear`
    (which itself picks the fused-input launch or ``silu_mul`` + :func:`linear`). The first saves a
    launch per layer and recomputes nothing. Elsewhere: the second, i.e. the PyTorch sequence.
    ``MODEGPT_SWIGLU_EPILOGUE=0`` / ``1`` (read per call) takes the second / the first wherever the kernels
    run, without timing (A/B runs: session 11 saw the pick flip between calls that tuned the same shapes)."""
    rows = x.numel() // max(1, x.shape[-1])
    two_i = gate_up_weight.shape[0] if gate_up_weight.dim() == 2 else -1
    ok = (_skinny_ok(x, gate_up_weight, gate_up_bias, rows) and two_i % 2 == 0 and weight.dim() == 2
          and weight.shape[-1] == two_i // 2 and (gate_up_bias is None or gate_up_bias.stride(0) == 1))
    forced = os.environ.get("MODEGPT_SWIGLU_EPILOGUE", "auto").strip().lower()
    if forced in ("0", "off", "no"):
        ok = False
    elif ok and forced not in ("1", "on", "yes") and kernels_mode() == "auto" and \
            backend_for(x, gate_up_weight, gate_up_bias, weight, bias, out) == "triton":
        ok = mlp_pick(x.reshape(rows, x.shape[-1]), gate_up_weight, gate_up_bias, weight, bias) == "epilogue"

    def tri():
        return linear(skinny_linear_triton(x, gate_up_weight, gate_up_bias, swiglu_out=True), weight, bias, out)

    def chain():
        return swiglu_linear(linear(x, gate_up_weight, gate_up_bias), weight, bias, out)

    return _run("swiglu_mlp", tri, chain, (x, gate_up_weight, gate_up_bias, weight, bias, out), ok)


def fused_norm_enabled() -> bool:
    """``MODEGPT_FUSED_NORM=1``: fold residual add + RMSNorm into the matmul after it at decode sizes
    (:func:`add_rms_norm_linear`, :func:`add_rms_norm_swiglu_mlp`). Off by default: on the H200 it
    measured 0.95-0.96x at batch 1 and 0.78-0.83x at 16 (every program re-reads the whole row for its
    sum of squares; docs/BENCHMARKS.md, session 6); with the squares summed once per program and its tiles
    timed like the others (session 12), 1.00x at batch 1, 0.83-0.86x at 16 and 0.62-0.72x at 64. Read per call."""
    return os.environ.get(_FUSED_NORM_ENV, "0").strip().lower() in ("1", "on", "true", "yes")


def _fused_norm_ok(x, delta, norm_weight, weight, bias, rows) -> bool:
    return (fused_norm_enabled() and _skinny_ok(x, weight, bias, rows)
            and backend_for(x, delta, norm_weight, weight, bias) == "triton" and norm_weight.dtype == x.dtype
            and norm_weight.dim() == 1 and norm_weight.shape[0] == x.shape[-1] and norm_weight.stride(0) == 1
            and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape))
            and (bias is None or bias.stride(0) == 1))


def add_rms_norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, linear(rms_norm(s) * norm_weight, weight, bias))`` with ``s = x + delta``: with
    :func:`fused_norm_enabled` at decode sizes on CUDA one skinny launch
    (``skinny_linear.norm_skinny_linear_triton``), otherwise :func:`add_rms_norm` then :func:`linear`."""
    rows = x.numel() // max(1, x.shape[-1])

    def tri():
        return norm_skinny_linear_triton(x, delta, norm_weight, eps, weight, bias)

    def separate():
        s, h = add_rms_norm(x, delta, norm_weight, eps)
        return s, linear(h, weight, bias)

    return _run("add_rms_norm_linear", tri, separate, (x, delta, norm_weight, weight, bias),
                _fused_norm_ok(x, delta, norm_weight, weight, bias, rows))


def add_rms_norm_swiglu_mlp(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, swiglu_mlp(rms_norm(s) * norm_weight, ...))`` with ``s = x + delta``: with
    :func:`fused_norm_enabled` at decode sizes on CUDA the norm folded into the gate/up launch (with
    the SwiGLU as its epilogue), then :func:`linear`; otherwise :func:`add_rms_norm` then :func:`swiglu_mlp`."""
    rows = x.numel() // max(1, x.shape[-1])
    ok = (_fused_norm_ok(x, delta, norm_weight, gate_up_weight, gate_up_bias, rows) and gate_up_weight.shape[0] % 2 == 0
          and weight.dim() == 2 and weight.shape[-1] == gate_up_weight.shape[0] // 2)

    def tri():
        s, h = norm_skinny_linear_triton(x, delta, norm_weight, eps, gate_up_weight, gate_up_bias, swiglu_out=True)
        return s, linear(h, weight, bias)

    def separate():
        s, h = add_rms_norm(x, delta, norm_weight, eps)
        return s, swiglu_mlp(h, gate_up_weight, gate_up_bias, weight, bias)

    return _run("add_rms_norm_swiglu_mlp", tri, separate, (x, delta, norm_weight, gate_up_weight, gate_up_bias, weight,
                                                           bias), ok)


def mlp_pick(x2: torch.Tensor, gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None,
             weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """``"epilogue"`` or ``"chain"`` for :func:`swiglu_mlp` at this shape: the faster in CUDA graphs
    (``skinny_linear._timed_pick``, once per shape; None during another graph's capture)."""
    key = ("swiglu_mlp", tuple(gate_up_weight.shape), tuple(weight.shape), _skinny_m_pad(x2.shape[0]),
           x2.dtype, gate_up_bias is not None, bias is not None, x2.device, _common.launch_mode(x2.device))
    return _timed_pick(key, {
        "epilogue": lambda gu, w: linear(skinny_linear_triton(x2, gu, gate_up_bias, swiglu_out=True), w, bias),
        "chain": lambda gu, w: swiglu_linear(linear(x2, gu, gate_up_bias), w, bias)}, x2.device,
        prefer="epilogue", weights=(gate_up_weight, weight))


def _linear_rope_dims(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                      positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> tuple[int, int]:
    """``(T, d)`` of a :func:`linear_rope_qkv_` call, or a ValueError naming what does not fit."""
    if inv_freq.dim() != 2 or inv_freq.shape[0] == 0 or inv_freq.shape[1] == 0:
        raise ValueError(f"inv_freq must be [Hkv, d/2], got {tuple(inv_freq.shape)}")
    hkv, half = inv_freq.shape
    d = 2 * half
    if num_heads <= 0 or num_heads % hkv:
        raise ValueError(f"{num_heads} query heads do not group over {hkv} KV heads")
    if k_cache.dim() not in (3, 4) or v_cache.dim() != k_cache.dim():
        raise ValueError(f"caches must be [num_slots, Hkv, d] or [num_blocks, block_size, Hkv, d], got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    dv = v_cache.shape[-1]
    if k_cache.shape[-2:] != (hkv, d) or v_cache.shape[:-1] != k_cache.shape[:-1] or dv == 0:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold {hkv} heads of {d} / d_v")
    rows = (num_heads + hkv) * d + hkv * dv
    if weight.dim() != 2 or weight.shape[0] != rows or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be the fused q/k/v weight [H*d + Hkv*d + Hkv*dv = {rows}, {x.shape[-1]}] "
                         f"(x {tuple(x.shape)}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias must be [{rows}], got {tuple(bias.shape)}")
    T = x.numel() // max(1, x.shape[-1])
    if positions.shape != (T,) or slot_mapping.shape != (T,):
        raise ValueError(f"positions and slot_mapping must be [{T}] (one per token of x), got "
                         f"{tuple(positions.shape)} / {tuple(slot_mapping.shape)}")
    return T, d


def linear_rope_qkv_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                     positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """A layer's fused q/k/v projection with its RoPE and KV-cache write: ``qkv = linear(x, weight,
    bias)`` (``weight`` ``[H*d + Hkv*d + Hkv*dv, K]``: q rows, k rows, v rows), then :func:`rope_qkv_` on
    its three parts (queries rotated, keys rotated into ``k_cache`` and values copied into ``v_cache`` at
    ``slot_mapping``, negative slots skipped). ``x`` ``[T, K]`` (or ``[..., K]`` with T rows), ``positions``
    and ``slot_mapping`` ``[T]``, ``inv_freq`` fp32 ``[Hkv, d/2]``. Returns the rotated queries ``[T, H, d]``.

    At decode sizes (rows <= :func:`skinny_max_tokens`) on the GPU it can be ONE launch
    (``skinny_linear.skinny_linear_rope_triton``: the skinny matmul with the rotation and the cache write
    as its epilogue, bit for bit the chain's rounding); in ``auto`` mode only where that timed faster than
    the chain (``rope_qkv_pick``, once per shape). Otherwise the chain :func:`linear` + :func:`rope_qkv_`
    (PyTorch on the CPU: ``reference.linear_torch`` + ``reference.rope_qkv_torch_``)."""
    T, d = _linear_rope_dims(x, weight, bias, num_heads, positions, inv_freq, k_cache, v_cache, slot_mapping)
    tensors = (x, weight, bias, positions, inv_freq, k_cache, v_cache, slot_mapping)
    ok = (_skinny_ok(x, weight, bias, T) and inv_freq.dtype == torch.float32 and inv_freq.stride(-1) == 1
          and k_cache.dtype == x.dtype and v_cache.dtype == x.dtype and k_cache.stride(-1) == 1
          and v_cache.stride(-1) == 1 and (bias is None or bias.stride(0) == 1)
          and not positions.dtype.is_floating_point and not slot_mapping.dtype.is_floating_point)
    if ok and kernels_mode() == "auto" and backend_for(*tensors) == "triton":
        ok = rope_qkv_pick(x.reshape(T, x.shape[-1]), weight, bias, num_heads, positions, inv_freq, k_cache, v_cache,
                           slot_mapping) == "fused"

    def tri():
        from .skinny_linear import skinny_linear_rope_triton

        return skinny_linear_rope_triton(x.reshape(T, x.shape[-1]), weight, bias, num_heads, positions, inv_freq,
                                         k_cache, v_cache, slot_mapping).view(T, num_heads, d)

    def chain():
        return _linear_rope_chain(x.reshape(T, x.shape[-1]), weight, bias, num_heads, positions, inv_freq, k_cache,
                                  v_cache, slot_mapping)

    return _run("linear_rope_qkv_", tri, chain, tensors, ok)


def _linear_rope_chain(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                       positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """What :func:`linear_rope_qkv_` replaces: :func:`linear`, split into q/k/v views, :func:`rope_qkv_`."""
    hkv, half = inv_freq.shape
    d, dv = 2 * half, v_cache.shape[-1]
    qkv = linear(x2, weight, bias)
    q, k, v = qkv.split([num_heads * d, hkv * d, hkv * dv], dim=-1)
    return rope_qkv_(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)


def rope_qkv_pick(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                  positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> str | None:
    """``"fused"`` or ``"chain"`` for :func:`linear_rope_qkv_` at this shape: the faster in CUDA graphs
    (``skinny_linear._timed_pick``, once per shape; None during another graph's capture). Both candidates
    write this call's own keys and values to its own slots (the same values the call then writes)."""
    from .skinny_linear import skinny_linear_rope_triton

    key = ("linear_rope_qkv", tuple(weight.shape), num_heads, tuple(inv_freq.shape), v_cache.shape[-1],
           _skinny_m_pad(x2.shape[0]), x2.dtype, bias is not None, x2.device,
           _common.launch_mode(x2.device))
    args = (num_heads, positions, inv_freq, k_cache, v_cache, slot_mapping)
    return _timed_pick(key, {
        "fused": lambda w: skinny_linear_rope_triton(x2, w, bias, *args),
        "chain": lambda w: _linear_rope_chain(x2, w, bias, *args)}, x2.device, prefer="fused", weights=(weight,))
