"""The engine's timed kernel picks on disk, so that a server restart does not time them again.

``skinny_linear._timed_pick`` decides per shape between our kernel and cuBLAS (or between two kernel
chains) by timing both in CUDA graphs: ~10-20 ms per shape, and a compressed checkpoint has per-layer
widths, so a few hundred shapes. Triton persists its own autotuning (``kernels.autotune``); this does
the same for the picks: one small JSON file per (GPU, torch, Triton, kernel sources) in
``<Triton cache dir>/modegpt-picks/``, next to the compiled kernels it refers to. A change to any kernel
source, the pick margin, the GPU model or a library version gives a new file name, so a stale pick is
never reused. ``MODEGPT_PICK_CACHE=0`` turns the store off (a benchmark that wants fresh timings).

A pick is stored as the ``repr`` of the candidate's name and matched against the candidates of the call
that looks it up, so names may be any value with a stable repr (strings, tuples of bools). I/O
failures (read-only cache, a corrupt file) cost a warning and fall back to timing; they never fail a call.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

_ENV = "MODEGPT_PICK_CACHE"
# the sources whose change can change which candidate is faster
_SOURCES = ("_common.py", "_tl.py", "autotune.py", "dispatch.py", "fused_norm.py", "graph_timing.py", "lowrank.py",
            "rope.py", "skinny_linear.py", "pick_store.py")
_loaded: dict[Path, dict[str, str]] = {}
_warned = False


def enabled() -> bool:
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$TRITON_CACHE_DIR`` (Triton's default ``~/.triton/cache`` otherwise) / ``modegpt-picks``."""
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(base) / "modegpt-picks"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def _sources_digest(sources: tuple[str, ...]) -> bytes:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in sources)).digest()


def store_path(device: torch.device, margin: float) -> Path:
    """The file holding the picks made on ``device``'s GPU model with this library and kernel code."""
    import triton

    h = hashlib.sha256(_sources_digest(tuple(_SOURCES)))
    for part in (_device_name(device), torch.__version__, triton.__version__, repr(margin)):
        h.update(part.encode() + b"\0")
    return cache_dir() / f"picks-{h.hexdigest()[:20]}.json"


def key_text(key: tuple) -> str:
    """A pick key (shapes, dtypes, devices, flags) as text that is the same in every process."""
    def norm(v):
        if isinstance(v, torch.device):
            return f"{v.type}:{v.index or 0}"
        if isinstance(v, torch.dtype):
            return str(v)
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        return v
    return repr(norm(key))


def _warn(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"kernels: the pick store is not usable ({exc!r}); picks are timed again in each process",
                      RuntimeWarning)


def _table(path: Path) -> dict[str, str]:
    if path not in _loaded:
        table: dict[str, str] = {}
        try:
            if path.exists():
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                    raise ValueError(f"{path} is not a JSON object of strings")
                table = data
        except (OSError, ValueError) as exc:
            _warn(exc)
        _loaded[path] = table
    return _loaded[path]


def lookup(key: tuple, candidates, device: torch.device, margin: float):
    """The stored pick for ``key`` if it names one of ``candidates``, else None."""
    if not enabled():
        return None
    try:
        stored = _table(store_path(device, margin)).get(key_text(key))
    except OSError as exc:
        _warn(exc)
        return None
    return next((name for name in candidates if repr(name) == stored), None)


def record(key: tuple, name, device: torch.device, margin: float) -> None:
    """Store a pick (the whole file is rewritten atomically: concurrent writers lose picks, never the file)."""
    if not enabled():
        return
    try:
        path = store_path(device, margin)
        table = _table(path)
        table[key_text(key)] = repr(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".picks-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        _warn(exc)
