"""A durable human-review queue of compared outputs (SQLite, WAL) and the rules that fill it.

``ReviewRules`` decide which compared (original, compressed) outputs need a human look:

- ``divergence``: the comparison's ``kl_mean`` is above ``kl_threshold`` (nats);
- ``regex``: an output does not match the regular expression (``re.search``: anchor it with ``^...$``
  to demand a full match; DOTALL is on so ``.`` spans lines);
- ``json_schema``: an output is not a JSON document valid under the schema (``jsonschema``, the
  validator class the schema's ``$schema`` names, Draft 2020-12 by default).

The regex and schema rules look at both outputs; the item's ``divergence`` JSON records which one
failed (``checks``).

``ReviewQueue(path)`` stores items in one SQLite file: ``journal_mode=WAL`` (readers never block the
writer) and ``synchronous=FULL`` (a transaction is on disk when ``commit`` returns, so an item added or
a decision taken survives ``kill -9`` and power loss). One connection guarded by a lock serves every
thread. An item is decided once: deciding it again raises ``AlreadyDecided`` (HTTP 409), whatever the
decision; an unknown id raises ``ItemNotFound`` (404).
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

DB_ENV = "MODEGPT_REVIEW_DB"
STATUSES = ("pending", "approved", "rejected")
TRIGGERS = ("divergence", "regex", "json_schema")
MAX_TEXT_CHARS = 65536  # prompt and each output are cut to this many characters when stored
MAX_LIST_LIMIT = 500
SCHEMA_VERSION = 1

_DECISIONS = {"approve": "approved", "approved": "approved", "reject": "rejected", "rejected": "rejected"}


def default_db_path() -> Path:
    """``$MODEGPT_REVIEW_DB``, else ``$XDG_STATE_HOME/modegpt/review.sqlite3`` (``~/.local/state``)."""
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "modegpt" / "review.sqlite3"


class ReviewError(Exception):
    status = 400


class ItemNotFound(ReviewError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else "review item not found"


class AlreadyDecided(ReviewError):
    status = 409


@dataclass
class ReviewItem:
    id: int
    request_id: str
    created: float
    variant: str
    route_reason: str
    prompt: str
    original_output: str
    compressed_output: str
    divergence: dict = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    status: str = "pending"
    decision: str | None = None
    reviewer: str | None = None
    note: str | None = None
    decided: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_COLUMNS = ("id", "request_id", "created", "variant", "route_reason", "prompt", "original_output",
            "compressed_output", "divergence", "triggers", "status", "decision", "reviewer", "note", "decided")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    created REAL NOT NULL,
    variant TEXT NOT NULL,
    route_reason TEXT NOT NULL,
    prompt TEXT NOT NULL,
    original_output TEXT NOT NULL,
    compressed_output TEXT NOT NULL,
    divergence TEXT NOT NULL,
    triggers TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    decision TEXT CHECK (decision IS NULL OR decision IN ('approved', 'rejected')),
    reviewer TEXT,
    note TEXT,
    decided REAL,
    CHECK ((status = 'pending') = (decision IS NULL)),
    CHECK ((status = 'pending') = (decided IS NULL))
);
CREATE INDEX IF NOT EXISTS review_items_status ON review_items (status, id);
"""


def _clean_json(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (SQLite JSON and browsers reject NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    return x


def _text(v: Any, name: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"review item: {name} must be a string, got {type(v).__name__}")
    return v[:MAX_TEXT_CHARS]


class ReviewQueue:
    """The review items in SQLite file ``path`` (created with its parent folder if missing).

    ``metrics``: an optional ``CanaryMetrics``; the queue then keeps ``modegpt_review_queue_depth`` and
    counts items per trigger and decisions (and nobody else should)."""

    def __init__(self, path: str | os.PathLike | None = None, metrics: Any = None, timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_db_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(self.path) != ":memory:" and mode.lower() != "wal":
                raise RuntimeError(f"review database {self.path}: could not switch to WAL (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"review database {self.path}: schema version {version} is newer than "
                                   f"this modegpt ({SCHEMA_VERSION})")
        self.metrics = None
        self.attach_metrics(metrics)

    # -- lifecycle -----------------------------------------------------------------------------------

    def attach_metrics(self, metrics: Any) -> None:
        self.metrics = metrics
        if metrics is not None:
            metrics.set_queue_depth(self.depth())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ReviewQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------------

    def add(self, item: Mapping | Any) -> int:
        """Store a new pending item; returns its id once committed. ``item``: a mapping (or dataclass)
        with request_id, variant, route_reason, prompt, original_output, compressed_output, divergence
        (a JSON-able mapping), triggers (list of divergence|regex|json_schema) and optionally created."""
        d = asdict(item) if is_dataclass(item) else dict(item)
        triggers = d.get("triggers") or []
        if isinstance(triggers, str):
            triggers = [triggers]
        for t in triggers:
            if t not in TRIGGERS:
                raise ValueError(f"review item: unknown trigger {t!r} (known: {', '.join(TRIGGERS)})")
        divergence = _clean_json(d.get("divergence") or {})
        if not isinstance(divergence, dict):
            raise ValueError("review item: divergence must be a mapping")
        created = d.get("created")
        row = (
            str(d.get("request_id") or ""),
            float(created) if created is not None else time.time(),
            str(d.get("variant") or ""),
            str(d.get("route_reason") or ""),
            _text(d.get("prompt"), "prompt"),
            _text(d.get("original_output"), "original_output"),
            _text(d.get("compressed_output"), "compressed_output"),
            json.dumps(divergence, allow_nan=False, sort_keys=True),
            json.dumps(list(triggers)),
        )
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO review_items (request_id, created, variant, route_reason, prompt, original_output,"
                " compressed_output, divergence, triggers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            item_id = int(cur.lastrowid)
            depth = self._depth_locked()
        if self.metrics is not None:
            for t in triggers:
                self.metrics.count_review_item(t)
            self.metrics.set_queue_depth(depth)
        return item_id

    def decide(self, item_id: int, decision: str, reviewer: str, note: str | None = None) -> ReviewItem:
        """Approve or reject a pending item, durably; returns the decided item.
        ``decision``: approve|approved|reject|rejected."""
        status = _DECISIONS.get(str(decision).lower())
        if status is None:
            raise ReviewError(f"decision must be 'approve' or 'reject', got {decision!r}")
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise ReviewError("reviewer must be a non-empty string")
        if note is not None and not isinstance(note, str):
            raise ReviewError("note must be a string")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "UPDATE review_items SET status = ?, decision = ?, reviewer = ?, note = ?, decided = ?"
                    " WHERE id = ? AND status = 'pending'",
                    (status, status, reviewer.strip()[:256], (note or "")[:MAX_TEXT_CHARS], time.time(),
                     int(item_id)))
                if cur.rowcount != 1:
                    row = self._db.execute("SELECT status FROM review_items WHERE id = ?",
                                           (int(item_id),)).fetchone()
                    self._db.execute("ROLLBACK")
                    if row is None:
                        raise ItemNotFound(f"review item {item_id} not found")
                    raise AlreadyDecided(f"review item {item_id} is already {row['status']}")
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            item = self._get_locked(int(item_id))
            depth = self._depth_locked()
        if self.metrics is not None:
            self.metrics.count_decision(status)
            self.metrics.set_queue_depth(depth)
        return item

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, item_id: int) -> ReviewItem:
        with self._lock:
            return self._get_locked(int(item_id))

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> list[ReviewItem]:
        """Items in id order (oldest first), optionally of one status."""
        if status is not None and status not in STATUSES:
            raise ReviewError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        limit = max(0, min(int(limit), MAX_LIST_LIMIT))
        offset = max(0, int(offset))
        cols = ", ".join(_COLUMNS)
        with self._lock:
            if status is None:
                rows = self._db.execute(f"SELECT {cols} FROM review_items ORDER BY id LIMIT ? OFFSET ?",
                                        (limit, offset)).fetchall()
            else:
                rows = self._db.execute(f"SELECT {cols} FROM review_items WHERE status = ? ORDER BY id"
                                        " LIMIT ? OFFSET ?", (status, limit, offset)).fetchall()
        return [_item(r) for r in rows]

    def count(self, status: str | None = None) -> int:
        with self._lock:
            if status is None:
                return int(self._db.execute("SELECT COUNT(*) FROM review_items").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM review_items WHERE status = ?",
                                        (status,)).fetchone()[0])

    def depth(self) -> int:
        """Pending items."""
        with self._lock:
            return self._depth_locked()

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ("ok" when the file is sound)."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    # -- internals -----------------------------------------------------------------------------------

    def _depth_locked(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM review_items WHERE status = 'pending'").fetchone()[0])

    def _get_locked(self, item_id: int) -> ReviewItem:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM review_items WHERE id = ?",
                               (item_id,)).fetchone()
        if row is None:
            raise ItemNotFound(f"review item {item_id} not found")
        return _item(row)


def _item(row: sqlite3.Row) -> ReviewItem:
    d = dict(row)
    d["divergence"] = json.loads(d["divergence"])
    d["triggers"] = json.loads(d["triggers"])
    return ReviewItem(**d)


# -- rules -----------------------------------------------------------------------------------------


class ReviewRules:
    """Which compared outputs go to the review queue (see the module docstring). A rule left at None
    is off."""

    def __init__(self, kl_threshold: float | None = None, regex: str | None = None,
                 json_schema: Mapping | None = None):
        if kl_threshold is not None and (not isinstance(kl_threshold, (int, float)) or kl_threshold < 0):
            raise ValueError(f"kl_threshold must be a number >= 0, got {kl_threshold!r}")
        self.kl_threshold = None if kl_threshold is None else float(kl_threshold)
        self.regex = regex
        self._re = re.compile(regex, re.DOTALL) if regex is not None else None
        self.json_schema = dict(json_schema) if json_schema is not None else None
        self._validator = None
        if self.json_schema is not None:
            import jsonschema

            cls = jsonschema.validators.validator_for(self.json_schema, default=jsonschema.Draft202012Validator)
            try:
                cls.check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"json_schema is not a valid JSON schema: {e.message}") from None
            self._validator = cls(self.json_schema)

    @classmethod
    def from_config(cls, cfg: Any) -> "ReviewRules":
        """From ``CanaryConfig.review`` (a dataclass) or a mapping with the same keys."""
        d = asdict(cfg) if is_dataclass(cfg) else dict(cfg or {})
        return cls(d.get("kl_threshold"), d.get("regex"), d.get("json_schema"))

    @property
    def active(self) -> bool:
        return self.kl_threshold is not None or self._re is not None or self._validator is not None

    def regex_ok(self, text: str) -> bool:
        return self._re is None or self._re.search(text) is not None

    def schema_error(self, text: str) -> str | None:
        """None when ``text`` is a JSON document valid under the schema (or no schema is set)."""
        if self._validator is None:
            return None
        try:
            doc = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        err = next(iter(self._validator.iter_errors(doc)), None)
        return None if err is None else err.message

    def evaluate(self, original_output: str, compressed_output: str,
                 divergence: Mapping | None = None) -> tuple[list[str], dict]:
        """(triggers, checks): the rules that fire, and per-rule details to store with the item."""
        triggers: list[str] = []
        checks: dict[str, Any] = {}
        kl = (divergence or {}).get("kl_mean")
        if self.kl_threshold is not None and isinstance(kl, (int, float)) and (
                math.isnan(kl) or kl > self.kl_threshold):
            triggers.append("divergence")
            checks["divergence"] = {"kl_mean": kl, "threshold": self.kl_threshold}
        outputs = {"original": original_output, "compressed": compressed_output}
        if self._re is not None:
            failed = [k for k, v in outputs.items() if not self.regex_ok(v)]
            if failed:
                triggers.append("regex")
                checks["regex"] = {"pattern": self.regex, "failed": failed}
        if self._validator is not None:
            errs = {k: e for k, v in outputs.items() if (e := self.schema_error(v)) is not None}
            if errs:
                triggers.append("json_schema")
                checks["json_schema"] = {"failed": sorted(errs), "errors": errs}
        return triggers, checks

    def submit(self, queue: ReviewQueue, *, request_id: str, variant: str, route_reason: str, prompt: str,
               original_output: str, compressed_output: str, divergence: Mapping | None = None) -> int | None:
        """Put the comparison on ``queue`` if any rule fires; returns the new item id, else None."""
        triggers, checks = self.evaluate(original_output, compressed_output, divergence)
        if not triggers:
            return None
        div = dict(divergence or {})
        div["checks"] = checks
        return queue.add({"request_id": request_id, "variant": variant, "route_reason": route_reason,
                          "prompt": prompt, "original_output": original_output,
                          "compressed_output": compressed_output, "divergence": div, "triggers": triggers})
