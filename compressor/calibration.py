"""Calibration data: ``N`` windows of ``L`` tokens.

``wikitext2`` samples windows from the WikiText-2 *validation* text (the train split is not available
offline; the test split is kept for evaluation, so calibration never sees it). ``PATH`` is a text file
or a JSONL file with a ``"text"`` field per line. Windows start at seeded random token offsets, as in
GPTQ/SliceGPT. A model without a tokenizer (``random:`` presets) is calibrated on seeded random ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def calibration_text(calib: str) -> str:
    if calib == "wikitext2":
        from .datasets import wikitext2_text

        return wikitext2_text("valid")
    path = Path(calib)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {calib!r} is neither 'wikitext2' nor an existing file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise ValueError(f"{path}: every JSONL line must be an object with a string 'text' field")
        return "\n\n".join(r["text"] for r in rows)
    return path.read_text()


def calibration_ids(tokenizer, calib: str, n_samples: int, seqlen: int, vocab_size: int,
                    seed: int = 0) -> torch.Tensor:
    """``[n_samples, seqlen]`` token ids."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need at least 1 calibration sample of 2 tokens, got {n_samples} x {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        return torch.randint(0, vocab_size, (n_samples, seqlen), generator=gen)
    ids = torch.tensor(tokenizer(calibration_text(calib), add_special_tokens=False)["input_ids"])
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
