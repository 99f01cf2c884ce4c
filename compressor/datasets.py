"""Offline evaluation data: WikiText-2 (perplexity), PIQA and ARC (zero-shot multiple choice).

The files live in a ``shared/data`` folder described by its ``README.md`` (sources, licenses,
formats, sha256 table). :func:`data_dir` finds the folder:

1. ``$MODEGPT_DATA`` if set (the ``data`` folder itself; no fallback when it is wrong);
2. otherwise, walking up from this file's directory and then from the current directory, the
   first ``<dir>/shared/data`` or ``<dir>/../shared/data`` (CI clones the repository next to
   ``shared/``).

Every file is checked against its pinned sha256 the first time it is read in a process; a
mismatch raises :class:`DataIntegrityError`.

Multiple-choice items are returned already in the lm-evaluation-harness 0.4 zero-shot prompt
format (``piqa.yaml`` / ``arc_easy.yaml``): ``context = "Question: {goal or stem}\\nAnswer:"``,
``choices`` are the raw choice strings (the scorer prepends the single-space target delimiter),
``gold`` is the index of the correct choice. Text is used verbatim (no stripping), as the
Hugging Face copies of these datasets are.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "MODEGPT_DATA"

# sha256 of each file, relative to the data folder (table in shared/data/README.md).
SHA256 = {
    "wikitext-2-raw/wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "wikitext-2-raw/wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "arc-easy/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "arc-easy/ARC-Easy-Dev.jsonl": "f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4",
    "arc-challenge/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "arc-challenge/ARC-Challenge-Dev.jsonl": "55224364abd2477f66a9a57c5cbef109fb71d83019aa5e37aec0e7ab757746ca",
}

WIKITEXT2_FILES = {"test": "wikitext-2-raw/wiki.test.raw", "valid": "wikitext-2-raw/wiki.valid.raw"}
ARC_FILES = {
    "arc_easy": "arc-easy/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc-challenge/ARC-Challenge-Test.jsonl",
}
TASKS = ("piqa", "arc_easy", "arc_challenge")

_verified: set[Path] = set()  # files whose sha256 was already checked in this process


class DataIntegrityError(RuntimeError):
    """A data file's sha256 differs from the pinned value."""


@dataclass(frozen=True)
class McItem:
    """One zero-shot multiple-choice question.

    ``context`` is the full prompt; the scored continuation of choice ``i`` is
    ``" " + choices[i]``; ``gold`` indexes the correct choice.
    """

    context: str
    choices: list[str]
    gold: int


def data_dir() -> Path:
    """The ``shared/data`` folder (see the module docstring for the search order)."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_ENV}={env!r} is not a directory")
        return path.resolve()
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for d in (start, *start.parents):
            for cand in (d / "shared" / "data", d.parent / "shared" / "data"):
                if cand.is_dir():
                    return cand
    raise FileNotFoundError(
        "evaluation data folder 'shared/data' not found (searched upwards from "
        f"{starts[0]} and {starts[1]}, also '../shared/data' at each level); "
        f"set ${DATA_ENV} to its path"
    )


def _read(rel: str) -> bytes:
    """Bytes of ``data_dir()/rel``, sha256-verified on the first read of that path."""
    path = data_dir() / rel
    if not path.is_file():
        raise FileNotFoundError(f"missing evaluation data file {path} (set ${DATA_ENV} to override)")
    data = path.read_bytes()
    if path not in _verified:
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[rel]:
            raise DataIntegrityError(
                f"sha256 mismatch for {path}: got {digest}, expected {SHA256[rel]}"
            )
        _verified.add(path)
    return data


def wikitext2_rows(split: str = "test") -> list[str]:
    """Rows of ``wikitext-2-raw-v1`` as Hugging Face ``datasets`` gives them.

    Each line of the raw file keeps its trailing ``"\\n"``; whitespace-only lines become ``""``.
    ``split`` is ``"test"`` or ``"valid"`` (alias ``"validation"``); train is not shipped.
    """
    split = "valid" if split == "validation" else split
    if split not in WIKITEXT2_FILES:
        raise ValueError(f"wikitext2 split must be one of {sorted(WIKITEXT2_FILES)}, got {split!r}")
    lines = _read(WIKITEXT2_FILES[split]).decode("utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def wikitext2_text(split: str = "test") -> str:
    """The GPTQ-style evaluation text ``"\\n\\n".join(rows)`` (test: 1,296,370 bytes)."""
    return "\n\n".join(wikitext2_rows(split))


def _jsonl(rel: str) -> list[dict]:
    return [json.loads(line) for line in _read(rel).decode("utf-8").splitlines() if line.strip()]


def _piqa() -> list[McItem]:
    docs = _jsonl("piqa/valid.jsonl")
    labels = [int(x) for x in _read("piqa/valid-labels.lst").decode("utf-8").split()]
    if len(docs) != len(labels):
        raise DataIntegrityError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [
        McItem(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], label)
        for d, label in zip(docs, labels)
    ]


def _arc(rel: str) -> list[McItem]:
    items = []
    for d in _jsonl(rel):
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        choices = [c["text"] for c in q["choices"]]
        items.append(McItem(f"Question: {q['stem']}\nAnswer:", choices, labels.index(d["answerKey"])))
    return items


def load_task(name: str) -> list[McItem]:
    """All items of a multiple-choice task, in file order.

    ``piqa``: PIQA validation (1838); ``arc_easy``: ARC-Easy test (2376);
    ``arc_challenge``: ARC-Challenge test (1172).
    """
    if name == "piqa":
        return _piqa()
    if name in ARC_FILES:
        return _arc(ARC_FILES[name])
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
