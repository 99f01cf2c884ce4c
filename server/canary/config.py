"""``CanaryConfig``: everything the canary flags of ``modegpt serve`` set, loadable from YAML.

Precedence: built-in defaults < ``--canary-config FILE`` < explicit command-line flags (< env
``MODEGPT_ADMIN_KEY`` only adds admin keys). Every value is validated by ``CanaryConfig.validate()``
with an error that names the key (``rollout.thresholds.max_kl_mean: must be >= 0, got -1``).

YAML layout (every key optional)::

    enabled: true
    public_name: modegpt
    weight: 0.1               # fraction of public-id traffic answered by the compressed model
    shadow_fraction: 0.2      # fraction of compared requests also run on the other variant
    score_fraction: 1.0       # fraction of routed public-id requests whose answer is scored under both
    sticky: true              # hash `user` / x-canary-key -> same variant every time
    seed: null                # RNG seed of weight draws and sampling (null: random)
    admin_keys: [KEY, ...]
    critical:
      api_keys: [KEY, ...]    # requests with these bearer keys always go to the original
    shadow:
      queue_size: 64
      workers: 1
    rollout:
      auto_start: false       # start progressing through the steps at boot
      steps: [0.01, 0.05, 0.25, 0.5, 1.0]
      interval_s: 300         # hold per step; analysis at its end
      thresholds:
        max_kl_mean: 0.5
        min_top1_agreement: 0.6
        max_error_rate: 0.05
        max_latency_ratio: 2.0   # p90 latency compressed / original
        min_comparisons: 5
      failure:
        max_consecutive_errors: 3   # compressed failures in a row that disable the canary at once
        stall_timeout_s: 30.0       # no first token from the compressed engine within this: failure
    review:                   # carried as plain data for server.canary.review
      kl_threshold: 0.5
      regex: null
      json_schema: null
    review_db: null           # path of the review database (null: review module's default)
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

ADMIN_KEY_ENV = "MODEGPT_ADMIN_KEY"
DEFAULT_STEPS = (0.01, 0.05, 0.25, 0.5, 1.0)


class ConfigError(ValueError):
    """An invalid canary configuration; the message names the offending key."""


@dataclass
class Thresholds:
    max_kl_mean: float = 0.5
    min_top1_agreement: float = 0.6
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0
    min_comparisons: int = 5


@dataclass
class FailurePolicy:
    max_consecutive_errors: int = 3
    stall_timeout_s: float = 30.0


@dataclass
class RolloutConfig:
    auto_start: bool = False
    steps: list[float] = field(default_factory=lambda: list(DEFAULT_STEPS))
    interval_s: float = 300.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    failure: FailurePolicy = field(default_factory=FailurePolicy)


@dataclass
class CriticalPolicy:
    api_keys: list[str] = field(default_factory=list, repr=False)


@dataclass
class ShadowConfig:
    queue_size: int = 64
    workers: int = 1


@dataclass
class ReviewRules:
    kl_threshold: float | None = 0.5
    regex: str | None = None
    json_schema: dict | None = None


@dataclass
class CanaryConfig:
    enabled: bool = True
    public_name: str = "modegpt"
    weight: float = 0.1
    shadow_fraction: float = 0.2
    score_fraction: float = 1.0
    sticky: bool = True
    seed: int | None = None
    admin_keys: list[str] = field(default_factory=list, repr=False)  # never printed
    critical: CriticalPolicy = field(default_factory=CriticalPolicy)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    review: ReviewRules = field(default_factory=ReviewRules)
    review_db: str | None = None

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict | None) -> "CanaryConfig":
        cfg = _build(cls, data or {}, "")
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CanaryConfig":
        import yaml

        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"canary config {p}: cannot read: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"canary config {p}: invalid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"canary config {p}: the top level must be a mapping, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"canary config {p}: {e}") from None

    def to_dict(self, redact: bool = True) -> dict:
        d = asdict(self)
        if redact:
            d["admin_keys"] = ["***"] * len(self.admin_keys)
            d["critical"]["api_keys"] = ["***"] * len(self.critical.api_keys)
        return d

    # -- validation --------------------------------------------------------------------------------

    def validate(self) -> "CanaryConfig":
        if not isinstance(self.public_name, str) or not self.public_name.strip():
            raise ConfigError("public_name: must be a non-empty string")
        for key in ("weight", "shadow_fraction", "score_fraction"):
            _fraction(key, getattr(self, key))
        for i, k in enumerate(self.admin_keys):
            if not isinstance(k, str) or not k:
                raise ConfigError(f"admin_keys[{i}]: must be a non-empty string")
        for i, k in enumerate(self.critical.api_keys):
            if not isinstance(k, str) or not k:
                raise ConfigError(f"critical.api_keys[{i}]: must be a non-empty string")
        if self.shadow.queue_size < 1:
            raise ConfigError(f"shadow.queue_size: must be >= 1, got {self.shadow.queue_size}")
        if self.shadow.workers < 1:
            raise ConfigError(f"shadow.workers: must be >= 1, got {self.shadow.workers}")
        r = self.rollout
        if not r.steps:
            raise ConfigError("rollout.steps: must list at least one weight")
        prev = 0.0
        for i, s in enumerate(r.steps):
            _fraction(f"rollout.steps[{i}]", s)
            if s <= 0 or s < prev:
                raise ConfigError(f"rollout.steps: must be increasing weights in (0, 1], got {r.steps}")
            prev = s
        _positive("rollout.interval_s", r.interval_s)
        t = r.thresholds
        _nonneg("rollout.thresholds.max_kl_mean", t.max_kl_mean)
        _fraction("rollout.thresholds.min_top1_agreement", t.min_top1_agreement)
        _fraction("rollout.thresholds.max_error_rate", t.max_error_rate)
        _positive("rollout.thresholds.max_latency_ratio", t.max_latency_ratio)
        if t.min_comparisons < 0:
            raise ConfigError(f"rollout.thresholds.min_comparisons: must be >= 0, got {t.min_comparisons}")
        if r.failure.max_consecutive_errors < 1:
            raise ConfigError("rollout.failure.max_consecutive_errors: must be >= 1, "
                              f"got {r.failure.max_consecutive_errors}")
        _positive("rollout.failure.stall_timeout_s", r.failure.stall_timeout_s)
        v = self.review
        if v.kl_threshold is not None:
            _nonneg("review.kl_threshold", v.kl_threshold)
        if v.regex is not None:
            import re

            try:
                re.compile(v.regex)
            except re.error as e:
                raise ConfigError(f"review.regex: invalid regular expression: {e}") from None
        if v.json_schema is not None and not isinstance(v.json_schema, dict):
            raise ConfigError("review.json_schema: must be a mapping (a JSON schema object)")
        return self


# -- helpers ---------------------------------------------------------------------------------------


def _num(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number, got {v!r}")
    return float(v)


def _fraction(key: str, v: Any) -> None:
    if not 0.0 <= _num(key, v) <= 1.0:
        raise ConfigError(f"{key}: must be between 0 and 1, got {v!r}")


def _positive(key: str, v: Any) -> None:
    if _num(key, v) <= 0:
        raise ConfigError(f"{key}: must be > 0, got {v!r}")


def _nonneg(key: str, v: Any) -> None:
    if _num(key, v) < 0:
        raise ConfigError(f"{key}: must be >= 0, got {v!r}")


def _hint(cls) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _build(cls, data: Any, prefix: str):
    """A dataclass from a mapping: unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    hints = _hint(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        kwargs[f.name] = _convert(hints[f.name], data[f.name], key)
    return cls(**kwargs)


def _convert(tp: Any, v: Any, key: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        return _convert(args[0], v, key)
    if is_dataclass(tp):
        return _build(tp, v if v is not None else {}, f"{key}.")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and item is str:
            v = [v]
        if not isinstance(v, list):
            raise ConfigError(f"{key}: must be a list, got {type(v).__name__}")
        return [_convert(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: must be an integer, got {v!r}")
        return v
    if tp is float:
        return _num(key, v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: must be a string, got {v!r}")
        return v
    if tp is dict or origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(v).__name__}")
        return v
    return v


def parse_steps(text: str) -> list[float]:
    """``"0.01,0.05,0.25,0.5,1"`` -> floats (for the ``--rollout-steps`` flag)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--rollout-steps: expected comma-separated weights, got {text!r}") from None


# flag dest -> dotted config key; a flag left at None keeps the file's (or the default) value
FLAG_KEYS = {
    "canary_weight": "weight",
    "shadow_fraction": "shadow_fraction",
    "score_fraction": "score_fraction",
    "canary_sticky": "sticky",
    "canary_seed": "seed",
    "rollout_steps": "rollout.steps",
    "rollout_interval": "rollout.interval_s",
    "rollout_auto_start": "rollout.auto_start",
    "max_kl_mean": "rollout.thresholds.max_kl_mean",
    "min_top1_agreement": "rollout.thresholds.min_top1_agreement",
    "max_error_rate": "rollout.thresholds.max_error_rate",
    "max_latency_ratio": "rollout.thresholds.max_latency_ratio",
    "min_comparisons": "rollout.thresholds.min_comparisons",
    "max_consecutive_errors": "rollout.failure.max_consecutive_errors",
    "stall_timeout": "rollout.failure.stall_timeout_s",
    "review_db": "review_db",
}


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def config_from_args(args: Any, *, embedded_default: bool = False,
                     environ: dict[str, str] | None = None) -> CanaryConfig:
    """The serve command's CanaryConfig: defaults < ``--canary-config`` < flags; admin keys from
    ``--admin-key`` (repeatable) and ``$MODEGPT_ADMIN_KEY`` (comma-separated) are added.

    Without a config file and without ``--canary-weight``/``--shadow-fraction``/``--score-fraction``/
    ``--rollout-auto-start``, the embedded default gets the defaults (weight 0.1, shadow 0.2), while
    explicitly given models get weight, shadow and score fractions 0 (the canary is there, but all
    unpinned traffic goes to the original and nothing is compared until the admin API or a flag says
    so). ``--name`` overrides the file's ``public_name``."""
    environ = os.environ if environ is None else environ
    path = getattr(args, "canary_config", None)
    data: dict = {}
    if path:
        data = asdict(CanaryConfig.from_yaml(path))  # validates the file on its own, errors name the file
    else:
        canary_flags = ("canary_weight", "shadow_fraction", "score_fraction", "rollout_auto_start")
        if not embedded_default and all(getattr(args, d, None) is None for d in canary_flags):
            data.update(weight=0.0, shadow_fraction=0.0, score_fraction=0.0)
    if getattr(args, "name", None):
        data["public_name"] = args.name
    if getattr(args, "no_canary", False):
        data["enabled"] = False
    for dest, dotted in FLAG_KEYS.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if dest == "rollout_steps" and isinstance(v, str):
            v = parse_steps(v)
        _set_dotted(data, dotted, v)
    crit = list(getattr(args, "critical_key", None) or [])
    if crit:
        data.setdefault("critical", {}).setdefault("api_keys", [])
        data["critical"]["api_keys"] = list(data["critical"]["api_keys"]) + crit
    keys = list(data.get("admin_keys") or []) + list(getattr(args, "admin_key", None) or [])
    env = environ.get(ADMIN_KEY_ENV, "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    data["admin_keys"] = keys
    try:
        return CanaryConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"canary settings: {e}") from None
