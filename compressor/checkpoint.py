"""Writing and reading ModeGPT checkpoint directories (``docs/CHECKPOINT.md``).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place only
when complete, so a failed or interrupted run never leaves a half-written checkpoint. Every file is
listed with its sha256 in ``manifest.json``; reading verifies the manifest and the weight names and
shapes against the config, and refuses a tampered, partial or pickled checkpoint with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .schema import all_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
MANIFEST = "manifest.json"
# weight files that would be unpickled by torch.load / pickle: a checkpoint holding one is refused
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, partial, tampered with or inconsistent."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "modegpt"


def write_checkpoint(out: Path, config: dict, state_dict: dict[str, torch.Tensor], tokenizer_dir: Path | None,
                     report: dict, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    expected = all_weights(config)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != {k: tuple(s) for k, s in expected.items()}:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:6]
        raise CheckpointError(f"weights do not match the config (first differences: {bad})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest (every listed file present with its sha256, nothing unlisted that loads)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint: no config.json")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(f"{path} holds pickled weights ({', '.join(pickled)}); ModeGPT checkpoints load "
                              "from safetensors only and never unpickle")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: partial or foreign checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(str(name), str(e["sha256"]), int(e["bytes"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {MANIFEST} is not a valid manifest ({type(e).__name__}: {e})") from None
    for name, sha, size in entries:
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: {MANIFEST} names {name!r}, which is not a file of the checkpoint")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (partial checkpoint)")
        if f.stat().st_size != size or sha256_file(f) != sha:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupt)")
    unlisted = [p.name for p in [path / "config.json", *sorted(path.glob("*.safetensors"))] if p.name not in files]
    if unlisted:
        raise CheckpointError(f"{path}: config or weight files not in the manifest: {unlisted}")
    return json.loads((path / "config.json").read_text())


def read_checkpoint(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    config = verify_checkpoint(path) if verify else json.loads((path / "config.json").read_text())
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f), device=str(device)))
    expected = all_weights(config)
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(s) for k, s in expected.items()):
        raise CheckpointError(f"{path}: weights do not match config.json")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return config, state
