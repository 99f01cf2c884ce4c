"""Small helpers shared by the Triton launchers (no kernels here).

Everything in this module is cheap, host-side and free of device synchronisation, so that the
launchers can run inside CUDA-graph capture.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton is an optional dependency (Linux only); the torch paths never need it.
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAVE_TRITON = False


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``).

    ``triton.jit`` reads the variable when a kernel is *decorated*, so it must be set before
    ``kernels.*`` is imported; the tests do that by running their Triton cases in a subprocess.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_PDL_ENV = "MODEGPT_PDL"


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        import triton.language as tl

        return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except Exception:  # pragma: no cover - Triton without the CUDA extras
        return False


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch (PDL, SM90+).

    With PDL a kernel's programs may start while the kernel before it on the stream is still
    finishing: each of our decode kernels first does the work that needs nothing from that kernel
    (loading its first weight tile), then waits on the grid dependency (``griddepcontrol.wait``:
    the previous grid has completed and its writes are visible) before it reads activations or
    writes anything, and then lets its own successor launch. A decode step is ~300 dependent
    launches of a few microseconds each, so every launch's ramp-up and tail otherwise show as
    idle bandwidth. ``MODEGPT_PDL=0`` turns it off (read per call); never under the interpreter."""
    if device.type != "cuda" or interpret_mode():
        return False
    if os.environ.get(_PDL_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_meta(device: torch.device) -> dict:
    """Launch keywords for a kernel with a ``PDL`` constexpr: the constexpr, plus Triton's
    ``launch_pdl`` option when it is on."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


_L2_PREFETCH_ENV = "MODEGPT_L2_PREFETCH"
L2_PREFETCH_DEFAULT_MIB = 0
L2_LINE = 128  # bytes


def l2_prefetch_bytes(device: torch.device) -> int:
    """Bytes of its weight that a skinny-linear launch asks the L2 to fetch before its programs wait
    on the previous kernel (``kernels._tl.l2_prefetch``); 0 for none.

    Under PDL a matmul's programs start while the kernel before it still runs; they load their first
    weight tile into registers and wait. The prefetch extends what streams during that wait (an
    attention or norm launch leaves HBM mostly idle at decode sizes) from one tile per program to the
    leading part of every weight row, up to this many bytes per launch, into the L2 with evict_last
    priority; the weight loads after the wait are marked evict_first, so a weight stream does not push
    a later kernel's prefetched lines out. ``MODEGPT_L2_PREFETCH`` = MiB per launch (read per launch:
    a graph keeps what was read at its capture); always 0 without PDL."""
    if not pdl_enabled(device):
        return 0
    raw = os.environ.get(_L2_PREFETCH_ENV, str(L2_PREFETCH_DEFAULT_MIB)).strip()
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{_L2_PREFETCH_ENV}={raw!r}: expected MiB per launch, a number >= 0") from None
    return max(0, int(mib * (1 << 20)))


def prefetch_lines(budget: int, rows: int, row_bytes: int) -> int:
    """128-byte lines to prefetch at the head of each of ``rows`` weight rows of ``row_bytes`` within
    ``budget`` bytes: a power of two (a Triton block dimension), at most the row rounded up, or 0."""
    if budget <= 0 or rows <= 0:
        return 0
    per_row = min(budget // rows, next_pow2(-(-row_bytes // L2_LINE)) * L2_LINE) // L2_LINE
    return 0 if per_row < 1 else 1 << (per_row.bit_length() - 1)


def vec_acc_enabled() -> bool:
    """``MODEGPT_SKINNY_VEC_ACC`` (read per launch, default on): the skinny kernel's one-token path keeps its
    partial products as a ``[BLOCK_N, BLOCK_K]`` fp32 tile and reduces it once after the K loop, instead of
    a cross-warp reduction (shared memory and a barrier) in every iteration. Off: session 11's kernel."""
    return os.environ.get("MODEGPT_SKINNY_VEC_ACC", "1").strip().lower() not in ("0", "off", "false", "no")


def launch_mode(device: torch.device) -> tuple[bool, int, bool]:
    """What a timed pick depends on besides the shape: PDL, the L2 prefetch and the one-token path's
    reduction (the picks of one setting are not the other's: H200, session 12)."""
    return pdl_enabled(device), l2_prefetch_bytes(device), vec_acc_enabled()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def m_pad(M: int) -> int:
    """The token rows a decode launch computes (and its tuning / pick bucket): 1 (a CUDA-core GEMV), else
    16, 32 or 64 (``tl.dot`` paths, tokens padded to a power of two)."""
    return 1 if M == 1 else max(16, next_pow2(M))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; a nominal 8 on CPU (interpreter) so heuristics still split."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def dot_precision(dtype: torch.dtype) -> str:
    """``PRECISION`` for :func:`kernels._tl.mma`: exact fp32 products for fp32 operands (tf32
    would cost ~3e-4 relative error, outside the fp32 contract), the default for 16-bit operands,
    and the interpreter's bf16 work-around."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpret_mode():
        return "upcast"
    return "tf32"


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Test hook: when True, fp32 scratch buffers start as NaN instead of uninitialised memory, so a
# kernel that leaves a scratch element unwritten (and then reads it) produces NaN, never a
# plausible stale value.
POISON_WORKSPACES = False


def workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """fp32 scratch (split-K partials, attention partitions): allocated per call from the caching
    allocator, so it is CUDA-graph safe and shared by nothing."""
    if POISON_WORKSPACES:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)
