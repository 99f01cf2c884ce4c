"""Every Triton kernel compiles for the H200 (sm_90) at real shapes, on a machine without a GPU.

The interpreter tests (``TRITON_INTERPRET=1``) prove the kernels' arithmetic, but they never run Triton's
compiler: a kernel that only breaks in codegen (a layout the MMA lowering rejects, a constexpr branch the
front end cannot type), or a configuration that needs more shared memory than an SM has (session 4 found
one on the H200: the low-rank expand at fp32 asked for 248 KB), used to surface only on the lent GPU,
whose time is scarce. Here each entry point runs on CPU tensors with a stand-in for Triton's CUDA driver
that reports an sm_90 target; ``JITFunction.run`` compiles (front end, TTGIR, PTX, and ptxas to a cubin)
and launches nothing, and a compiled kernel whose shared memory exceeds the H200's 227 KB per block
raises ``OutOfResources`` exactly where the real launch would, so the untuned launcher's fallback to the
next configuration is exercised as on the GPU. The outputs are never read.

The SM count the split heuristics see is the H200's (132), so the compiled variants are the ones the
engine launches there. Skipped under the interpreter and on a machine with a GPU (there the CUDA tests
compile and run the same kernels)."""
from __future__ import annotations

import pytest
import torch

from kernels._common import HAVE_TRITON, interpret_mode

pytestmark = pytest.mark.skipif(not HAVE_TRITON or interpret_mode() or torch.cuda.is_available(),
                                reason="compile-only check for CPU machines with Triton, outside the interpreter")

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100/H200: 227 KB)
H200_SMS = 132


class _Sm90Driver:
    """What ``JITFunction.run`` asks of the active driver before a launch, for a GPU that is not here."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@pytest.fixture
def sm90(monkeypatch):
    """Compile-only launches for sm_90; yields the list of compiled kernels (name, shared bytes)."""
    import importlib

    import triton
    from triton.runtime import driver, jit

    import kernels._common

    compiled: list[tuple[str, int]] = []
    real_run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        shared = kernel.metadata.shared
        if shared > SMEM_LIMIT:
            raise triton.runtime.errors.OutOfResources(shared, SMEM_LIMIT, "shared memory")
        compiled.append((kernel.name, shared))
        return kernel

    monkeypatch.setattr(jit.JITFunction, "run", compile_only)
    monkeypatch.setattr(kernels._common, "pdl_enabled", lambda device: True)  # the H200 launches use PDL
    for name in ("kernels.decode_attention", "kernels.lowrank"):  # modules (the package exports functions of these names)
        monkeypatch.setattr(importlib.import_module(name), "sm_count", lambda device: H200_SMS)
    monkeypatch.setenv("MODEGPT_AUTOTUNE", "off")  # nothing to time: the first configuration that fits
    saved = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield compiled
    finally:
        driver._active = saved


def _t(*shape, dtype):
    return torch.zeros(shape, dtype=dtype)


# bf16 is what the engine serves on the GPU. fp32 (the CUDA tests' reference dtype, tiles twice the
# bytes) is compiled for the low-rank kernels, where a configuration overflowed shared memory before; the
# other kernels at fp32 cost four minutes of CI here, and the CUDA tests launch them at fp32 anyway.
BF16 = pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])


@BF16
def test_decode_attention_compiles_for_sm90(sm90, dtype):
    """Decode attention at the 7B original's and the 30 % checkpoint's head dims (128; 112, 96, 88 and 80,
    read in one or two chunks), GQA with odd dims, one and several partitions (combine folded or
    launched), every launch configuration the engine picks, four KV heads per program, and the RoPE
    variant."""
    from kernels.decode_attention import (DEFAULT_CONFIG, auto_config, decode_attention_triton,
                                          rope_decode_attention_triton)

    for H, hkv, dqk, dv in ((32, 32, 128, 128), (32, 32, 112, 112), (32, 32, 96, 96), (32, 32, 88, 80),
                            (9, 3, 46, 38)):
        for B, capacity in ((1, 4096), (64, 256), (256, 1024)):
            blocks = capacity // 16
            q = _t(B, H, dqk, dtype=dtype)
            kc, vc = _t(B * blocks, 16, hkv, dqk, dtype=dtype), _t(B * blocks, 16, hkv, dv, dtype=dtype)
            tables = torch.zeros(B, blocks, dtype=torch.int32)
            lens = torch.ones(B, dtype=torch.int32)
            counters = torch.zeros(B * hkv, dtype=torch.int32)
            auto = auto_config(capacity, dqk, dv, B, H // hkv)  # what decode_attention_triton picks (config None)
            packed = dict(auto, KV_PACK=4)  # four KV heads per program, also where auto does not pack
            for config in (None, DEFAULT_CONFIG, auto, packed):
                decode_attention_triton(q, kc, vc, tables, lens, 0.1, config=config, counters=counters)
                decode_attention_triton(q, kc, vc, tables, lens, 0.1, config=config)
        k, v = _t(1, hkv * dqk, dtype=dtype), _t(1, hkv * dv, dtype=dtype)
        rope_decode_attention_triton(_t(1, H * dqk, dtype=dtype), k, v, torch.zeros(1, dtype=torch.long),
                                     torch.ones(hkv, dqk // 2), kc[:16], vc[:16], torch.zeros(1, dtype=torch.long),
                                     tables[:1, :1], lens[:1], 0.1)
    assert {name for name, _ in sm90} >= {"_attn_partition_kernel", "_combine_kernel"}


@BF16
@pytest.mark.parametrize("prefetch_mib", [0, 16], ids=["no-prefetch", "l2-prefetch"])
def test_decode_step_kernels_compile_for_sm90(sm90, dtype, prefetch_mib, monkeypatch):
    """The rest of a decode step at the 30 % 7B checkpoint's shapes: skinny linears (plain, SwiGLU in
    the prologue or the epilogue, add + RMSNorm folded in, projection + RoPE + cache write), RoPE + cache
    write, add + RMSNorm and SwiGLU, at 1, 16 and 64 tokens; with and without the skinny kernels' L2
    prefetch (its inline PTX goes through ptxas here)."""
    monkeypatch.setenv("MODEGPT_L2_PREFETCH", str(prefetch_mib))
    from kernels.fused_norm import add_rms_norm_triton, silu_mul_triton
    from kernels.rope import rope_qkv_triton_
    from kernels.skinny_linear import norm_skinny_linear_triton, skinny_linear_rope_triton, skinny_linear_triton

    hidden, inter, heads, d, dv = 4096, 7288, 32, 88, 80
    for T in (1, 16, 64):
        x = _t(T, hidden, dtype=dtype)
        skinny_linear_triton(x, _t(hidden, hidden, dtype=dtype))
        skinny_linear_triton(x, _t(2 * inter, hidden, dtype=dtype), swiglu_out=True)
        skinny_linear_triton(_t(T, 2 * inter, dtype=dtype), _t(hidden, inter, dtype=dtype), gated=True)
        norm_skinny_linear_triton(x, x, _t(hidden, dtype=dtype), 1e-5, _t(inter, hidden, dtype=dtype))
        add_rms_norm_triton(x, x, _t(hidden, dtype=dtype), 1e-5)
        silu_mul_triton(_t(T, inter, dtype=dtype), _t(T, inter, dtype=dtype))
        pos, slots = torch.zeros(T, dtype=torch.long), torch.arange(T)
        freq = torch.ones(heads, d // 2)
        kc, vc = _t(64, 16, heads, d, dtype=dtype), _t(64, 16, heads, dv, dtype=dtype)
        rope_qkv_triton_(_t(T, heads * d, dtype=dtype), _t(T, heads * d, dtype=dtype), _t(T, heads * dv, dtype=dtype),
                         pos, freq, kc, vc, slots)
        skinny_linear_rope_triton(x, _t(heads * (2 * d + dv), hidden, dtype=dtype), None, heads, pos, freq, kc, vc,
                                  slots)
    assert len(sm90) >= 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lowrank_kernels_compile_for_sm90(sm90, dtype):
    """The factorized linear at the 7B and 13B MLP shapes, ranks 25-75 %, from one token (the one-launch
    decode kernel, the K-split shrink with PDL and the two-stage split-K path) to prefill sizes (the tiled
    shrink and expand)."""
    from kernels.lowrank import lowrank_decode_triton, lowrank_linear_triton, shrink_split_triton

    for k, n in ((4096, 11008), (11008, 4096), (5120, 13824)):
        for r in (k * n // (k + n) // 4, 3 * k * n // (k + n) // 4):
            A, B = _t(r, k, dtype=dtype), _t(n, r, dtype=dtype)
            for M in (1, 16, 256, 2048):
                lowrank_linear_triton(_t(M, k, dtype=dtype), A, B)
            for M in (1, 16):
                lowrank_decode_triton(_t(M, k, dtype=dtype), A, B)
                shrink_split_triton(_t(M, k, dtype=dtype), A)
    assert all(shared <= SMEM_LIMIT for _, shared in sm90) and len(sm90) >= 6
