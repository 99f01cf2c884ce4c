"""Correctness of the custom ops (``kernels``) against float64 references written here.

Every check draws fresh random inputs (seed printed in the failure message; ``MODEGPT_TEST_SEED``
reproduces a run), fills the output with NaN first so unwritten elements fail, requires finite
output, and bounds the relative error ||out - ref|| / ||ref|| per dtype.

Where the Triton tests run:

* CUDA available: in this process, on the GPU, at small odd shapes and at LLaMA-2-7B shapes.
* CPU only: ``test_triton_suite_in_interpreter`` re-runs this file (and ``test_skinny_rope.py``) in a
  subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when kernels are decorated, so it cannot be switched on
  inside a process that may already have imported them; a subprocess also keeps it away from every
  other test file). In that child the ``test_triton_*`` tests run on small shapes.

The PyTorch reference paths (what CPU serving uses) are checked here too, in process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _common, dispatch

CUDA = torch.cuda.is_available()
INTERPRET = _common.interpret_mode()
TRITON_DEVICE = "cuda" if CUDA else ("cpu" if INTERPRET else None)
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="CPU without TRITON_INTERPRET: covered by test_triton_suite_in_interpreter")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = [1, 7, 300]
# Triton's interpreter casts fp32 -> bf16 toward zero (up to 2^-7 relative, twice round-to-nearest's
# error); a kernel that rounds three or four times on the way (gate and up, the SwiGLU, its product, a
# normalised input) measured up to 2.01e-2 there against the float64 reference (session 5, one seed of
# many); the GPU rounds to nearest and stays under the plain bf16 bound.
INTERP_BF16_CHAIN_TOL = 3e-2


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def nan_like(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int, what: str,
                 tol: float | None = None) -> None:
    tol = TOL[dtype] if tol is None else tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{what}: {bad} non-finite (unwritten?) elements; seed={seed}"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}; seed={seed} (MODEGPT_TEST_SEED={seed})"


def randn(*shape, dtype, device, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# float64 references (independent of kernels.reference)
# ------------------------------------------------------------------------------------------------
def ref_lowrank(x, A, B, bias):
    y = (x.double() @ A.double().t()) @ B.double().t()
    return y + bias.double() if bias is not None else y


def ref_rope(x, positions, inv_freq):
    """HF formulation: x * cos + rotate_half(x) * sin over the full head, angle = fp32(pos * f)."""
    T, heads, d = x.shape
    hkv = inv_freq.shape[0]
    out = torch.empty(T, heads, d, dtype=torch.float64, device=x.device)
    for h in range(heads):
        f = inv_freq[h // (heads // hkv)]
        ang = (positions.float()[:, None] * f.float()[None, :]).double()  # fp32 product, as HF
        ang = torch.cat([ang, ang], dim=-1)
        xh = x[:, h].double()
        rot = torch.cat([-xh[:, d // 2:], xh[:, : d // 2]], dim=-1)
        out[:, h] = xh * torch.cos(ang) + rot * torch.sin(ang)
    return out


def ref_decode_attention(q, k_cache, v_cache, block_tables, lens, scale):
    B, H, _ = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, H, v_cache.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        p = torch.arange(n, device=q.device)
        blk = block_tables[b].long()[p // bs]
        k = k_cache[blk, p % bs].double()  # [n, hkv, dqk]
        v = v_cache[blk, p % bs].double()
        for h in range(H):
            g = h // (H // hkv)
            w = torch.softmax((k[:, g] @ q[b, h].double()) * scale, dim=0)
            out[b, h] = w @ v[:, g]
    return out


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
# (in, out, rank): odd sizes whose tiles are ragged in every dim
LOWRANK_SMALL = [(96, 80, 37), (70, 130, 19)]
# LLaMA-2-7B linears (4096 -> 11008 up/gate, 11008 -> 4096 down) at 25 / 50 / 75 % rank, and
# SmolLM2's LM head (576 -> 49152 vocab) at 50 % rank (`modegpt compress --head-rank-ratio 0.5`)
LOWRANK_REAL = [(4096, 11008, 1024), (11008, 4096, 3072), (576, 49152, 288)]
LOWRANK_SHAPES = LOWRANK_SMALL + (LOWRANK_REAL if CUDA else [])

# (H, Hkv, d_qk, d_v): compressed attention with GQA groups of 3, then LLaMA-2-7B-like heads
ATTN_SMALL = [(6, 2, 46, 38)]
ATTN_REAL = [(32, 32, 128, 128), (32, 32, 96, 80), (32, 8, 46, 38)]
ATTN_SHAPES = ATTN_SMALL + (ATTN_REAL if CUDA else [])


def lowrank_inputs(M, K, N, R, dtype, device, bias=True, lead=()):
    x = randn(*lead, M, K, dtype=dtype, device=device)
    A = randn(R, K, dtype=dtype, device=device, scale=K ** -0.5)
    B = randn(N, R, dtype=dtype, device=device, scale=R ** -0.5)
    b = randn(N, dtype=dtype, device=device) if bias else None
    return x, A, B, b


def inv_freq_for(hkv, half, head_dim, device):
    """Kept rotary pairs per KV head: a sorted random subset of the original head's pairs."""
    base = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rows = [base[torch.randperm(head_dim // 2)[:half].sort().values] for _ in range(hkv)]
    return torch.stack(rows).float().to(device)


def paged_cache(num_blocks, block_size, hkv, d, dtype, device):
    return randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)


def attention_inputs(B, H, hkv, dqk, dv, dtype, device, max_len, block_size=16, lens=None):
    blocks_per_seq = math.ceil(max_len / block_size)
    num_blocks = B * blocks_per_seq + 3
    kc = paged_cache(num_blocks, block_size, hkv, dqk, dtype, device)
    vc = paged_cache(num_blocks, block_size, hkv, dv, dtype, device)
    tables = torch.randperm(num_blocks)[: B * blocks_per_seq].view(B, blocks_per_seq).int().to(device)
    if lens is None:
        lens = torch.randint(1, max_len + 1, (B,))
        lens[0] = max_len  # one full-length sequence: the last partition is ragged
    q = randn(B, H, dqk, dtype=dtype, device=device)
    return q, kc, vc, tables, lens.int().to(device)


# ------------------------------------------------------------------------------------------------
# dispatch policy
# ------------------------------------------------------------------------------------------------
def test_dispatch_policy(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("MODEGPT_KERNELS", raising=False)
    assert dispatch.backend_for(cpu) == "torch"
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    assert dispatch.backend_for(cpu) == "torch"
    monkeypatch.setenv("MODEGPT_KERNELS", "triton")
    assert dispatch.backend_for(cpu) == ("triton" if INTERPRET else "torch")
    if CUDA:
        gpu = cpu.cuda()
        assert dispatch.backend_for(gpu) == "triton"
        assert dispatch.backend_for(gpu, cpu) == "torch"
        A, B = torch.zeros(4, 8, device="cuda"), torch.zeros(6, 4, device="cuda")
        monkeypatch.setenv("MODEGPT_KERNELS", "auto")
        monkeypatch.delenv("MODEGPT_LOWRANK_TRITON_MAX_TOKENS", raising=False)
        assert dispatch.lowrank_backend(torch.zeros(1, 8, device="cuda"), A, B) == "torch"  # default: cuBLAS
        monkeypatch.setenv("MODEGPT_LOWRANK_TRITON_MAX_TOKENS", "16")
        assert dispatch.lowrank_backend(torch.zeros(2, 8, 8, device="cuda"), A, B) == "triton"
        assert dispatch.lowrank_backend(torch.zeros(17, 8, device="cuda"), A, B) == "torch"  # prefill: cuBLAS
        monkeypatch.setenv("MODEGPT_KERNELS", "triton")  # strict: always the kernel
        assert dispatch.lowrank_backend(torch.zeros(17, 8, device="cuda"), A, B) == "triton"
        monkeypatch.setenv("MODEGPT_KERNELS", "torch")
        assert dispatch.backend_for(gpu) == "torch"
    monkeypatch.setenv("MODEGPT_KERNELS", "cuda-please")
    with pytest.raises(ValueError):
        dispatch.backend_for(cpu)


# ------------------------------------------------------------------------------------------------
# PyTorch reference paths (CPU serving), in process
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_lowrank(seed, monkeypatch, dtype):
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    x, A, B, b = lowrank_inputs(7, 96, 80, 37, dtype, "cpu", lead=(2,))
    out = nan_like((2, 7, 80), dtype, "cpu")
    assert kernels.lowrank_linear(x, A, B, b, out=out) is out
    assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, "torch lowrank")


def test_torch_path_rope_and_attention(seed, monkeypatch):
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    T, H, hkv, dqk, dv = 7, 6, 2, 46, 38
    f = inv_freq_for(hkv, dqk // 2, 128, "cpu")
    pos = torch.randint(0, 4096, (T,))
    xq = randn(T, H * dqk, dtype=torch.float32, device="cpu")
    qo = nan_like((T, H, dqk), torch.float32, "cpu")
    kernels.rope_gather_(xq, pos, f, qo)
    assert_close(qo, ref_rope(xq.view(T, H, dqk), pos, f), torch.float32, seed, "torch rope")
    q, kc, vc, tables, lens = attention_inputs(3, H, hkv, dqk, dv, torch.float32, "cpu", max_len=50)
    lens[1] = 0  # an empty context attends to nothing: zeros
    out = nan_like((3, H, dv), torch.float32, "cpu")
    kernels.decode_attention(q, kc, vc, tables, lens, 128 ** -0.5, out=out)
    ref = ref_decode_attention(q, kc, vc, tables, lens, 128 ** -0.5)
    assert_close(out, ref, torch.float32, seed, "torch decode attention")
    assert torch.all(out[1] == 0)


# ------------------------------------------------------------------------------------------------
# Triton: low-rank linear
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_lowrank(seed, force_triton, shape, M, dtype):
    K, N, R = shape
    x, A, B, b = lowrank_inputs(M, K, N, R, dtype, TRITON_DEVICE, bias=(M != 7))
    assert dispatch.lowrank_backend(x, A, B, b) == "triton"
    out = nan_like((M, N), dtype, TRITON_DEVICE)
    assert kernels.lowrank_linear(x, A, B, b, out=out) is out
    assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, f"lowrank M={M} {shape} {dtype}")


@needs_triton
@pytest.mark.parametrize("splits", [2, 3, 5])  # 5 > the K tiles of K=96: empty splits write zeros
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_lowrank_split_k(seed, force_triton, splits, dtype):
    from kernels.lowrank import lowrank_linear_triton

    x, A, B, b = lowrank_inputs(7, 96, 80, 37, dtype, TRITON_DEVICE)
    out = nan_like((7, 80), dtype, TRITON_DEVICE)
    lowrank_linear_triton(x, A, B, b, out, splits=splits)
    assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, f"lowrank split_k={splits}")


def strided_lowrank_inputs(rows: int, dtype):
    """x ``[2, rows, 96]`` as a column slice (row stride 130), A ``[37, 96]`` stored transposed
    (strides (1, 37)), B ``[80, 37]``."""
    x = randn(2, rows, 130, dtype=dtype, device=TRITON_DEVICE)[..., 10:106]
    A = randn(96, 37, dtype=dtype, device=TRITON_DEVICE, scale=96 ** -0.5).t()
    B = randn(80, 37, dtype=dtype, device=TRITON_DEVICE, scale=37 ** -0.5)
    return x, A, B


@needs_triton
def test_triton_lowrank_strided_and_batched(seed, force_triton):
    """Leading batch dims, a non-contiguous x (column slice) and transposed-storage weights."""
    dtype = torch.bfloat16
    x, A, B = strided_lowrank_inputs(5, dtype)
    y = kernels.lowrank_linear(x, A, B)
    assert_close(y, ref_lowrank(x, A, B, None), dtype, seed, "lowrank strided")


@needs_triton
def test_triton_lowrank_deterministic(force_triton):
    """Split-K partials are summed in a fixed order: bitwise identical reruns (batch invariance)."""
    from kernels.lowrank import lowrank_linear_triton

    x, A, B, b = lowrank_inputs(7, 96, 80, 37, torch.bfloat16, TRITON_DEVICE)
    first = lowrank_linear_triton(x, A, B, b, splits=3)
    assert torch.equal(first, lowrank_linear_triton(x, A, B, b, splits=3))


# One-launch decode kernel (kernels.lowrank.lowrank_decode_triton). In the interpreter its tiles are
# RB = 16 rank rows, BK = 32, BN = 16, BR = 16 and two rank segments: rank 37 / 19 gives a ragged last
# chunk and segment, out 38 / 130 a ragged last output tile, in 46 / 70 a ragged K tail.
LOWRANK_DECODE_SHAPES = [(96, 80, 37), (46, 38, 19)] + (LOWRANK_REAL if CUDA else [])


def fused_counters_are_zero(device) -> bool:
    """The fused kernel's counter blocks are all zero (reset by the kernel itself; no wait gave up)."""
    from kernels import lowrank

    assert lowrank.fused_stuck_count(device) == 0, "a wait of the fused kernel gave up"
    blocks = lowrank.counter_blocks(device)
    return bool(blocks) and all(int(b.abs().sum()) == 0 for b in blocks)


@needs_triton
def test_lowrank_counter_blocks_are_per_weight(seed, force_triton):
    """Two factorized weights never share a counter block (two engines decode concurrently on their own
    streams), one weight always gets its own block back, and both are zero after their launches."""
    from kernels import lowrank

    K, N, R = LOWRANK_DECODE_SHAPES[0]
    x, A, B, b = lowrank_inputs(3, K, N, R, torch.float32, TRITON_DEVICE)
    _, A2, B2, _ = lowrank_inputs(3, K, N, R, torch.float32, TRITON_DEVICE)
    dev = torch.device(TRITON_DEVICE)
    n = lowrank._CHUNK_BASE + 1
    assert lowrank._counters(dev, n, A) is lowrank._counters(dev, n, A)
    assert lowrank._counters(dev, n, A).data_ptr() != lowrank._counters(dev, n, A2).data_ptr()
    lowrank.lowrank_decode_triton(x, A, B, b, splits=3)
    lowrank.shrink_split_triton(x, A2, splits=3)
    assert fused_counters_are_zero(TRITON_DEVICE)


def check_lowrank_decode(seed, M, shape, dtype, bias, splits=None, what=""):
    """NaN-poisoned output; close to float64; counters zero afterwards; a second call bitwise equal."""
    from kernels.lowrank import lowrank_decode_triton

    K, N, R = shape
    x, A, B, b = lowrank_inputs(M, K, N, R, dtype, TRITON_DEVICE, bias=bias)
    out = nan_like((M, N), dtype, TRITON_DEVICE)
    assert lowrank_decode_triton(x, A, B, b, out, splits=splits) is out
    assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, f"lowrank decode {what}")
    assert fused_counters_are_zero(TRITON_DEVICE), f"counters not reset: {what}; seed={seed}"
    again = lowrank_decode_triton(x, A, B, b, splits=splits)  # starts from the state the first call left
    assert torch.equal(again, out), f"second call differs: {what}; seed={seed}"


@needs_triton
@pytest.mark.parametrize("shape", LOWRANK_DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_lowrank_decode(seed, force_triton, shape, M, dtype):
    bias = (M != 7) != (shape[0] == 46)  # both with and without bias for every M and dtype
    check_lowrank_decode(seed, M, shape, dtype, bias, what=f"M={M} {shape} {dtype} bias={bias}")


@needs_triton
@pytest.mark.parametrize("splits", [2, 3, 5])  # 5 splits of K = 70 in BK = 32 steps: two empty splits
@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_lowrank_decode_split_k(seed, force_triton, splits, M, dtype):
    """K splits reduced by each chunk's last split; rank 37 is not a multiple of RB (16), out 130
    not a multiple of BN (16)."""
    check_lowrank_decode(seed, M, (70, 130, 37), dtype, True, splits, f"splits={splits} M={M} {dtype}")


@needs_triton
@pytest.mark.parametrize("M", [33, 64])  # tensor-core path with the tokens padded to 64
def test_triton_lowrank_decode_wide_batch(seed, force_triton, M):
    check_lowrank_decode(seed, M, (96, 80, 37), torch.float16, M == 33, 2, f"M={M}")


@needs_triton
def test_triton_lowrank_decode_strided_batched_and_empty(seed, force_triton):
    """Leading batch dims, a column-sliced x, transposed-storage A; rank 0 leaves only the bias."""
    from kernels.lowrank import lowrank_decode_triton

    dtype = torch.bfloat16
    x, A, B = strided_lowrank_inputs(3, dtype)
    y = lowrank_decode_triton(x, A, B)
    assert y.shape == (2, 3, 80)
    assert_close(y, ref_lowrank(x, A, B, None), dtype, seed, "lowrank decode strided")
    b = randn(80, dtype=dtype, device=TRITON_DEVICE)
    empty = lowrank_decode_triton(x, A[:0], B[:, :0], b)
    assert torch.equal(empty, b.expand(2, 3, 80))
    with pytest.raises(ValueError):
        lowrank_decode_triton(randn(65, 96, dtype=dtype, device=TRITON_DEVICE), A, B)


@pytest.mark.skipif(not CUDA, reason="needs CUDA graphs")
def test_triton_lowrank_decode_cuda_graph(seed, force_triton):
    """Captured once, replayed with new inputs: every replay matches (no host work per call)."""
    from kernels.lowrank import lowrank_decode_triton

    dtype = torch.bfloat16
    for K, N, R in [(96, 80, 37)] + LOWRANK_REAL[:2]:
        x, A, B, b = lowrank_inputs(4, K, N, R, dtype, "cuda")
        out = torch.empty(4, N, dtype=dtype, device="cuda")
        lowrank_decode_triton(x, A, B, b, out)  # compile + counters outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lowrank_decode_triton(x, A, B, b, out)
        for _ in range(3):
            x.copy_(randn(4, K, dtype=dtype, device="cuda"))
            out.fill_(float("nan"))
            graph.replay()
            assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, f"lowrank decode graph {(K, N, R)}")
        torch.cuda.synchronize()
        assert fused_counters_are_zero("cuda")


# K-split shrink (kernels.lowrank.shrink_split_triton): the fused kernel's shrink tiles as their own launch.
# In the interpreter RB = 16, BK = 32: rank 37 gives a ragged last chunk, K = 70 a ragged K tail, and 5
# splits of 70 leave two splits without a whole tile.
def ref_shrink(x, A):
    """``x @ A.T`` in float64, rounded once to x's dtype (what the first of two matmuls stores)."""
    return (x.double() @ A.double().T).to(x.dtype)


@needs_triton
@pytest.mark.parametrize("K,R", [(70, 37), (96, 19)] + ([(11008, 1024), (4096, 3072), (13824, 1280)] if CUDA else []),
                         ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("splits", [None, 1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_shrink_split(seed, force_triton, monkeypatch, K, R, M, splits, dtype):
    """NaN-poisoned output and partials; close to float64; counters zero afterwards (the chunk
    counters are shared with the fused kernel); a second call bitwise equal (partials summed in
    split order)."""
    from kernels.lowrank import shrink_split_triton

    monkeypatch.setattr(_common, "POISON_WORKSPACES", True)
    x = randn(M, K, dtype=dtype, device=TRITON_DEVICE)
    A = randn(R, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    out = nan_like((M, R), dtype, TRITON_DEVICE)
    assert shrink_split_triton(x, A, out, splits=splits) is out
    what = f"shrink split M={M} K={K} R={R} splits={splits} {dtype}"
    assert_close(out, ref_shrink(x, A), dtype, seed, what)
    assert fused_counters_are_zero(TRITON_DEVICE), f"counters not reset: {what}; seed={seed}"
    assert torch.equal(shrink_split_triton(x, A, splits=splits), out), f"second call differs: {what}; seed={seed}"


@needs_triton
def test_triton_shrink_split_shapes_and_errors(seed, force_triton):
    """Leading dims, a column-sliced x; K = 0 gives zeros; wrong shapes, dtypes, strides and more than
    64 rows are clear errors."""
    from kernels.lowrank import shrink_split_triton

    dtype = torch.bfloat16
    x = randn(2, 3, 130, dtype=dtype, device=TRITON_DEVICE)[..., 10:106]
    A = randn(37, 96, dtype=dtype, device=TRITON_DEVICE, scale=96 ** -0.5)
    t = shrink_split_triton(x, A, splits=2)
    assert t.shape == (2, 3, 37)
    assert_close(t, ref_shrink(x, A), dtype, seed, "shrink split strided")
    assert torch.equal(shrink_split_triton(x[..., :0], A[:, :0]), torch.zeros(2, 3, 37, dtype=dtype,
                                                                              device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="shape mismatch"):
        shrink_split_triton(x, A[:, :95])
    with pytest.raises(TypeError):
        shrink_split_triton(x, A.float())
    with pytest.raises(ValueError, match="unit stride"):
        shrink_split_triton(x, randn(96, 37, dtype=dtype, device=TRITON_DEVICE).t())
    with pytest.raises(ValueError, match="at most 64 rows"):
        shrink_split_triton(randn(65, 96, dtype=dtype, device=TRITON_DEVICE), A)
    with pytest.raises(ValueError, match="out must be"):
        shrink_split_triton(x, A, torch.empty(2, 3, 36, dtype=dtype, device=TRITON_DEVICE))


@pytest.mark.skipif(not CUDA, reason="needs CUDA graphs")
def test_split_pair_in_cuda_graph_same_bits_as_eager(seed, force_triton):
    """The pair dispatch can pick, ``skinny(shrink_split(x, A), B)``, captured and replayed with new
    inputs (under PDL on SM90+: the expand streams B while the shrink finishes): each replay equal to
    the eager pair bit for bit and close to float64."""
    from kernels.lowrank import shrink_split_triton
    from kernels.skinny_linear import skinny_linear_triton

    dtype = torch.bfloat16
    for M, (K, N, R) in ((1, (11008, 4096, 1024)), (16, (4096, 11008, 1024)), (5, (96, 80, 37))):
        x, A, B, b = lowrank_inputs(M, K, N, R, dtype, "cuda")
        out = torch.empty(M, N, dtype=dtype, device="cuda")
        skinny_linear_triton(shrink_split_triton(x, A), B, b, out)  # compile / tune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            skinny_linear_triton(shrink_split_triton(x, A), B, b, out)
        for rep in range(3):
            x.copy_(randn(M, K, dtype=dtype, device="cuda"))
            out.fill_(float("nan"))
            graph.replay()
            eager = skinny_linear_triton(shrink_split_triton(x, A), B, b)
            torch.cuda.synchronize()
            assert torch.equal(out, eager), f"replay {rep} differs from eager, M={M} {(K, N, R)}; seed={seed}"
            assert_close(out, ref_lowrank(x, A, B, b), dtype, seed, f"split pair graph M={M} {(K, N, R)}")
        assert fused_counters_are_zero("cuda")


@pytest.mark.skipif(not dispatch.HAVE_TRITON, reason="needs triton")
def test_lowrank_decode_prune():
    """The fused kernel's pruner: GEMV tiles for one token, MMA tiles (RB, BN >= 16) otherwise, each
    config with its K splits; KS_REQ forces them; the M = 64 path fits the shared-memory budget."""
    from kernels import lowrank

    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    named = {"x_ptr": x, "N": 11008, "K": 4096, "R": 1024, "KS_REQ": 0}
    gemv = lowrank._fused_prune(lowrank._fused_decode.configs, named, M_PAD=1)
    mma = lowrank._fused_prune(lowrank._fused_decode.configs, named, M_PAD=16)
    assert [c.kwargs["RB"] for c in gemv] == [c.kwargs["RB"] for c in lowrank._FUSED_GEMV_CONFIGS]
    assert mma and all(c.kwargs["RB"] >= 16 and c.kwargs["BN"] >= 16 for c in mma)
    for c in gemv + mma:
        assert c.kwargs["KS"] == lowrank.fused_splits(1024, 4096, c.kwargs["RB"], x.device)
        assert 1 <= c.kwargs["KS"] <= lowrank.MAX_KS
    forced = lowrank._fused_prune(lowrank._fused_decode.configs, {**named, "KS_REQ": 3}, M_PAD=16)
    assert all(c.kwargs["KS"] == 3 for c in forced)
    wide = lowrank._fused_prune(lowrank._fused_decode.configs, named, M_PAD=64)
    assert all(c.num_stages * 2 * max(64 * c.kwargs["BK"] + c.kwargs["BK"] * c.kwargs["RB"],
                                      64 * c.kwargs["BR"] + c.kwargs["BR"] * c.kwargs["BN"])
               <= lowrank._FUSED_SMEM_BUDGET for c in wide)
    tiny = lowrank._fused_prune(lowrank._fused_decode.configs, {**named, "N": 38, "K": 46, "R": 19}, M_PAD=16)
    smallest_bk = min(c.kwargs["BK"] for c in lowrank._FUSED_MMA_CONFIGS)  # > 64: the smallest one is kept
    assert tiny and all(c.kwargs["BN"] <= 64 and c.kwargs["BK"] == smallest_bk for c in tiny)


# ------------------------------------------------------------------------------------------------
# Triton: skinny (decode-sized) dense linear
# ------------------------------------------------------------------------------------------------
# (K, N): odd/ragged tiles; several K tiles with a tail and N ragged against 16-64 rows (264 x 150: 520 x 300 until
# session 12, 4x the interpreter time for the same cases); K % 8 only; no K tail
SKINNY_SHAPES = [(46, 37), (264, 150), (9880 // 20, 8), (64, 24)]
if CUDA:
    SKINNY_SHAPES += [(4096, 12288), (4096, 15056), (7528, 4096), (2816, 4096), (4096, 32000)]


def ref_linear(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@needs_triton
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16, 33])  # 33: the tokens padded to 64
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_skinny_linear(seed, force_triton, shape, M, dtype):
    K, N = shape
    x = randn(M, K, dtype=dtype, device=TRITON_DEVICE)
    w = randn(N, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    b = randn(N, dtype=dtype, device=TRITON_DEVICE) if M != 7 else None
    out = nan_like((M, N), dtype, TRITON_DEVICE)
    assert kernels.linear(x, w, b, out=out) is out
    assert_close(out, ref_linear(x, w, b), dtype, seed, f"skinny linear M={M} {shape} {dtype}")


@needs_triton
@pytest.mark.parametrize("swiglu_out", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("vec_acc", ["1", "0"], ids=["vec-acc", "reduce-each-tile"])
def test_triton_skinny_gemv_every_m1_tile(seed, force_triton, swiglu_out, vec_acc, monkeypatch):
    """The one-token path with each M = 1 tile config of the tuner (4-64 rows), poisoned output, ragged N
    and K, with the partial products reduced once after the K loop (``MODEGPT_SKINNY_VEC_ACC``, the
    default) and in every iteration. An untuned launch takes the first config the pruner keeps, so the
    kernel's config list is set to each config in turn; under the interpreter the launch takes
    ``_INTERPRET``'s tile, set to its rows."""
    from kernels import skinny_linear

    monkeypatch.setenv("MODEGPT_SKINNY_VEC_ACC", vec_acc)

    K, N = 70, 45
    x = randn(1, K, dtype=torch.float32, device=TRITON_DEVICE)
    w = randn(2 * N if swiglu_out else N, K, dtype=torch.float32, device=TRITON_DEVICE, scale=K ** -0.5)
    y = ref_linear(x, w, None)
    ref = torch.nn.functional.silu(y[:, :N]) * y[:, N:] if swiglu_out else y
    cfgs = [c for c in skinny_linear._CONFIGS if c in skinny_linear._prune(skinny_linear._CONFIGS, {}, M_PAD=1)]
    assert {c.kwargs["BLOCK_N"] for c in cfgs} >= {4, 8, 16, 32, 64}
    for cfg in cfgs:
        monkeypatch.setattr(skinny_linear._skinny, "configs", [cfg])
        monkeypatch.setattr(skinny_linear, "_INTERPRET", {"BLOCK_N": cfg.kwargs["BLOCK_N"], "BLOCK_K": 32})
        out = nan_like((1, N), torch.float32, TRITON_DEVICE)
        skinny_linear.skinny_linear_triton(x, w, out=out, swiglu_out=swiglu_out)
        assert_close(out, ref, torch.float32, seed, f"GEMV {skinny_linear.config_name(cfg)}")


def test_split_k_mode_reads_the_env(monkeypatch):
    from kernels.skinny_linear import split_k_mode

    for value, mode in (("", "off"), ("0", "off"), ("off", "off"), ("1", "auto"), ("auto", "auto"),
                        ("FORCE", "force"), ("maybe", "off")):
        monkeypatch.setenv("MODEGPT_SKINNY_SPLIT_K", value)
        assert split_k_mode() == mode


@needs_triton
@pytest.mark.parametrize("M", [7, 20])
@pytest.mark.parametrize("shape", [(70, 300)] + ([(4096, 4096), (11008, 4096)] if CUDA else []),
                         ids=lambda s: "x".join(map(str, s)))
def test_dense_linear_split_over_k(seed, force_triton, monkeypatch, M, shape):
    """``MODEGPT_SKINNY_SPLIT_K=force``: a dense decode matmul without bias runs as the K-split kernel
    (a spy around the real ``shrink_split_triton`` counts the calls; its counters are zero afterwards),
    poisoned output, close to float64; with a bias, or one token, it stays on the skinny kernel."""
    from kernels import dispatch, lowrank

    calls = []
    real = dispatch.shrink_split_triton

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "shrink_split_triton", spy)
    monkeypatch.setenv("MODEGPT_SKINNY_SPLIT_K", "force")
    K, N = shape
    x = randn(1, M, K, dtype=torch.float32, device=TRITON_DEVICE)
    w = randn(N, K, dtype=torch.float32, device=TRITON_DEVICE, scale=K ** -0.5)
    b = randn(N, dtype=torch.float32, device=TRITON_DEVICE)
    out = nan_like((1, M, N), torch.float32, TRITON_DEVICE)
    assert kernels.linear(x, w, out=out) is out
    assert calls == [(N, K)]
    assert_close(out, ref_linear(x, w, None), torch.float32, seed, f"split-K linear M={M}")
    assert all(int(c.abs().sum()) == 0 for c in lowrank.counter_blocks(TRITON_DEVICE))
    assert_close(kernels.linear(x, w, b), ref_linear(x, w, b), torch.float32, seed, "with bias: skinny")
    assert_close(kernels.linear(x[:, :1], w), ref_linear(x[:, :1], w, None), torch.float32, seed, "one token")
    assert len(calls) == 1


@needs_triton
def test_triton_skinny_linear_strided_rows_and_lead_dims(seed, force_triton):
    """x a column slice of a wider buffer, with leading dims; weight rows of an odd-but-8-aligned
    width (the alignment hint must not be claimed beyond what the stride gives)."""
    dtype = torch.bfloat16
    wide = randn(2, 3, 130, dtype=dtype, device=TRITON_DEVICE)
    x = wide[..., 10:114]  # [2, 3, 104], row stride 130
    w_full = randn(40, 106, dtype=dtype, device=TRITON_DEVICE, scale=0.1)
    w = w_full[:, 1:105]  # [40, 104], rows start at odd offsets: alignment 1
    y = kernels.linear(x, w)
    assert_close(y, ref_linear(x, w, None), dtype, seed, "skinny strided")


def ref_swiglu_linear(gate_up, w, b):
    g, u = gate_up.double().chunk(2, dim=-1)
    return ref_linear(torch.nn.functional.silu(g) * u, w, b)


@needs_triton
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16, 33])  # 33: the tokens padded to 64
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_swiglu_linear(seed, force_triton, shape, M, dtype):
    """The down projection with the SwiGLU applied while loading its input (gate | up side by side),
    and bitwise the same as the two-launch chain silu_mul -> skinny linear it replaces."""
    from kernels.fused_norm import silu_mul_triton
    from kernels.skinny_linear import skinny_linear_triton

    K, N = shape
    gate_up = randn(M, 2 * K, dtype=dtype, device=TRITON_DEVICE, scale=2.0)
    w = randn(N, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    b = randn(N, dtype=dtype, device=TRITON_DEVICE) if M != 7 else None
    out = nan_like((M, N), dtype, TRITON_DEVICE)
    assert kernels.swiglu_linear(gate_up, w, b, out=out) is out
    assert_close(out, ref_swiglu_linear(gate_up, w, b), dtype, seed, f"swiglu linear M={M} {shape} {dtype}")
    chain = skinny_linear_triton(silu_mul_triton(gate_up[:, :K], gate_up[:, K:]), w, b)
    assert torch.equal(out, chain), "fused SwiGLU must feed the matmul the same bits as silu_mul"


@needs_triton
def test_triton_swiglu_linear_views_and_lead_dims(seed, force_triton):
    """gate_up with leading dims and a row stride wider than 2K (a column slice); odd K (up starts at an
    odd offset: the alignment hint must fall back to 1)."""
    dtype = torch.bfloat16
    wide = randn(2, 3, 2 * 37 + 5, dtype=dtype, device=TRITON_DEVICE)
    gate_up = wide[..., 3:3 + 2 * 37]
    w = randn(29, 37, dtype=dtype, device=TRITON_DEVICE, scale=0.2)
    y = kernels.swiglu_linear(gate_up, w)
    assert y.shape == (2, 3, 29)
    assert_close(y, ref_swiglu_linear(gate_up, w, None), dtype, seed, "swiglu strided")


def ref_swiglu_mlp(x, w_gu, b_gu, w_d, b_d):
    gu = ref_linear(x, w_gu, b_gu)
    return ref_swiglu_linear(gu, w_d, b_d)


@needs_triton
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16, 33])  # 33: the tokens padded to 64
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_skinny_swiglu_epilogue(seed, force_triton, shape, M, dtype):
    """A fused gate/up matmul with the SwiGLU as its epilogue: ``silu(x @ Wg.T + bg) * (x @ Wu.T + bu)``,
    bit for bit ``silu_mul`` of the plain kernel's output (the chain it replaces)."""
    from kernels.fused_norm import silu_mul_triton
    from kernels.skinny_linear import skinny_linear_triton

    K, N = shape
    x = randn(M, K, dtype=dtype, device=TRITON_DEVICE)
    w = randn(2 * N, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    b = randn(2 * N, dtype=dtype, device=TRITON_DEVICE) if M != 7 else None
    out = nan_like((M, N), dtype, TRITON_DEVICE)
    assert skinny_linear_triton(x, w, b, out, swiglu_out=True) is out
    g, u = ref_linear(x, w, b).chunk(2, dim=-1)
    assert_close(out, torch.nn.functional.silu(g) * u, dtype, seed, f"swiglu epilogue M={M} {shape} {dtype}",
                 tol=INTERP_BF16_CHAIN_TOL if INTERPRET and dtype == torch.bfloat16 else None)
    plain = skinny_linear_triton(x, w, b)
    assert torch.equal(out, silu_mul_triton(plain[:, :N], plain[:, N:])), "epilogue must round like silu_mul"


@needs_triton
@pytest.mark.parametrize("forced", ["0", "1", "auto"])
def test_swiglu_mlp_epilogue_switch(seed, force_triton, monkeypatch, forced):
    """``MODEGPT_SWIGLU_EPILOGUE`` picks the MLP's launch sequence (epilogue / chain / timed), never its result:
    the same values as the float64 MLP, and with 0 the exact chain of ``linear`` then ``swiglu_linear``."""
    monkeypatch.setenv("MODEGPT_SWIGLU_EPILOGUE", forced)
    K, inter = 64, 40
    x = randn(1, K, dtype=torch.float32, device=TRITON_DEVICE)
    gu = randn(2 * inter, K, dtype=torch.float32, device=TRITON_DEVICE, scale=K ** -0.5)
    down = randn(K, inter, dtype=torch.float32, device=TRITON_DEVICE, scale=inter ** -0.5)
    out = kernels.swiglu_mlp(x, gu, None, down)
    g, u = ref_linear(x, gu, None).chunk(2, dim=-1)
    assert_close(out, ref_linear(torch.nn.functional.silu(g) * u, down, None), torch.float32, seed, f"mlp {forced}")
    if forced == "0":
        assert torch.equal(out, kernels.swiglu_linear(kernels.linear(x, gu), down))


def ref_norm_linear(x, d, nw, eps, w, b):
    """float64 reference of add + RMSNorm then linear, from the residual rounded as the kernel stores it."""
    s = (x.float() + d.float()).to(x.dtype) if d is not None else x
    sd = s.double()
    h = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    return s, ref_linear(h, w, b)


@needs_triton
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16, 33])  # 33: the tokens padded to 64
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("swiglu_out", [False, True], ids=["plain", "swiglu"])
def test_triton_norm_skinny_linear(seed, force_triton, shape, M, dtype, swiglu_out):
    """Residual add + RMSNorm folded into the skinny matmul (the row's 1/rms applied after the dot):
    the matmul matches the float64 reference of norm-then-linear, and the new residual stream is
    exactly x + d rounded, every element written (the K chunks are spread over the programs)."""
    from kernels.skinny_linear import norm_skinny_linear_triton

    K, N = shape
    x = randn(M, K, dtype=dtype, device=TRITON_DEVICE, scale=3.0)
    d = randn(M, K, dtype=dtype, device=TRITON_DEVICE) if M != 7 else None
    nw = randn(K, dtype=dtype, device=TRITON_DEVICE, scale=0.3) + 1
    rows = 2 * N if swiglu_out else N
    w = randn(rows, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    b = randn(rows, dtype=dtype, device=TRITON_DEVICE) if M != 16 else None
    s, y = norm_skinny_linear_triton(x, d, nw, 1e-5, w, b, swiglu_out=swiglu_out)
    s_ref, y_ref = ref_norm_linear(x, d, nw, 1e-5, w, b)
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 toward zero, torch to nearest
        assert_close(s, s_ref.double(), dtype, seed, "norm skinny residual", tol=1e-2)
    else:
        assert torch.equal(s, s_ref), "the residual stream must be x + d, rounded once, in every element"
    if swiglu_out:
        g, u = y_ref.chunk(2, dim=-1)
        y_ref = torch.nn.functional.silu(g) * u
    assert_close(y, y_ref, dtype, seed, f"norm skinny M={M} {shape} {dtype} swiglu={swiglu_out}",
                 tol=INTERP_BF16_CHAIN_TOL if INTERPRET and dtype == torch.bfloat16 else None)


def test_add_rms_norm_linear_cpu_takes_the_separate_path(seed, monkeypatch):
    """On CPU tensors (no interpreter) the folded norm is never used, even when enabled: add_rms_norm then
    the matmul, for the plain and the SwiGLU-MLP form."""
    monkeypatch.setenv("MODEGPT_FUSED_NORM", "1")
    assert dispatch.fused_norm_enabled()
    x, d = randn(3, 24, dtype=torch.float32, device="cpu"), randn(3, 24, dtype=torch.float32, device="cpu")
    nw = randn(24, dtype=torch.float32, device="cpu") + 1
    w = randn(10, 24, dtype=torch.float32, device="cpu")
    s, y = kernels.add_rms_norm_linear(x, d, nw, 1e-5, w)
    s_ref, y_ref = ref_norm_linear(x, d, nw, 1e-5, w, None)
    assert_close(s, s_ref.double(), torch.float32, seed, "residual")
    assert_close(y, y_ref, torch.float32, seed, "norm linear cpu")
    w_gu, w_d = randn(2 * 10, 24, dtype=torch.float32, device="cpu"), randn(24, 10, dtype=torch.float32, device="cpu")
    s, y = kernels.add_rms_norm_swiglu_mlp(x, d, nw, 1e-5, w_gu, None, w_d)
    h = s.double() * torch.rsqrt(s.double().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    assert_close(y, ref_swiglu_mlp(h, w_gu, None, w_d, None), torch.float32, seed, "norm swiglu mlp cpu")
    monkeypatch.setenv("MODEGPT_FUSED_NORM", "0")
    assert not dispatch.fused_norm_enabled()


@needs_triton
def test_triton_swiglu_mlp(seed, force_triton):
    """The whole SwiGLU MLP through dispatch (epilogue launch + down linear), leading dims, odd sizes."""
    dtype = torch.bfloat16
    K, I = 45, 37
    x = randn(2, 3, K, dtype=dtype, device=TRITON_DEVICE)
    w_gu = randn(2 * I, K, dtype=dtype, device=TRITON_DEVICE, scale=K ** -0.5)
    b_gu = randn(2 * I, dtype=dtype, device=TRITON_DEVICE)
    w_d = randn(K, I, dtype=dtype, device=TRITON_DEVICE, scale=I ** -0.5)
    y = kernels.swiglu_mlp(x, w_gu, b_gu, w_d, None)
    assert y.shape == (2, 3, K)
    assert_close(y, ref_swiglu_mlp(x, w_gu, b_gu, w_d, None), dtype, seed, "swiglu mlp")


def test_swiglu_mlp_torch_path_and_errors(seed, monkeypatch):
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    x = randn(5, 24, dtype=torch.float32, device="cpu")
    w_gu = randn(2 * 10, 24, dtype=torch.float32, device="cpu")
    w_d = randn(24, 10, dtype=torch.float32, device="cpu")
    b_d = randn(24, dtype=torch.float32, device="cpu")
    out = nan_like((5, 24), torch.float32, "cpu")
    assert kernels.swiglu_mlp(x, w_gu, None, w_d, b_d, out=out) is out
    assert_close(out, ref_swiglu_mlp(x, w_gu, None, w_d, b_d), torch.float32, seed, "swiglu mlp torch")
    if dispatch.HAVE_TRITON:
        from kernels.skinny_linear import skinny_linear_triton

        with pytest.raises(ValueError, match="even row count"):
            skinny_linear_triton(x, w_gu[:19], swiglu_out=True)
        with pytest.raises(ValueError, match="exclude each other"):
            skinny_linear_triton(x, w_gu, gated=True, swiglu_out=True)


def _pdl_chain(x, d, wn, w_up, w_down, A, B, b):
    """A decode-step-like chain in which every kernel reads the previous one's output: residual add +
    RMSNorm, gate/up matmul, SwiGLU + down matmul, a low-rank pair (shrink, expand), an add + RMSNorm
    folded into a gate/up matmul with the SwiGLU epilogue, and a final add + RMSNorm. Returns the last
    residual and normed outputs."""
    from kernels.fused_norm import add_rms_norm_triton
    from kernels.skinny_linear import norm_skinny_linear_triton, skinny_linear_triton

    s, h = add_rms_norm_triton(x, d, wn, 1e-5)
    gate_up = skinny_linear_triton(h, w_up)
    y = skinny_linear_triton(gate_up, w_down, gated=True)
    z = skinny_linear_triton(skinny_linear_triton(y, A), B, b)
    s, g = norm_skinny_linear_triton(s, z, wn, 1e-5, w_up, swiglu_out=True)
    return add_rms_norm_triton(s, skinny_linear_triton(g, w_down), wn, 1e-5)


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs a CUDA GPU (SM90+ to be active)")
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dims", [(200, 300, 37), (4096, 11008, 1024)], ids=lambda d: "x".join(map(str, d)))
def test_pdl_chain_in_cuda_graph_same_bits_as_without(seed, force_triton, monkeypatch, M, dims):
    """With PDL each kernel starts loading weights while its predecessor finishes and waits for it
    before reading activations. Captured in a CUDA graph and replayed with new inputs, the chain must
    give the same bits as with MODEGPT_PDL=0 (a missing wait would read the previous replay's stale
    activations) and match the float64 reference; so must the chain whose matmuls also prefetch
    their weights into the L2 before the wait (MODEGPT_L2_PREFETCH, weight loads evict_first)."""
    dtype = torch.bfloat16
    K, F, R = dims
    dev = "cuda"
    wn = randn(K, dtype=dtype, device=dev, scale=0.5) + 1
    w_up = randn(2 * F, K, dtype=dtype, device=dev, scale=K ** -0.5)
    w_down = randn(K, F, dtype=dtype, device=dev, scale=F ** -0.5)
    A = randn(R, K, dtype=dtype, device=dev, scale=K ** -0.5)
    B = randn(K, R, dtype=dtype, device=dev, scale=R ** -0.5)
    b = randn(K, dtype=dtype, device=dev)
    x = randn(M, K, dtype=dtype, device=dev)
    d = randn(M, K, dtype=dtype, device=dev)
    results = {}
    settings = {"pdl": ("1", "0"), "pdl+prefetch": ("1", "16"), "off": ("0", "16")}
    for name, (pdl, prefetch) in settings.items():
        monkeypatch.setenv("MODEGPT_PDL", pdl)
        monkeypatch.setenv("MODEGPT_L2_PREFETCH", prefetch)
        if name == "pdl+prefetch" and _common.pdl_enabled(torch.device(dev)):
            assert _common.l2_prefetch_bytes(torch.device(dev)) == 16 << 20
        _pdl_chain(x, d, wn, w_up, w_down, A, B, b)  # compile / tune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _pdl_chain(x, d, wn, w_up, w_down, A, B, b)
        got = []
        for rep in range(3):
            torch.manual_seed(seed + rep)
            x.copy_(randn(M, K, dtype=dtype, device=dev))
            d.copy_(randn(M, K, dtype=dtype, device=dev))
            for o in outs:
                o.fill_(float("nan"))
            graph.replay()
            got.append([o.clone() for o in outs])
            if pdl == "1":  # both PDL settings against the reference
                s_ref = (x.double() + d.double())
                hn = s_ref * torch.rsqrt(s_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * wn.double()
                gu = hn @ w_up.double().T
                y = ref_swiglu_linear(gu, w_down, None)
                s2 = s_ref + (y @ A.double().T) @ B.double().T + b.double()
                h2 = s2 * torch.rsqrt(s2.pow(2).mean(-1, keepdim=True) + 1e-5) * wn.double()
                s3 = s2 + ref_swiglu_linear(h2 @ w_up.double().T, w_down, None)
                ref = s3 * torch.rsqrt(s3.pow(2).mean(-1, keepdim=True) + 1e-5) * wn.double()
                assert_close(got[-1][1], ref, dtype, seed, f"PDL chain M={M} {dims}", tol=5e-2)
        torch.cuda.synchronize()
        results[name] = got
    for name in ("pdl", "pdl+prefetch"):
        for rep, (on, off) in enumerate(zip(results[name], results["off"])):
            for a, o in zip(on, off):
                assert torch.equal(a, o), f"replay {rep}: {name} changed the result (M={M} {dims}); seed={seed}"


def test_l2_prefetch_budget(monkeypatch):
    """MODEGPT_L2_PREFETCH is MiB per launch, 0 without PDL (never on CPU or with MODEGPT_PDL=0); each
    row gets a power of two of 128-byte lines within the budget, never more than the row rounded up."""
    monkeypatch.setenv("MODEGPT_L2_PREFETCH", "16")
    assert _common.l2_prefetch_bytes(torch.device("cpu")) == 0
    monkeypatch.setattr(_common, "pdl_enabled", lambda device: True)
    assert _common.l2_prefetch_bytes(torch.device("cpu")) == 16 << 20
    monkeypatch.setenv("MODEGPT_L2_PREFETCH", "0.5")
    assert _common.l2_prefetch_bytes(torch.device("cpu")) == 1 << 19
    monkeypatch.setenv("MODEGPT_L2_PREFETCH", "lots")
    with pytest.raises(ValueError, match="MODEGPT_L2_PREFETCH"):
        _common.l2_prefetch_bytes(torch.device("cpu"))
    lines = _common.prefetch_lines
    assert lines(16 << 20, 4096, 8192) == 32  # 4096 B per row: 32 lines
    assert lines(16 << 20, 22016, 8192) == 4  # 762 B per row: 5 lines, rounded down to 4
    assert lines(16 << 20, 11008, 2048) == 8  # 1524 B per row: 11 lines, rounded down to 8
    assert lines(16 << 20, 64, 1000) == 8  # capped at the row: 1000 B is 8 lines rounded up
    assert lines(16 << 20, 1 << 20, 8192) == 0  # under one line per row
    assert lines(0, 4096, 8192) == lines(1 << 20, 0, 8192) == 0
    for budget, rows, row_bytes in ((3 << 20, 12288, 8192), (5 << 19, 700, 184)):
        n = lines(budget, rows, row_bytes)
        assert n & (n - 1) == 0 and n * 128 * rows <= budget and n * 128 < 2 * row_bytes + 256


def test_pdl_is_off_on_cpu_and_when_disabled(monkeypatch):
    """PDL only ever applies to CUDA launches (never the interpreter), and MODEGPT_PDL=0 turns it off."""
    assert _common.pdl_meta(torch.device("cpu")) == {"PDL": False}
    if CUDA:
        monkeypatch.setenv("MODEGPT_PDL", "0")
        assert _common.pdl_meta(torch.device("cuda")) == {"PDL": False}
        monkeypatch.setenv("MODEGPT_PDL", "1")
        sm90 = torch.cuda.get_device_capability()[0] >= 9
        assert _common.pdl_enabled(torch.device("cuda")) == sm90


def test_swiglu_linear_torch_path_and_errors(seed, monkeypatch):
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    gate_up = randn(5, 2 * 24, dtype=torch.float32, device="cpu")
    w = randn(10, 24, dtype=torch.float32, device="cpu")
    b = randn(10, dtype=torch.float32, device="cpu")
    out = nan_like((5, 10), torch.float32, "cpu")
    assert kernels.swiglu_linear(gate_up, w, b, out=out) is out
    assert_close(out, ref_swiglu_linear(gate_up, w, b), torch.float32, seed, "swiglu torch")
    if dispatch.HAVE_TRITON:
        from kernels.skinny_linear import skinny_linear_triton

        with pytest.raises(ValueError, match="gated"):
            skinny_linear_triton(gate_up[:, :30], w, gated=True)


@pytest.mark.skipif(not dispatch.HAVE_TRITON, reason="needs triton")
def test_skinny_autotune_prune_reads_constexpr_keywords():
    """Triton hands the launch's constexpr keywords (M_PAD ...) to the pruner in kwargs: the dot path
    (M_PAD 16) keeps only MMA-sized tiles, the M = 1 path keeps every config but the wide-token ones;
    at 32-64 tokens only configs whose pipelined tiles fit in shared memory, fewer when the token
    tile is doubled (SwiGLU on the input) or the weight tile (two row sets), and fewer in fp32."""
    from kernels.skinny_linear import _CONFIGS, _SMEM_BUDGET, _WIDE_CONFIGS, _prune

    configs = _CONFIGS + _WIDE_CONFIGS
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert all(c.kwargs["BLOCK_N"] >= 16 for c in _prune(configs, {"N": 4096}, M_PAD=16))
    assert _prune(configs, {"N": 4096}, M_PAD=1) == _CONFIGS
    assert any(c.kwargs["BLOCK_N"] < 16 for c in _CONFIGS)
    for m in (32, 64):
        plain = _prune(configs, {"x_ptr": bf16}, M_PAD=m)
        gated = _prune(configs, {"x_ptr": bf16}, M_PAD=m, GATED=True)
        rope = _prune(configs, {"x_ptr": bf16}, M_PAD=m, ROPE_OUT=True)
        wide = _prune(configs, {"x_ptr": fp32}, M_PAD=m)
        for kept, x_tiles, w_tiles, esz in ((plain, 1, 1, 2), (gated, 2, 1, 2), (rope, 1, 2, 2), (wide, 1, 1, 4)):
            assert kept and all(c.kwargs["BLOCK_N"] >= 16 for c in kept)
            assert all(c.num_stages * c.kwargs["BLOCK_K"] * (x_tiles * m + w_tiles * c.kwargs["BLOCK_N"]) * esz
                       <= _SMEM_BUDGET for c in kept) or len(kept) == 1
        assert set(map(id, gated)) < set(map(id, plain)) and set(map(id, wide)) < set(map(id, plain))
        assert any(id(c) in {id(w) for w in _WIDE_CONFIGS} for c in plain)


@pytest.mark.skipif(not dispatch.HAVE_TRITON, reason="needs triton")
def test_untuned_launches_take_a_valid_config():
    """MODEGPT_AUTOTUNE=off (the tests' setting) launches each kernel with the first config its pruner
    keeps: MMA-sized tiles for the skinny dot path, the decode bucket's BLOCK_M for the low-rank kernels."""
    from kernels import lowrank, skinny_linear
    from kernels.autotune import autotuning_enabled, first_config

    assert not autotuning_enabled()  # tests/conftest.py
    x, w = torch.zeros(16, 64), torch.zeros(40, 64)
    args = (x, w, w, x, 16, 40, 64, 64, 64, 40, 1, 1)
    assert first_config(skinny_linear._skinny, args, {"M_PAD": 16}).kwargs["BLOCK_N"] >= 16
    assert first_config(skinny_linear._skinny, args, {"M_PAD": 1}) is skinny_linear._CONFIGS[0]
    t = torch.zeros(1, 16, 32)
    shrink_args = (x, w, t, 16, 64, 32, 64, 1, 32, 1, 16 * 32, 32, lowrank.m_bucket(16), 1)
    cfg = first_config(lowrank._shrink, shrink_args, {"PRECISION": "ieee"})
    assert cfg.kwargs["BLOCK_M"] == 16 and cfg.kwargs["GROUP_M"] == 1


@pytest.mark.skipif(not CUDA, reason="compiles for and tunes on a CUDA GPU")
def test_precompile_builds_every_config_and_keys_like_the_autotuner(seed, monkeypatch):
    """With autotuning on, a new key's configs are compiled in parallel before Triton tunes them
    (kernels.autotune.precompile): afterwards the kernel's binary cache holds one entry per pruned
    config, the autotuner stores its pick under our ``tuning_key`` (so a tuned key is never
    precompiled again), and the tuned launch is correct."""
    from kernels import autotune, pick_store, skinny_linear

    monkeypatch.setenv("MODEGPT_AUTOTUNE", "on")
    N, K, M = 4096 + 48 + 16 * (seed % 7), 1000 + 8 * (seed % 5), 5  # a key no other test tunes
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = randn(N, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    captured = {}
    real = autotune.launch

    def spy(kernel, grid, args, kwargs, interpret_config):
        captured.update(kernel=kernel, grid=grid, args=args, kwargs=kwargs)
        return real(kernel, grid, args, kwargs, interpret_config)

    monkeypatch.setattr(skinny_linear, "launch", spy)
    binaries = skinny_linear._skinny.fn.device_caches[torch.cuda.current_device()][0]
    before = len(binaries)
    out = skinny_linear.skinny_linear_triton(x, w)
    kernel, args, kwargs = captured["kernel"], captured["args"], captured["kwargs"]
    key = autotune.tuning_key(kernel, args, kwargs)
    assert key in kernel.cache, f"autotuner keyed {list(kernel.cache)[-1]}, ours {key}"
    pruned = autotune.pruned_configs(kernel, args, kwargs)
    # every pruned config compiled (one may have been compiled already by an untuned test of this specialization)
    assert len(pruned) > 1 and len(binaries) - before >= len(pruned) - 1
    assert not autotune.precompile(kernel, captured["grid"], args, kwargs)  # tuned: nothing to do
    # tuned by skinny_linear.tune_config: every config that ran has a positive time, the pick is the fastest
    times = skinny_linear.TUNED[key]
    assert len(times) > 1 and all(t > 0 for t in times.values())
    assert skinny_linear.config_name(kernel.cache[key]) == min(times, key=times.get)
    assert_close(out, x.double() @ w.double().t(), torch.bfloat16, seed, "tuned skinny")
    # a restarted process (an empty autotuner cache) takes the stored pick without timing
    if pick_store.enabled():
        del kernel.cache[key], skinny_linear.TUNED[key]
        skinny_linear._TUNE_SEEN.clear()
        skinny_linear.skinny_linear_triton(x, w)
        assert key in kernel.cache and key not in skinny_linear.TUNED
        assert skinny_linear.config_name(kernel.cache[key]) == min(times, key=times.get)


def test_weight_copies_stream_enough_bytes_with_the_same_strides():
    from kernels.graph_timing import weight_copies

    w = torch.randn(64, 48)[:, :40]  # a row-strided view: stride 48
    copies = weight_copies(w, min_bytes=5 * w.numel() * 4 - 1)
    assert len(copies) == 5 and copies[0] is w
    assert all(c.stride() == w.stride() and torch.equal(c, w) and c.data_ptr() != w.data_ptr() for c in copies[1:])
    assert len(weight_copies(w, 1)) == 1 and len(weight_copies(w, 10 ** 12, most=3)) == 3


@pytest.mark.skipif(not CUDA, reason="needs CUDA graphs")
def test_stream_us_ranks_launches_by_their_weight_stream():
    """``stream_us`` (repeated in a CUDA graph on rotating weight copies, with or without a small kernel
    between the launches) gives a weight of 8x the bytes clearly more time, and a small weight is not timed
    from the L2 (its copies stream 2x the L2)."""
    from kernels.graph_timing import step_predecessor, stream_us, weight_copies

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    x = randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    big = weight_copies(randn(16384, 4096, dtype=torch.bfloat16, device="cuda"), 2 * l2)
    small = weight_copies(randn(2048, 4096, dtype=torch.bfloat16, device="cuda"), 2 * l2)
    assert len(small) > 1 and sum(w.numel() * 2 for w in small) >= 2 * l2

    def linear(w):
        return torch.nn.functional.linear(x, w)

    linear(big[0]), linear(small[0])
    t_big, t_small = stream_us(linear, big), stream_us(linear, small)
    assert t_big > 2 * t_small > 0
    before = step_predecessor(torch.device("cuda"))  # as tune_config times
    before()
    assert stream_us(linear, big, between=before) > 2 * stream_us(linear, small, between=before) > 0
    # slower than 16 MB at 10 TB/s (more than twice the H200's HBM bandwidth): not read from the L2
    assert t_small > 2048 * 4096 * 2 / 10e6


def test_weight_copies_clone_a_group_of_weights_together():
    """A call that streams two weights (a low-rank pair, gate/up and down) cycles through copies of both."""
    from kernels.graph_timing import weight_copies

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    sets = weight_copies((a, b), min_bytes=3 * (a.numel() + b.numel()) * 4)
    assert len(sets) == 3 and sets[0][0] is a and sets[0][1] is b
    assert all(torch.equal(c, a) and torch.equal(d, b) and c.data_ptr() != a.data_ptr() and d.data_ptr() != b.data_ptr()
               for c, d in sets[1:])


@pytest.mark.skipif(not CUDA, reason="needs CUDA graphs")
@pytest.mark.parametrize("mode", ["stream", "flush"])
def test_timed_pick_takes_the_faster_candidate(mode, monkeypatch):
    """The engine's per-shape pick, timed either way, takes a candidate that streams its weight once over
    one that streams it three times although the slower one is preferred; streamed, it runs on copies."""
    from kernels import skinny_linear

    monkeypatch.setenv("MODEGPT_PICK_TIMING", mode)
    monkeypatch.setenv("MODEGPT_PICK_CACHE", "0")
    monkeypatch.setattr(skinny_linear, "_PICKS", {})
    x = randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    w = randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    seen = set()

    def once(w_):
        seen.add(w_.data_ptr())
        return torch.nn.functional.linear(x, w_)

    def thrice(w_):
        return [torch.nn.functional.linear(x, w_) for _ in range(3)]

    key = ("test-timed-pick", tuple(w.shape))
    assert skinny_linear._timed_pick(key, {"thrice": thrice, "once": once}, w.device, prefer="thrice",
                                     weights=(w,)) == "once"
    assert len(seen) > 1 if mode == "stream" else seen == {w.data_ptr()}


@pytest.mark.skipif(not dispatch.HAVE_TRITON, reason="needs triton")
def test_lowrank_configs_fit_shared_memory_in_float32():
    """fp32 doubles every tile: the pruner keeps each low-rank config with as many pipeline stages as
    fit (H200, session 6: the 64-row decode bucket asked for 240 KB of 227), and leaves the 16-bit
    configs exactly as written."""
    from kernels import lowrank
    from kernels.autotune import pruned_configs

    for configs in (lowrank._SHRINK_CONFIGS, lowrank._EXPAND_CONFIGS):
        assert [(c.kwargs, c.num_stages) for c in lowrank._fit_smem(configs, 2)] == \
            [(c.kwargs, c.num_stages) for c in configs]
        fp32 = lowrank._fit_smem(configs, 4)
        assert fp32 and all(c.num_stages * lowrank._stage_bytes(c, 4) <= lowrank._SMEM_BYTES for c in fp32)
        assert any(c.num_stages < o.num_stages for c in fp32 for o in configs if c.kwargs == o.kwargs)
    x, a = torch.zeros(64, 4096), torch.zeros(1024, 4096)  # fp32, the 64-row decode bucket
    args = (x, a, x, 64, 4096, 1024, 4096, 1, 4096, 1, 64 * 1024, 1024, lowrank.m_bucket(64), 1)
    for cfg in pruned_configs(lowrank._shrink, args, {"PRECISION": "ieee"}):
        assert cfg.num_stages * lowrank._stage_bytes(cfg, 4) <= lowrank._SMEM_BYTES


def test_linear_dispatch_rows_threshold(monkeypatch):
    """Above MODEGPT_SKINNY_MAX_TOKENS rows (default 64) a dense linear stays on cuBLAS/PyTorch."""
    monkeypatch.delenv("MODEGPT_SKINNY_MAX_TOKENS", raising=False)
    monkeypatch.setenv("MODEGPT_KERNELS", "auto")
    assert dispatch.skinny_max_tokens() == (64 if dispatch.HAVE_TRITON else 0)
    monkeypatch.setenv("MODEGPT_SKINNY_MAX_TOKENS", "4")
    assert dispatch.skinny_max_tokens() == (4 if dispatch.HAVE_TRITON else 0)
    monkeypatch.setenv("MODEGPT_SKINNY_MAX_TOKENS", "99")
    assert dispatch.skinny_max_tokens() == (64 if dispatch.HAVE_TRITON else 0)
    dev = "cuda" if CUDA else "cpu"  # CPU: always PyTorch; CUDA: 5 rows > 4 takes cuBLAS
    x, w = torch.randn(5, 64, device=dev), torch.randn(24, 64, device=dev)
    assert torch.equal(kernels.linear(x, w), torch.nn.functional.linear(x, w))


# ------------------------------------------------------------------------------------------------
# Triton: gathered RoPE into the KV cache
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("heads", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rope_queries(seed, force_triton, heads, T, dtype):
    H, hkv, dqk, _ = heads
    f = inv_freq_for(hkv, dqk // 2, 128, TRITON_DEVICE)
    pos = torch.randint(0, 8192, (T,)).to(TRITON_DEVICE)
    fused = randn(T, H * dqk + 40, dtype=dtype, device=TRITON_DEVICE)  # q slice of a fused qkv row
    x = fused[:, :H * dqk]
    ref = ref_rope(x.reshape(T, H, dqk), pos, f)
    out = nan_like((T, H, dqk), dtype, TRITON_DEVICE)
    kernels.rope_gather_(x, pos, f, out)
    assert_close(out, ref, dtype, seed, f"rope q T={T} {heads}")
    xc = x.contiguous()
    kernels.rope_gather_(xc, pos, f, xc)  # in place
    assert_close(xc.view(T, H, dqk), ref, dtype, seed, f"rope q in place T={T}")


@needs_triton
@pytest.mark.parametrize("paged", [False, True], ids=["flat", "paged"])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rope_into_cache(seed, force_triton, paged, T, dtype):
    H, hkv, dqk, dv = ATTN_SHAPES[-1]
    block_size = 16
    num_slots = (T + 40) // block_size * block_size + block_size
    f = inv_freq_for(hkv, dqk // 2, 128, TRITON_DEVICE)
    pos = torch.randint(0, 8192, (T,)).to(TRITON_DEVICE)
    k = randn(T, hkv * dqk, dtype=dtype, device=TRITON_DEVICE)
    v = randn(T, hkv * dv, dtype=dtype, device=TRITON_DEVICE)
    slots = torch.randperm(num_slots)[:T]
    slots[T // 2] = -1  # a padding token: skipped
    slots = slots.to(TRITON_DEVICE)
    shape_k = (num_slots // block_size, block_size, hkv, dqk) if paged else (num_slots, hkv, dqk)
    shape_v = shape_k[:-1] + (dv,)
    kc, vc = nan_like(shape_k, dtype, TRITON_DEVICE), nan_like(shape_v, dtype, TRITON_DEVICE)
    kernels.rope_gather_(k, pos, f, kc, slot_mapping=slots, v=v, v_out=vc)

    kflat, vflat = kc.reshape(num_slots, hkv, dqk), vc.reshape(num_slots, hkv, dv)
    live = slots >= 0
    written = torch.zeros(num_slots, dtype=torch.bool, device=TRITON_DEVICE)
    written[slots[live].long()] = True
    # exactly the mapped slots were written, nothing else
    assert torch.isnan(kflat[~written]).all() and torch.isnan(vflat[~written]).all(), f"seed={seed}"
    ref_k = ref_rope(k.view(T, hkv, dqk), pos, f)[live]
    assert_close(kflat[slots[live].long()], ref_k, dtype, seed, f"rope k cache T={T} paged={paged}")
    assert torch.equal(vflat[slots[live].long()], v.view(T, hkv, dv)[live]), f"v copy; seed={seed}"


@needs_triton
@pytest.mark.parametrize("heads", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rope_qkv_one_launch(seed, force_triton, heads, T, dtype):
    """The layer op: q, k, v as row-strided views of ONE fused projection output; q rotated in
    place (its neighbours in the row untouched), k rotated and v copied into the paged caches."""
    H, hkv, dqk, dv = heads
    block_size = 16
    num_slots = (T + 40) // block_size * block_size + block_size
    f = inv_freq_for(hkv, dqk // 2, 128, TRITON_DEVICE)
    pos = torch.randint(0, 8192, (T,)).to(TRITON_DEVICE)
    fused = randn(T, (H + hkv) * dqk + hkv * dv + 8, dtype=dtype, device=TRITON_DEVICE)
    orig = fused.clone()
    q, k, v = fused[:, :H * dqk], fused[:, H * dqk:(H + hkv) * dqk], fused[:, (H + hkv) * dqk:-8]
    slots = torch.randperm(num_slots)[:T]
    slots[T // 2] = -1  # a padding token: its keys and values go nowhere
    slots = slots.to(TRITON_DEVICE)
    kc = nan_like((num_slots // block_size, block_size, hkv, dqk), dtype, TRITON_DEVICE)
    vc = nan_like((num_slots // block_size, block_size, hkv, dv), dtype, TRITON_DEVICE)
    ref_q = ref_rope(orig[:, :H * dqk].reshape(T, H, dqk), pos, f)
    ref_k = ref_rope(orig[:, H * dqk:(H + hkv) * dqk].reshape(T, hkv, dqk), pos, f)
    got_q = kernels.rope_qkv_(q, k, v, pos, f, kc, vc, slots)
    assert got_q.shape == (T, H, dqk) and got_q.data_ptr() == q.data_ptr(), "q is rotated in place"
    assert_close(got_q, ref_q, dtype, seed, f"rope_qkv q T={T} {heads}")
    assert torch.equal(fused[:, H * dqk:], orig[:, H * dqk:]), f"k/v inputs and padding untouched; seed={seed}"
    kflat, vflat = kc.reshape(num_slots, hkv, dqk), vc.reshape(num_slots, hkv, dv)
    live = slots >= 0
    written = torch.zeros(num_slots, dtype=torch.bool, device=TRITON_DEVICE)
    written[slots[live].long()] = True
    assert torch.isnan(kflat[~written]).all() and torch.isnan(vflat[~written]).all(), f"seed={seed}"
    assert_close(kflat[slots[live].long()], ref_k[live], dtype, seed, f"rope_qkv k T={T} {heads}")
    assert torch.equal(vflat[slots[live].long()], v.reshape(T, hkv, dv)[live]), f"v copy; seed={seed}"


def test_torch_path_rope_qkv_matches_two_calls(seed, monkeypatch):
    """The PyTorch path of rope_qkv_ equals rope_gather_ on the queries and on the keys + values."""
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    H, hkv, dqk, dv = ATTN_SMALL[0]
    T, slots_n = 7, 32
    f = inv_freq_for(hkv, dqk // 2, 128, "cpu")
    pos = torch.randint(0, 4096, (T,))
    q, k, v = (randn(T, n, dtype=torch.float32, device="cpu") for n in (H * dqk, hkv * dqk, hkv * dv))
    slots = torch.randperm(slots_n)[:T]
    kc, vc = torch.zeros(slots_n, hkv, dqk), torch.zeros(slots_n, hkv, dv)
    got = kernels.rope_qkv_(q.clone(), k, v, pos, f, kc, vc, slots)
    assert_close(got, ref_rope(q.view(T, H, dqk), pos, f), torch.float32, seed, "torch rope_qkv q")
    assert_close(kc[slots], ref_rope(k.view(T, hkv, dqk), pos, f), torch.float32, seed, "torch rope_qkv k")
    assert torch.equal(vc[slots], v.view(T, hkv, dv))


# ------------------------------------------------------------------------------------------------
# Triton: decode attention
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("heads", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("B", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_decode_attention(seed, force_triton, heads, B, dtype):
    H, hkv, dqk, dv = heads
    real = dqk == 128 or H == 32
    max_len = (2048 if B < 300 else 256) if real else (90 if B < 300 else 20)
    q, kc, vc, tables, lens = attention_inputs(B, H, hkv, dqk, dv, dtype, TRITON_DEVICE, max_len)
    out = nan_like((B, H, dv), dtype, TRITON_DEVICE)
    scale = 128 ** -0.5  # the original head_dim, not d_qk
    kernels.decode_attention(q, kc, vc, tables, lens, scale, out=out)
    ref = ref_decode_attention(q, kc, vc, tables, lens, scale)
    assert_close(out, ref, dtype, seed, f"decode attention B={B} {heads}")


@needs_triton
@pytest.mark.parametrize("B", [2, 7])
def test_triton_decode_attention_reads_a_row_strided_query(seed, force_triton, B):
    """The engine hands attention q as a view of the fused q/k/v projection output (rows H * d_qk of
    H * d_qk + Hkv * (d_qk + d_v) elements apart) with no copy: same values as a contiguous q, on the
    kernel and on the PyTorch path."""
    H, hkv, dqk, dv = ATTN_SMALL[0]
    dtype = torch.float32
    q, kc, vc, tables, lens = attention_inputs(B, H, hkv, dqk, dv, dtype, TRITON_DEVICE, 90)
    fused = randn(B, H * dqk + hkv * (dqk + dv), dtype=dtype, device=TRITON_DEVICE)
    fused[:, :H * dqk] = q.reshape(B, H * dqk)
    strided = fused[:, :H * dqk].view(B, H, dqk)
    assert not strided.is_contiguous()
    scale = 128 ** -0.5
    ref = ref_decode_attention(q, kc, vc, tables, lens, scale)
    out = nan_like((B, H, dv), dtype, TRITON_DEVICE)
    kernels.decode_attention(strided, kc, vc, tables, lens, scale, out=out)
    assert_close(out, ref, dtype, seed, "strided q, kernel")
    from kernels.reference import decode_attention_torch

    assert_close(decode_attention_torch(strided, kc, vc, tables, lens, scale), ref, dtype, seed, "strided q, torch")


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fold", [False, True], ids=["combine-launch", "combine-folded"])
def test_triton_decode_attention_splits(seed, force_triton, num_splits, dtype, fold):
    """Forced partitionings, incl. partitions past a sequence's end and an empty context; with
    counters the last partition combines (run twice: the counters must be zero again after a call)."""
    from kernels.decode_attention import decode_attention_triton

    H, hkv, dqk, dv = ATTN_SMALL[0]
    lens = torch.tensor([1, 0, 77, 33])
    q, kc, vc, tables, lens = attention_inputs(4, H, hkv, dqk, dv, dtype, TRITON_DEVICE, 80, lens=lens)
    counters = torch.zeros(4 * hkv + 3, dtype=torch.int32, device=TRITON_DEVICE) if fold else None
    ref = ref_decode_attention(q, kc, vc, tables, lens, 0.3)
    for _ in range(2 if fold else 1):
        out = nan_like((4, H, dv), dtype, TRITON_DEVICE)
        decode_attention_triton(q, kc, vc, tables, lens, 0.3, out, num_splits=num_splits, counters=counters)
        assert_close(out, ref, dtype, seed, f"decode attention splits={num_splits} fold={fold}")
        assert torch.all(out[1] == 0), f"empty context must give zeros; seed={seed}"
        if fold:
            assert not counters.any(), f"counters left at {counters.tolist()}; seed={seed}"


def test_plan_splits_aims_at_the_programs_per_sm_it_is_told(monkeypatch):
    """More programs per SM (``MODEGPT_ATTN_PROGRAMS_PER_SM``) split a context into more partitions, never
    more than its key tiles or 64, and never below one tile per partition."""
    from kernels.decode_attention import plan_splits

    cpu = torch.device("cpu")  # a nominal 8 SMs
    monkeypatch.delenv("MODEGPT_ATTN_PROGRAMS_PER_SM", raising=False)
    assert plan_splits(16, 4, 256, 32, cpu) == (1, 256)  # 64 programs already: 2 per SM
    monkeypatch.setenv("MODEGPT_ATTN_PROGRAMS_PER_SM", "16")
    assert plan_splits(16, 4, 256, 32, cpu) == (2, 128)
    assert plan_splits(1, 1, 256, 32, cpu) == (8, 32)  # at most one partition per key tile
    assert plan_splits(1, 1, 64, 32, cpu) == (1, 64)  # under three tiles: never split


@needs_triton
@pytest.mark.parametrize("heads", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("num_splits", [None, 1, 3], ids=["auto", "1", "3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fold", [False, True], ids=["combine-launch", "combine-folded"])
def test_triton_rope_decode_attention(seed, force_triton, heads, B, num_splits, dtype, fold):
    """RoPE + cache write + decode attention in one launch, from row-strided views of one fused
    projection output: the new keys (rotated) and values land in their slots (poisoned with NaN
    first, so reading them before the write would show), nothing else in the caches changes, q is
    not modified, and the output matches the float64 reference. One padding row (context 0, slot -1)
    writes nothing and attends to nothing."""
    from kernels.decode_attention import rope_decode_attention_triton

    H, hkv, dqk, dv = heads
    block_size = 16
    max_len = 700 if CUDA else 70
    lens = torch.randint(1, max_len + 1, (B,))
    lens[0] = max_len
    if B > 1:
        lens[B // 2] = 0
    _, kc, vc, tables, lens = attention_inputs(B, H, hkv, dqk, dv, dtype, TRITON_DEVICE, max_len, block_size, lens)
    last = (lens.long() - 1).clamp_min(0)
    slots = tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    slots[lens == 0] = -1
    kflat, vflat = kc.view(-1, hkv, dqk), vc.view(-1, hkv, dv)
    live = slots >= 0
    kflat[slots[live]] = float("nan")
    vflat[slots[live]] = float("nan")
    kc0, vc0 = kc.clone(), vc.clone()
    f = inv_freq_for(hkv, dqk // 2, 128, TRITON_DEVICE)
    pos = last.to(TRITON_DEVICE)
    fused = randn(B, (H + hkv) * dqk + hkv * dv + 8, dtype=dtype, device=TRITON_DEVICE)
    orig = fused.clone()
    q, k, v = fused[:, :H * dqk], fused[:, H * dqk:(H + hkv) * dqk], fused[:, (H + hkv) * dqk:-8]
    out = nan_like((B, H, dv), dtype, TRITON_DEVICE)
    counters = torch.zeros(B * hkv, dtype=torch.int32, device=TRITON_DEVICE) if fold else None
    rope_decode_attention_triton(q, k, v, pos, f, kc, vc, slots, tables, lens, 0.125, out, num_splits=num_splits,
                                 counters=counters)
    assert counters is None or not counters.any(), f"counters must end at zero; seed={seed}"

    assert torch.equal(fused, orig), f"q, k, v are inputs only; seed={seed}"
    ref_k = ref_rope(orig[:, H * dqk:(H + hkv) * dqk].reshape(B, hkv, dqk), pos, f)
    assert_close(kflat[slots[live]], ref_k[live], dtype, seed, f"new keys B={B} {heads}")
    assert torch.equal(vflat[slots[live]], v.reshape(B, hkv, dv)[live]), f"new values; seed={seed}"
    untouched = torch.ones(kflat.shape[0], dtype=torch.bool, device=TRITON_DEVICE)
    untouched[slots[live]] = False
    assert torch.equal(kflat[untouched], kc0.view(-1, hkv, dqk)[untouched]), f"other keys; seed={seed}"
    assert torch.equal(vflat[untouched], vc0.view(-1, hkv, dv)[untouched]), f"other values; seed={seed}"
    kref, vref = kc0.double(), vc0.double()
    kref.view(-1, hkv, dqk)[slots[live]] = ref_k[live]
    vref.view(-1, hkv, dv)[slots[live]] = v.reshape(B, hkv, dv)[live].double()
    ref_q = ref_rope(orig[:, :H * dqk].reshape(B, H, dqk), pos, f)
    ref = ref_decode_attention(ref_q, kref, vref, tables, lens, 0.125)
    assert_close(out, ref, dtype, seed, f"rope + decode attention B={B} splits={num_splits} {heads}")
    if B > 1:
        assert torch.all(out[B // 2] == 0), f"an empty context gives zeros; seed={seed}"


def test_rope_decode_attention_torch_path_equals_the_two_ops(seed, monkeypatch):
    """The PyTorch path (CPU serving, MODEGPT_KERNELS=torch) is rope_qkv_ then decode_attention,
    without touching q."""
    monkeypatch.setenv("MODEGPT_KERNELS", "torch")
    H, hkv, dqk, dv = ATTN_SMALL[0]
    B = 3
    _, kc, vc, tables, lens = attention_inputs(B, H, hkv, dqk, dv, torch.float32, "cpu", 40)
    last = lens.long() - 1
    slots = tables.long().gather(1, (last // 16)[:, None])[:, 0] * 16 + last % 16
    f = inv_freq_for(hkv, dqk // 2, 128, "cpu")
    q, k, v = (randn(B, n, dtype=torch.float32, device="cpu") for n in (H * dqk, hkv * dqk, hkv * dv))
    q0 = q.clone()
    kc2, vc2 = kc.clone(), vc.clone()
    got = kernels.rope_decode_attention(q, k, v, last, f, kc, vc, slots, tables, lens, 0.2)
    assert torch.equal(q, q0)
    qr = kernels.rope_qkv_(q0.clone(), k, v, last, f, kc2, vc2, slots)
    want = kernels.decode_attention(qr, kc2, vc2, tables, lens, 0.2)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@needs_triton
@pytest.mark.parametrize("config", [{"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 128},
                                    {"num_stages": 4}, {"DIM_CHUNKS": False}, {"KV_PACK": 2},
                                    {"KV_PACK": 4, "BLOCK_N": 32}, None],
                         ids=["32-8w-3s", "128", "4s", "pow2-dims", "pack2", "pack4-32", "auto"])
@pytest.mark.parametrize("heads", [ATTN_SMALL[0], (4, 4, 40, 24), (2, 2, 88, 70), (6, 3, 40, 24)],
                         ids=["gqa3", "mha", "mha-88x70", "gqa2-3kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_decode_attention_launch_configs(seed, force_triton, config, heads, dtype):
    """The launch configurations kernels.bench.run_attention_sweep times are all correct (split and
    unsplit, a ragged last tile, grouped and multi-head, head dims read in two chunks (88 and 70 as
    64 + 32, the second chunk masked) or padded to one power of two, several KV heads per program (a
    partial last pack with 3 KV heads), and the capacity-based auto choice); a bad one is refused before
    anything launches."""
    from kernels.decode_attention import decode_attention_triton

    H, hkv, dqk, dv = heads
    lens = torch.tensor([70, 1, 33])
    q, kc, vc, tables, lens = attention_inputs(3, H, hkv, dqk, dv, dtype, TRITON_DEVICE, 80, lens=lens)
    ref = ref_decode_attention(q, kc, vc, tables, lens, 0.3)
    counters = torch.zeros(3 * hkv, dtype=torch.int32, device=TRITON_DEVICE)
    for splits, cnt in ((1, None), (3, None), (3, counters)):  # the combine folded into the kernel in the last
        out = nan_like((3, H, dv), dtype, TRITON_DEVICE)
        decode_attention_triton(q, kc, vc, tables, lens, 0.3, out, num_splits=splits, config=config, counters=cnt)
        assert_close(out, ref, dtype, seed, f"decode attention {config} {heads} splits={splits} fold={cnt is not None}")
    assert not counters.any()
    for bad in ({"BLOCK_N": 24}, {"BLOCK_M": 16}, {"KV_PACK": 3}, {"KV_PACK": 0}):
        with pytest.raises(ValueError):
            decode_attention_triton(q, kc, vc, tables, lens, 0.3, config=bad)


@needs_triton
def test_triton_rope_then_attention_flat_cache(seed, force_triton):
    """End to end on a flat [num_slots, Hkv, d] cache: keys written by rope_gather_ at scattered
    slots, read back by decode_attention through a per-position slot table (block_size 1)."""
    dtype = torch.float32
    H, hkv, dqk, dv = ATTN_SMALL[0]
    L, num_slots = 29, 64
    f = inv_freq_for(hkv, dqk // 2, 128, TRITON_DEVICE)
    pos = torch.arange(L, device=TRITON_DEVICE)
    k = randn(L, hkv * dqk, dtype=dtype, device=TRITON_DEVICE)
    v = randn(L, hkv * dv, dtype=dtype, device=TRITON_DEVICE)
    slots = torch.randperm(num_slots)[:L].to(TRITON_DEVICE)
    kc = nan_like((num_slots, hkv, dqk), dtype, TRITON_DEVICE)
    vc = nan_like((num_slots, hkv, dv), dtype, TRITON_DEVICE)
    kernels.rope_gather_(k, pos, f, kc, slot_mapping=slots, v=v, v_out=vc)
    q_raw = randn(1, H * dqk, dtype=dtype, device=TRITON_DEVICE)
    q = nan_like((1, H, dqk), dtype, TRITON_DEVICE)
    kernels.rope_gather_(q_raw, pos[-1:], f, q)
    out = nan_like((1, H, dv), dtype, TRITON_DEVICE)
    lens = torch.tensor([L], dtype=torch.int32, device=TRITON_DEVICE)
    kernels.decode_attention(q, kc, vc, slots.int().view(1, L), lens, 0.2, out=out)

    qr = ref_rope(q_raw.view(1, H, dqk), pos[-1:], f)[0]
    kr = ref_rope(k.view(L, hkv, dqk), pos, f)
    ref = torch.stack([torch.softmax(kr[:, h // (H // hkv)] @ qr[h] * 0.2, 0) @ v.view(L, hkv, dv)[:, h // (H // hkv)].double()
                       for h in range(H)])[None]
    assert_close(out, ref, dtype, seed, "rope -> attention")


def ref_add_rms_norm(x, delta, weight, eps):
    s = x.double() + (delta.double() if delta is not None else 0)
    return s, weight.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)


NORM_COLS = [37, 576] + ([4096, 5120] if CUDA else [])


@needs_triton
@pytest.mark.parametrize("n", NORM_COLS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_add_rms_norm(seed, force_triton, n, T, with_delta, dtype):
    x = randn(T, n, dtype=dtype, device=TRITON_DEVICE)
    d = randn(T, n, dtype=dtype, device=TRITON_DEVICE) if with_delta else None
    w = randn(n, dtype=dtype, device=TRITON_DEVICE, scale=0.5)
    s_out, h_out = nan_like((T, n), dtype, TRITON_DEVICE), nan_like((T, n), dtype, TRITON_DEVICE)
    s, h = kernels.add_rms_norm(x, d, w, 1e-5, residual_out=s_out if with_delta else None, out=h_out)
    rs, rh = ref_add_rms_norm(x, d, w, 1e-5)
    assert h.data_ptr() == h_out.data_ptr()
    assert_close(h, rh, dtype, seed, f"add_rms_norm h n={n} T={T}")
    assert_close(s, rs, dtype, seed, f"add_rms_norm s n={n} T={T}")
    # it rounds like the PyTorch sequence it replaces: within a few 16-bit ulps of its result (bf16 eps is
    # 2^-7; Triton's CPU interpreter truncates where the GPU rounds to nearest, and the norm rounds twice)
    ts, th = kernels.reference.add_rms_norm_torch(x, d, w, 1e-5)
    ulp = 1e-5 if dtype == torch.float32 else 2 ** -5
    for got, want in ((s, ts), (h, th)):
        assert (got.float() - want.float()).abs().max().item() <= ulp * want.float().abs().max().item()


@needs_triton
@pytest.mark.parametrize("n", [37, 1500] + ([11008] if CUDA else []))
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_silu_mul_on_fused_halves(seed, force_triton, n, T, dtype):
    gu = randn(T, 2 * n, dtype=dtype, device=TRITON_DEVICE, scale=2.0)  # one fused gate/up output
    g, u = gu.split([n, n], dim=-1)  # row-strided views
    out = nan_like((T, n), dtype, TRITON_DEVICE)
    y = kernels.silu_mul(g, u, out=out)
    gd = g.double()
    assert_close(y, gd * torch.sigmoid(gd) * u.double(), dtype, seed, f"silu_mul n={n} T={T}")


@needs_triton
@pytest.mark.parametrize("fused_norm,rope_attention,fold,qkv_rope", [
    ("0", "0", "1", "0"), ("1", "0", "0", "0"), ("0", "1", "0", "0"), ("0", "0", "1", "1")],
    # the opt-in switches in pairs that touch different ops (each engine costs ~16 s under the interpreter)
    ids=["default", "norm-folded-combine-launch", "rope-in-attention-combine-launch", "rope-in-projection"])
def test_triton_engine_kernels_on_off_same_generation(force_triton, monkeypatch, fused_norm, rope_attention, fold,
                                                       qkv_rope):
    """A compressed model (odd per-layer q/k and v dims, GQA, factorized linears) in the engine: greedy
    tokens are identical with the Triton kernels (fused RoPE + cache write, paged decode attention with its
    split combine folded in or as its own launch, opt-in both in one launch,
    low-rank linear, add + RMSNorm, SwiGLU; with MODEGPT_FUSED_NORM=1 the add + RMSNorm folded into the
    q/k/v and gate/up matmuls at decode) and with the PyTorch ops, and logprobs agree within float32
    tolerance."""
    monkeypatch.setenv("MODEGPT_FUSED_NORM", fused_norm)
    monkeypatch.setenv("MODEGPT_ROPE_ATTENTION", rope_attention)  # RoPE inside the attention kernel (opt-in)
    monkeypatch.setenv("MODEGPT_ATTN_COMBINE_FOLD", fold)
    monkeypatch.setenv("MODEGPT_QKV_ROPE", qkv_rope)  # RoPE + cache write as the q/k/v matmul's epilogue (opt-in)
    from kernels import skinny_linear
    from server.engine import ops
    from server.engine.engine import LLMEngine
    from server.engine.testing import assert_same_generations, llama_like_config, random_state_dict
    from server.engine.types import GenerationRequest, SamplingParams

    cfg = llama_like_config()
    sd = random_state_dict(cfg, seed=5)
    kw = dict(device=TRITON_DEVICE, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4,
              max_model_len=64, cuda_graphs=False)

    def reqs():
        return [GenerationRequest(f"e{i}", list(range(3 + i, 10 + 15 * i)),  # up to 41 tokens: split contexts
                                  SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1))
                for i in range(3)]

    folded = []  # counts the real kernel's calls: the folded path must run exactly when enabled
    real = dispatch.norm_skinny_linear_triton
    monkeypatch.setattr(dispatch, "norm_skinny_linear_triton", lambda *a, **k: folded.append(1) or real(*a, **k))
    rope_epilogue = []  # the projection-with-RoPE launches (dispatch imports the entry from its module per call)
    real_rope = skinny_linear.skinny_linear_rope_triton
    monkeypatch.setattr(skinny_linear, "skinny_linear_rope_triton",
                        lambda *a, **k: rope_epilogue.append(1) or real_rope(*a, **k))
    attn_calls = []  # (kernel, folded combine?) of every decode attention launch
    for name in ("rope_decode_attention_triton", "decode_attention_triton"):
        def spy(*a, _real=getattr(dispatch, name), _name=name, **k):
            attn_calls.append((_name, k.get("counters") is not None))
            return _real(*a, **k)
        monkeypatch.setattr(dispatch, name, spy)
    try:
        ref = LLMEngine(cfg, sd, use_kernels=False, **kw).run_to_completion(reqs())
        eng = LLMEngine(cfg, sd, use_kernels=True, **kw)
        assert ops.OPS["rope_store_kv"] is not ops.rope_store_kv and ops.OPS["add_norm"] is not ops.add_norm
        got = eng.run_to_completion(reqs())
    finally:
        ops.reset_ops()
    assert bool(folded) == (fused_norm == "1")
    assert bool(rope_epilogue) == (qkv_rope == "1" and rope_attention == "0")
    kernel = "rope_decode_attention_triton" if rope_attention == "1" else "decode_attention_triton"
    assert sum(k == kernel for k, _ in attn_calls) >= 5 * cfg["num_hidden_layers"], attn_calls[:3]
    assert all(f == (fold == "1") for k, f in attn_calls if k == kernel)  # the model's counters reach the kernel
    assert_same_generations(ref, got, logprob_tol=1e-3)


# ------------------------------------------------------------------------------------------------
# CPU: run the Triton tests above on Triton's interpreter, isolated in a subprocess
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA or INTERPRET, reason="the Triton tests run in process here")
def test_triton_suite_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("MODEGPT_KERNELS", None)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    here = Path(__file__).resolve()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(here),
           str(here.with_name("test_skinny_rope.py")), "-k", "triton and not in_interpreter"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout[-8000:] + "\n" + res.stderr[-4000:]).strip()
    assert res.returncode == 0, f"interpreter suite failed (rc={res.returncode}):\n{tail}"
    assert " passed" in res.stdout and " failed" not in res.stdout, tail
    print(f"interpreter suite: {res.stdout.strip().splitlines()[-1]} ({time.time() - t0:.0f}s)")


@needs_triton
def test_triton_attention_config_names_round_trip_and_the_env_override(seed, force_triton, monkeypatch):
    """Every configuration the sweep times has a name MODEGPT_ATTN_CONFIG accepts back; the env override
    reaches the kernel through kernels.decode_attention (same output as the float64 reference) and a
    malformed value is a clear ValueError, not a silent fallback."""
    from kernels.bench import ATTENTION_SWEEP_CONFIGS
    from kernels.decode_attention import config_name, parse_config

    for cfg in ATTENTION_SWEEP_CONFIGS:
        assert parse_config(config_name(cfg)) == cfg
    assert parse_config("32/4w/2s/cd")["DIM_CHUNKS"] and not parse_config("32/4w/2s")["DIM_CHUNKS"]
    assert parse_config("32/4w/2s/cd/p4")["KV_PACK"] == 4 and parse_config("32/4w/2s/p2")["KV_PACK"] == 2
    for bad in ("64", "64/4/2s", "24/4w/2s", "64/4w/2s/cc", "x/4w/2s", "64/4w/2s/cd/cd", "64/4w/2s/p3",
                "64/4w/2s/p4/cd"):
        with pytest.raises(ValueError):
            parse_config(bad)
    H, hkv, dqk, dv = 4, 4, 40, 24
    q, kc, vc, tables, lens = attention_inputs(2, H, hkv, dqk, dv, torch.float32, TRITON_DEVICE, 50,
                                               lens=torch.tensor([50, 17]))
    ref = ref_decode_attention(q, kc, vc, tables, lens, 0.3)
    monkeypatch.setenv("MODEGPT_ATTN_CONFIG", "16/2w/1s")
    assert_close(kernels.decode_attention(q, kc, vc, tables, lens, 0.3), ref, torch.float32, seed, "env config")
    monkeypatch.setenv("MODEGPT_ATTN_CONFIG", "16/2w")
    with pytest.raises(ValueError):
        kernels.decode_attention(q, kc, vc, tables, lens, 0.3)


@needs_triton
@pytest.mark.parametrize("B", [16, 64])
@pytest.mark.parametrize("dims", [(80, 64), (128, 128)], ids=["80x64", "128"])
def test_triton_decode_attention_auto_config_by_batch(seed, force_triton, B, dims):
    """With no config given, the batch picks the launch (from 64 sequences of multi-head attention,
    several KV heads per program, a partial last pack with 3 KV heads): each against float64."""
    from kernels.decode_attention import auto_config, config_name, decode_attention_triton

    dqk, dv = dims
    q, kc, vc, tables, lens = attention_inputs(B, 3, 3, dqk, dv, torch.float32, TRITON_DEVICE, 40)
    assert (auto_config(48, dqk, dv, B)["KV_PACK"] > 1) == (B >= 64), config_name(auto_config(48, dqk, dv, B))
    ref = ref_decode_attention(q, kc, vc, tables, lens, 0.3)
    out = nan_like((B, 3, dv), torch.float32, TRITON_DEVICE)
    decode_attention_triton(q, kc, vc, tables, lens, 0.3, out)
    assert_close(out, ref, torch.float32, seed, f"decode attention auto B={B} {dims}")


def test_attention_auto_config_follows_the_context_class_batch_and_head_dims():
    """auto_config: the session 7-9 sweeps' winners. Head dims in chunks; below batch 16 short block
    tables take key tiles of 32 and long ones the 64-key default, with a third pipeline stage where a dim
    is padded inside one chunk; from batch 16 multi-head attention packs KV heads into one program
    (short: four per program with 16-key tiles at dims <= 96, two with 32-key tiles at 128, from batch
    64; long: two with 32-key tiles), GQA does not; a dim padded in one chunk (112) is never packed."""
    from kernels.decode_attention import DEFAULT_CONFIG, SHORT_CONTEXT, auto_config, config_name

    def name(*a):
        return config_name(auto_config(*a))

    assert auto_config(SHORT_CONTEXT, 128, 128)["BLOCK_N"] == 32
    assert auto_config(SHORT_CONTEXT, 88, 80) == dict(DEFAULT_CONFIG, BLOCK_N=32, DIM_CHUNKS=True)
    assert auto_config(SHORT_CONTEXT + 16, 128, 128) == dict(DEFAULT_CONFIG, DIM_CHUNKS=True)
    assert auto_config(4096, 112, 96) == dict(DEFAULT_CONFIG, num_stages=3, DIM_CHUNKS=True)
    assert auto_config(4096, 80, 80)["num_stages"] == 2  # padded, but in two chunks
    assert auto_config(4096, 128, 96)["num_stages"] == 2
    # by batch (multi-head: group 1)
    assert [name(SHORT_CONTEXT, 88, 80, b) for b in (8, 16, 64, 256)] == [
        "32/4w/2s/cd", "32/4w/2s/cd", "16/4w/2s/cd/p4", "16/4w/2s/cd/p4"]
    assert [name(SHORT_CONTEXT, 128, 128, b) for b in (8, 16, 64, 256)] == [
        "32/4w/2s/cd", "32/4w/2s/cd", "32/4w/2s/cd/p2", "32/4w/2s/cd/p2"]
    assert [name(4096, 96, 96, b) for b in (1, 16, 256)] == ["64/4w/2s/cd", "32/4w/2s/cd/p2", "32/4w/2s/cd/p2"]
    # GQA and a dim padded inside one chunk: no packing
    assert name(SHORT_CONTEXT, 96, 96, 256, 4) == "32/4w/2s/cd"
    assert name(4096, 128, 128, 256, 4) == "64/4w/2s/cd"
    assert name(SHORT_CONTEXT, 112, 112, 256) == "32/4w/2s/cd"
    assert name(4096, 112, 112, 256) == "64/4w/3s/cd"


def test_attention_dim_chunks_cover_each_head_dim_in_at_most_two_powers_of_two():
    """dim_chunks against a brute force over every dim up to 300: the chunks are powers of two (>= 16, a
    second one >= MIN_CHUNK) that cover the dim, and two are used exactly when some pair covers it in less
    than one padded power of two (then the narrowest such pair, the larger first)."""
    from kernels.decode_attention import MIN_CHUNK, dim_chunks

    pow2 = [1 << i for i in range(4, 10)]
    for d in range(1, 301):
        full = min(p for p in pow2 if p >= d)
        pairs = [(a, b) for a in pow2 for b in pow2 if a >= b >= MIN_CHUNK and a + b >= d and a + b < full]
        want = min(pairs, key=lambda ab: (ab[0] + ab[1], -ab[0])) if pairs else (full, 0)
        assert dim_chunks(d) == want, d
        assert dim_chunks(d, split=False) == (full, 0)
