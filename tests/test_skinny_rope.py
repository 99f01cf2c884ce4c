"""The fused q/k/v projection + RoPE + KV-cache write (``kernels.skinny_linear.skinny_linear_rope_triton``,
``kernels.dispatch.linear_rope_qkv_``): the skinny matmul with the rotation at the kept frequencies and the
cache write as its epilogue, one launch instead of ``linear`` then ``rope_qkv_``.

Checked against a float64 reference (the projection in float64, then RoPE in float64 at fp32 angles),
bit for bit against the two-launch chain it replaces (same interpreter tiling, so the same summation
order and the same roundings), with NaN-poisoned outputs and caches (only the new slots may change),
and the dispatcher's PyTorch path and shape errors. The Triton tests run on the GPU, or on Triton's
CPU interpreter under ``TRITON_INTERPRET=1``; on a CPU-only machine without it,
``tests/test_kernels.py``'s ``test_triton_suite_in_interpreter`` re-runs them in its subprocess.
"""
from __future__ import annotations

import pytest
import torch
from test_kernels import (
    CUDA,
    INTERPRET,
    TRITON_DEVICE,
    assert_close,
    inv_freq_for,
    nan_like,
    randn,
    ref_linear,
    ref_rope,
)

from kernels import dispatch, reference

# (H, Hkv, d, dv): GQA groups of 3 with dv < d; no grouping with dv < d; an odd dv (value pairs with a
# lone last row) and a head dim of 14 (7 pairs: heads straddle the programs' pair blocks)
SHAPES = [(6, 2, 46, 38), (4, 4, 40, 24), (6, 3, 14, 37)]
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="CPU without TRITON_INTERPRET: covered by test_kernels.test_triton_suite_in_interpreter")
K_IN = 70  # not a multiple of the interpreter's BLOCK_K (32): two whole tiles and a ragged tail
BLOCK_SIZE = 16


def skip_gpu_fp32_dot(dtype, M) -> None:
    """fp32 at 2-16 tokens on the GPU (the ``tl.dot`` path with ``ieee`` products): the skinny kernel's two
    row sets spill registers there (as ``SWIGLU_OUT`` does) and each case compiled for ~60 s on the H200
    (Triton 3.6, untuned launches trying configs that do not fit first); the interpreter covers it."""
    if CUDA and dtype == torch.float32 and M > 1:
        pytest.skip("fp32 tl.dot path: a minute of compiling per case on the GPU; covered by the interpreter")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (NaN compares equal to the same NaN)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def problem(H, hkv, d, dv, M, dtype, device, *, bias=True, paged=True, num_slots=64, neg=True):
    """Inputs of one call, caches poisoned with NaN; ``neg``: the middle token is padding (slot -1)."""
    N = (H + hkv) * d + hkv * dv
    x = randn(M, K_IN, dtype=dtype, device=device)
    w = randn(N, K_IN, dtype=dtype, device=device, scale=K_IN ** -0.5)
    b = randn(N, dtype=dtype, device=device) if bias else None
    f = inv_freq_for(hkv, d // 2, 128, device)
    pos = torch.randint(0, 8192, (M,)).to(device)
    slots = torch.randperm(num_slots)[:M]
    if neg and M > 1:
        slots[M // 2] = -1
    slots = slots.to(device)
    lead = (num_slots // BLOCK_SIZE, BLOCK_SIZE) if paged else (num_slots,)
    kc, vc = nan_like((*lead, hkv, d), dtype, device), nan_like((*lead, hkv, dv), dtype, device)
    return x, w, b, f, pos, slots, kc, vc


def ref_qkv(x, w, b, H, hkv, d, dv, pos, f):
    """float64: the projection, then RoPE of the q and k parts at fp32 angles (``test_kernels.ref_rope``)."""
    y = ref_linear(x, w, b)
    M = x.shape[0]
    q = ref_rope(y[:, :H * d].reshape(M, H, d), pos, f)
    k = ref_rope(y[:, H * d:(H + hkv) * d].reshape(M, hkv, d), pos, f)
    v = y[:, (H + hkv) * d:].reshape(M, hkv, dv)
    return q, k, v


def check_caches(kc, vc, before_k, before_v, slots, ref_k, ref_v, dtype, seed, what):
    """The live slots hold the reference keys/values; every other slot is bit for bit what it was."""
    hkv, d, dv = kc.shape[-2], kc.shape[-1], vc.shape[-1]
    kflat, vflat = kc.reshape(-1, hkv, d), vc.reshape(-1, hkv, dv)
    live = slots >= 0
    written = torch.zeros(kflat.shape[0], dtype=torch.bool, device=kc.device)
    written[slots[live].long()] = True
    assert torch.equal(bits(kflat[~written]), bits(before_k.reshape(-1, hkv, d)[~written])), f"k cache; seed={seed}"
    assert torch.equal(bits(vflat[~written]), bits(before_v.reshape(-1, hkv, dv)[~written])), f"v cache; seed={seed}"
    if live.any():
        assert_close(kflat[slots[live].long()], ref_k[live], dtype, seed, f"{what} k cache")
        assert_close(vflat[slots[live].long()], ref_v[live], dtype, seed, f"{what} v cache")


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_linear_rope_matches_float64(seed, force_triton, shape, M, dtype):
    """q fully written and rotated, keys rotated and values copied into the NaN-poisoned caches at the
    live slots (the middle token is padding), every other slot untouched; paged caches, except flat for
    the odd-dv shape. With and without bias on both the one-token and the tl.dot path (fp32: bias at 1
    and 16 tokens, bf16: at 7; each case is a compile on the GPU)."""
    from kernels.skinny_linear import skinny_linear_rope_triton

    skip_gpu_fp32_dot(dtype, M)
    H, hkv, d, dv = shape
    bias = (M == 7) == (dtype == torch.bfloat16)
    x, w, b, f, pos, slots, kc, vc = problem(H, hkv, d, dv, M, dtype, TRITON_DEVICE, bias=bias, paged=dv % 2 == 0)
    before_k, before_v = kc.clone(), vc.clone()
    q_out = nan_like((M, H * d), dtype, TRITON_DEVICE)
    assert skinny_linear_rope_triton(x, w, b, H, pos, f, kc, vc, slots, q_out=q_out) is q_out
    ref_q, ref_k, ref_v = ref_qkv(x, w, b, H, hkv, d, dv, pos, f)
    what = f"linear+rope M={M} {shape} {dtype} bias={bias}"
    assert_close(q_out.view(M, H, d), ref_q, dtype, seed, f"{what} q")  # finite: every element written
    check_caches(kc, vc, before_k, before_v, slots, ref_k, ref_v, dtype, seed, what)


@needs_triton
@pytest.mark.parametrize("M", [1, 5])
def test_triton_linear_rope_padding_tokens_write_no_cache(seed, force_triton, M):
    """Every slot negative (padding tokens): the caches stay bit for bit as they were, q is still written."""
    from kernels.skinny_linear import skinny_linear_rope_triton

    H, hkv, d, dv = SHAPES[0]
    dtype = torch.bfloat16
    x, w, b, f, pos, _, _, _ = problem(H, hkv, d, dv, M, dtype, TRITON_DEVICE)
    slots = torch.full((M,), -1, dtype=torch.int64, device=TRITON_DEVICE)
    slots[0] = -7  # any negative slot is padding
    kc = randn(4, BLOCK_SIZE, hkv, d, dtype=dtype, device=TRITON_DEVICE)
    vc = nan_like((4, BLOCK_SIZE, hkv, dv), dtype, TRITON_DEVICE)
    before_k, before_v = kc.clone(), vc.clone()
    q = skinny_linear_rope_triton(x, w, b, H, pos, f, kc, vc, slots)
    assert torch.equal(kc, before_k) and torch.equal(bits(vc), bits(before_v)), f"caches changed; seed={seed}"
    assert_close(q.view(M, H, d), ref_qkv(x, w, b, H, hkv, d, dv, pos, f)[0], dtype, seed, "padding q")


@needs_triton
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_linear_rope_bitwise_equals_the_chain(seed, force_triton, shape, M, dtype):
    """Bit for bit ``skinny_linear_triton`` then ``rope_qkv_triton_`` (the two launches it replaces): the
    projection is rounded to the dtype before the rotation, and the rotation is rope's, op for op. Under
    the interpreter both run one fixed tiling (so one summation order); a tuned GPU launch may pick
    another tile for either, so there only the float64 bound is asserted."""
    from kernels.rope import rope_qkv_triton_
    from kernels.skinny_linear import skinny_linear_rope_triton, skinny_linear_triton

    skip_gpu_fp32_dot(dtype, M)
    H, hkv, d, dv = shape
    x, w, b, f, pos, slots, kc, vc = problem(H, hkv, d, dv, M, dtype, TRITON_DEVICE)
    kc.copy_(randn(*kc.shape, dtype=dtype, device=TRITON_DEVICE))  # finite: torch.equal compares it all
    kc2, vc2 = kc.clone(), vc.clone()
    q = skinny_linear_rope_triton(x, w, b, H, pos, f, kc, vc, slots)
    y = skinny_linear_triton(x, w, b)
    q2 = rope_qkv_triton_(y[:, :H * d], y[:, H * d:(H + hkv) * d], y[:, (H + hkv) * d:], pos, f, kc2, vc2, slots)
    q2 = q2.reshape(M, H, d)
    same = (torch.equal(q.view(M, H, d), q2), torch.equal(kc, kc2), torch.equal(bits(vc), bits(vc2)))
    if INTERPRET:
        assert same == (True, True, True), f"(q, k cache, v cache) equal to the chain: {same}; seed={seed}"
    else:
        ref_q, ref_k, _ = ref_qkv(x, w, b, H, hkv, d, dv, pos, f)
        assert_close(q.view(M, H, d), ref_q, dtype, seed, f"gpu q (bitwise equal to the chain: {same})")
        assert_close(q2, ref_q, dtype, seed, "gpu chain q")
        live = slots >= 0
        assert_close(kc.reshape(-1, hkv, d)[slots[live].long()], ref_k[live], dtype, seed, "gpu k cache")
        assert torch.equal(bits(vc), bits(vc2)) or dtype == torch.float32, f"v cache vs chain; seed={seed}"


@needs_triton
def test_triton_dispatch_takes_the_fused_launch(seed, force_triton, monkeypatch):
    """``MODEGPT_KERNELS=triton`` at decode sizes: ``linear_rope_qkv_`` is the one fused launch, returns
    ``[T, H, d]`` and writes the flat caches; 17 tokens (above a skinny limit of 16) take the chain."""
    from kernels import skinny_linear

    monkeypatch.setenv("MODEGPT_SKINNY_MAX_TOKENS", "16")

    calls = []
    real = skinny_linear.skinny_linear_rope_triton
    monkeypatch.setattr(skinny_linear, "skinny_linear_rope_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    H, hkv, d, dv = SHAPES[1]
    dtype = torch.bfloat16 if CUDA else torch.float32  # see skip_gpu_fp32_dot
    for M, fused in ((3, True), (17, False)):
        x, w, b, f, pos, slots, kc, vc = problem(H, hkv, d, dv, M, dtype, TRITON_DEVICE, paged=False)
        before_k, before_v = kc.clone(), vc.clone()
        calls.clear()
        q = dispatch.linear_rope_qkv_(x, w, b, H, pos, f, kc, vc, slots)
        assert len(calls) == (1 if fused else 0), f"M={M}: fused launches {len(calls)}"
        assert q.shape == (M, H, d)
        ref_q, ref_k, ref_v = ref_qkv(x, w, b, H, hkv, d, dv, pos, f)
        assert_close(q, ref_q, dtype, seed, f"dispatch q M={M}")
        check_caches(kc, vc, before_k, before_v, slots, ref_k, ref_v, dtype, seed, f"dispatch M={M}")


# ------------------------------------------------------------------------------------------------
# PyTorch path and errors (no Triton needed)
# ------------------------------------------------------------------------------------------------
def test_linear_rope_qkv_cpu_takes_the_torch_path(seed, monkeypatch):
    """CPU tensors without ``MODEGPT_KERNELS=triton``: ``reference.linear_torch`` + ``rope_qkv_torch_``,
    bit for bit (the fused kernel is never called), and within the float64 bound."""
    monkeypatch.delenv("MODEGPT_KERNELS", raising=False)
    if dispatch.HAVE_TRITON:
        from kernels import skinny_linear

        def boom(*a, **k):
            raise AssertionError("the CPU torch path must not launch the fused kernel")

        monkeypatch.setattr(skinny_linear, "skinny_linear_rope_triton", boom)
    H, hkv, d, dv = SHAPES[0]
    dtype = torch.float32
    for M, paged in ((1, True), (7, False)):
        x, w, b, f, pos, slots, kc, vc = problem(H, hkv, d, dv, M, dtype, "cpu", paged=paged)
        kc2, vc2 = kc.clone(), vc.clone()
        before_k, before_v = kc.clone(), vc.clone()
        q = dispatch.linear_rope_qkv_(x, w, b, H, pos, f, kc, vc, slots)
        y = reference.linear_torch(x, w, b)
        q2 = reference.rope_qkv_torch_(y[:, :H * d], y[:, H * d:(H + hkv) * d], y[:, (H + hkv) * d:], pos, f, kc2, vc2,
                                       slots)
        assert q.shape == (M, H, d)
        assert torch.equal(q, q2) and torch.equal(bits(kc), bits(kc2)) and torch.equal(bits(vc), bits(vc2)), \
            f"torch path differs from linear_torch + rope_qkv_torch_; seed={seed}"
        ref_q, ref_k, ref_v = ref_qkv(x, w, b, H, hkv, d, dv, pos, f)
        assert_close(q, ref_q, dtype, seed, f"torch q M={M}")
        check_caches(kc, vc, before_k, before_v, slots, ref_k, ref_v, dtype, seed, f"torch M={M}")


def _bad_calls(H, hkv, d, dv):
    """(what, kwargs overrides) of calls that do not fit together."""
    return [
        ("weight rows", {"w": lambda p: p["w"][:-1]}),
        ("weight K", {"w": lambda p: p["w"][:, :-2]}),
        ("bias length", {"b": lambda p: p["b"][:-1]}),
        ("heads over Hkv", {"H": lambda p: H + 1}),
        ("inv_freq pairs", {"f": lambda p: p["f"][:, :-1]}),
        ("k cache heads", {"kc": lambda p: p["kc"][..., :1, :]}),
        ("v cache slots", {"vc": lambda p: p["vc"][:1]}),
        ("positions length", {"pos": lambda p: p["pos"][:-1]}),
        ("slot_mapping length", {"slots": lambda p: p["slots"][:-1]}),
    ]


@pytest.mark.parametrize("entry", ["dispatch", "triton"])
def test_linear_rope_qkv_bad_shapes_raise(seed, monkeypatch, entry):
    """Mismatched shapes are a ValueError naming the mismatch, before anything is launched or written
    (the dispatcher checks on every path; the Triton entry checks too, and also the dtypes)."""
    monkeypatch.delenv("MODEGPT_KERNELS", raising=False)
    if entry == "triton":
        pytest.importorskip("triton")
        from kernels.skinny_linear import skinny_linear_rope_triton as fn
    else:
        fn = dispatch.linear_rope_qkv_
    H, hkv, d, dv = SHAPES[0]
    x, w, b, f, pos, slots, kc, vc = problem(H, hkv, d, dv, 4, torch.float32, "cpu", paged=True)
    base = {"x": x, "w": w, "b": b, "H": H, "pos": pos, "f": f, "kc": kc, "vc": vc, "slots": slots}
    cases = _bad_calls(H, hkv, d, dv)
    if entry == "triton":
        cases += [("dtype", {"w": lambda p: p["w"].double()}), ("inv_freq dtype", {"f": lambda p: p["f"].double()}),
                  ("cache dtype", {"kc": lambda p: p["kc"].half()}), ("20 rows", {"x": lambda p: p["x"].repeat(5, 1)})]
    for what, over in cases:
        p = dict(base)
        p.update({k: make(base) for k, make in over.items()})
        with pytest.raises(ValueError):
            fn(p["x"], p["w"], p["b"], p["H"], p["pos"], p["f"], p["kc"], p["vc"], p["slots"])
            pytest.fail(f"{entry}: {what} did not raise")
        assert torch.isnan(kc).all() and torch.isnan(vc).all(), f"{entry}: {what} wrote a cache"
