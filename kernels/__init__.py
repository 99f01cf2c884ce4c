"""Custom ops for compressed (MoDeGPT) models: Triton kernels with PyTorch reference paths.

Public API (all in :mod:`kernels.dispatch`, which picks Triton or PyTorch per call):

* :func:`linear` - dense linear; decode-sized inputs take a skinny weight-streaming kernel
  (``kernels.skinny_linear``)
* :func:`lowrank_linear` - fused factorized linear ``(x @ A.T) @ B.T + bias`` (``kernels.lowrank``)
* :func:`rope_gather_` - gathered RoPE written straight into a (paged) KV cache (``kernels.rope``)
* :func:`rope_qkv_` - a layer's query, key and value RoPE + cache write in one launch (``kernels.rope``)
* :func:`linear_rope_qkv_` - the fused q/k/v projection with that RoPE + cache write as its epilogue
  (``kernels.skinny_linear``), at decode sizes where it times faster than projection + :func:`rope_qkv_`
* :func:`decode_attention` - split-K decode attention with ``d_qk != d_v`` and GQA
  (``kernels.decode_attention``)
* :func:`rope_decode_attention` - a decode step's RoPE, cache write and attention in one launch
* :func:`add_rms_norm`, :func:`silu_mul` - residual add + RMSNorm and the SwiGLU epilogue, one pass
  each (``kernels.fused_norm``)
* :func:`swiglu_linear` - a gated MLP's SwiGLU + down projection, one skinny launch at decode sizes
* :func:`swiglu_mlp` - a whole SwiGLU MLP; at decode sizes the SwiGLU is the gate/up launch's epilogue
* :func:`add_rms_norm_linear`, :func:`add_rms_norm_swiglu_mlp` - residual add + RMSNorm and the matmul
  after it; ``MODEGPT_FUSED_NORM=1`` folds the norm into the matmul at decode sizes

``kernels.bench.run_kernel_bench(path)`` times them against the PyTorch sequences they replace.
Importing this package imports (does not compile) the Triton kernels when Triton is installed;
without Triton everything runs on the PyTorch paths.
"""
from .dispatch import (add_rms_norm, add_rms_norm_linear, add_rms_norm_swiglu_mlp, backend_for, decode_attention,
                       linear, linear_rope_qkv_, lowrank_linear, rope_decode_attention, rope_gather_, rope_qkv_,
                       silu_mul, swiglu_linear, swiglu_mlp)

__all__ = ["add_rms_norm", "add_rms_norm_linear", "add_rms_norm_swiglu_mlp", "backend_for", "decode_attention",
           "linear", "linear_rope_qkv_", "lowrank_linear", "rope_decode_attention", "rope_gather_", "rope_qkv_",
           "silu_mul", "swiglu_linear", "swiglu_mlp"]
