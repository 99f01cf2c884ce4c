"""The embedded default: ``smollm2-135m`` and its cached 25% ModeGPT checkpoint."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import is_checkpoint
from .sources import SMOLLM2_ALIAS, cache_dir

DEFAULT_MODEL = SMOLLM2_ALIAS
DEFAULT_RATIO = 0.25


def default_checkpoint_path(ratio: float = DEFAULT_RATIO) -> Path:
    return cache_dir() / "checkpoints" / f"{DEFAULT_MODEL}-modegpt-{round(ratio * 100)}"


def ensure_default_checkpoint(ratio: float = DEFAULT_RATIO, progress: bool = True) -> Path:
    """Compress the default model once (CPU defaults) and return the cached checkpoint directory."""
    path = default_checkpoint_path(ratio)
    if is_checkpoint(path):
        return path
    from .pipeline import CompressOptions, compress

    print(f"compressing {DEFAULT_MODEL} at {ratio:.0%} once; cached in {path}", flush=True)
    compress(DEFAULT_MODEL, path, CompressOptions(ratio=ratio, progress=progress), overwrite=True)
    return path
