"""Staged rollout of the compressed model, in the manner of Argo Rollouts' canary analysis.

States: ``idle`` (the configured weight, no automatic steps), ``progressing`` (at a step, holding),
``paused`` (at a step, the hold timer frozen), ``promoted`` (weight 1), ``rolled_back`` (weight 0, the
router disabled: every unpinned request falls back to the original).

While progressing, each step holds for ``interval_s``; then the comparisons and request outcomes
gathered during that step are analysed:

- ``kl_mean``: mean of the comparisons' mean KL <= ``max_kl_mean``
- ``agreement``: mean top-1 agreement >= ``min_top1_agreement``
- ``error_rate``: failed / all compressed requests <= ``max_error_rate``
- ``latency``: p90 e2e latency compressed / original <= ``max_latency_ratio`` (checked once each
  variant has at least ``max(1, min_comparisons)`` requests in the step)

Fewer than ``min_comparisons`` comparisons: inconclusive, the step keeps holding (and gathering).
Pass: the next step (a fresh window), or ``promoted`` after the last. Fail: weight 0, ``rolled_back``,
the reason recorded (``kl_mean 0.93 > 0.5``). Independently of the state, ``max_consecutive_errors``
compressed failures in a row (errors or stalls), or ``engine_failure()``, roll back at once with kind
``engine_failure``.

Time comes from an injectable ``clock``; ``tick()`` runs the check (called by a ticker thread in the
server, and on every recorded event, so tests advance a fake clock and record).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import RolloutConfig
from .router import COMPRESSED, ORIGINAL, CanaryRouter

log = logging.getLogger(__name__)

IDLE, PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK = "idle", "progressing", "paused", "promoted", "rolled_back"
STATES = (IDLE, PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK)
ROLLBACK_KINDS = ("kl", "agreement", "error_rate", "latency", "manual", "engine_failure")


class TransitionError(ValueError):
    """An admin action not allowed in the current state (reported as 409)."""


@dataclass
class Window:
    """What one step gathered."""

    kl_means: list[float] = field(default_factory=list)
    agreements: list[float] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {ORIGINAL: [], COMPRESSED: []})
    requests: dict[str, int] = field(default_factory=lambda: {ORIGINAL: 0, COMPRESSED: 0})
    errors: dict[str, int] = field(default_factory=lambda: {ORIGINAL: 0, COMPRESSED: 0})

    def counts(self) -> dict:
        return {"comparisons": len(self.kl_means), "requests": dict(self.requests), "errors": dict(self.errors)}


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    k = max(0, math.ceil(0.9 * len(s)) - 1)
    return s[k]


@dataclass
class Analysis:
    passed: bool | None  # None: inconclusive
    reason: str
    kind: str | None = None  # failing check (a ROLLBACK_KINDS value)
    values: dict = field(default_factory=dict)


def analyse(w: Window, t) -> Analysis:
    """Run the checks of ``t`` (``Thresholds``) on a window."""
    n = len(w.kl_means)
    values: dict = {"comparisons": n}
    if n < t.min_comparisons:
        return Analysis(None, f"inconclusive: {n}/{t.min_comparisons} comparisons", values=values)
    if n:
        kl = sum(w.kl_means) / n
        agree = sum(w.agreements) / n
        values.update(kl_mean=kl, top1_agreement=agree)
        if kl > t.max_kl_mean:
            return Analysis(False, f"kl_mean {kl:.3g} > {t.max_kl_mean:g}", "kl", values)
        if agree < t.min_top1_agreement:
            return Analysis(False, f"top1_agreement {agree:.3g} < {t.min_top1_agreement:g}", "agreement", values)
    nc = w.requests[COMPRESSED]
    if nc:
        rate = w.errors[COMPRESSED] / nc
        values["error_rate"] = rate
        if rate > t.max_error_rate:
            return Analysis(False, f"error_rate {rate:.3g} > {t.max_error_rate:g}", "error_rate", values)
    need = max(1, t.min_comparisons)
    lo, lc = w.latencies[ORIGINAL], w.latencies[COMPRESSED]
    if len(lo) >= need and len(lc) >= need and p90(lo) > 0:
        ratio = p90(lc) / p90(lo)
        values["latency_ratio"] = ratio
        if ratio > t.max_latency_ratio:
            return Analysis(False, f"latency_ratio {ratio:.3g} > {t.max_latency_ratio:g}", "latency", values)
    return Analysis(True, "passed", values=values)


class RolloutController:
    def __init__(self, cfg: RolloutConfig, router: CanaryRouter, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[["RolloutController"], None] | None = None,
                 on_rollback: Callable[[str, str], None] | None = None):
        self.cfg = cfg
        self.router = router
        self.clock = clock
        self._on_change = on_change
        self._on_rollback = on_rollback  # (kind, reason)
        self._lock = threading.RLock()
        self.state = IDLE
        self.step = -1  # index into cfg.steps; -1 before the first
        self.reason = ""
        self.rollback_kind: str | None = None
        self.last_analysis: Analysis | None = None
        self.window = Window()
        self._step_started = 0.0
        self._held_before_pause = 0.0
        self._consecutive_failures = 0
        self.totals = {"requests": {ORIGINAL: 0, COMPRESSED: 0}, "errors": {ORIGINAL: 0, COMPRESSED: 0},
                       "comparisons": 0, "retries": 0, "rollbacks": 0}

    # -- reading -------------------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        return self.router.weight

    def snapshot(self) -> dict:
        with self._lock:
            held = self._held()
            return {
                "state": self.state, "weight": self.router.weight, "enabled": self.router.enabled,
                "step": self.step, "steps": list(self.cfg.steps), "interval_s": self.cfg.interval_s,
                "step_elapsed_s": held, "reason": self.reason, "rollback_kind": self.rollback_kind,
                "last_analysis": None if self.last_analysis is None else {
                    "passed": self.last_analysis.passed, "reason": self.last_analysis.reason,
                    "values": self.last_analysis.values},
                "counts": {"step": self.window.counts(), "total": {k: (dict(v) if isinstance(v, dict) else v)
                                                                  for k, v in self.totals.items()}},
            }

    def _held(self) -> float:
        if self.state == PROGRESSING:
            return self._held_before_pause + (self.clock() - self._step_started)
        if self.state == PAUSED:
            return self._held_before_pause
        return 0.0

    # -- transitions ---------------------------------------------------------------------------------

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self)
            except Exception:
                log.exception("rollout: change hook failed")

    def _enter_step(self, i: int) -> None:
        self.step = i
        self.state = PROGRESSING
        self.window = Window()
        self._step_started = self.clock()
        self._held_before_pause = 0.0
        self.router.set_enabled(True)
        self.router.set_weight(self.cfg.steps[i])

    def start(self) -> None:
        """Begin the staged rollout at the first step (from idle, rolled_back or promoted)."""
        with self._lock:
            if self.state in (PROGRESSING, PAUSED):
                raise TransitionError(f"a rollout is already {self.state}")
            self._consecutive_failures = 0
            self.reason = f"started: step 0 at weight {self.cfg.steps[0]:g}"
            self.rollback_kind = None
            self._enter_step(0)
        log.info("rollout %s", self.reason)
        self._changed()

    def pause(self, reason: str = "paused by admin") -> None:
        with self._lock:
            if self.state != PROGRESSING:
                raise TransitionError(f"cannot pause: the rollout is {self.state}")
            self._held_before_pause = self._held()
            self.state = PAUSED
            self.reason = reason
        self._changed()

    def resume(self) -> None:
        """Paused: continue the step's hold where it stopped. Idle / rolled back: start from step 0."""
        with self._lock:
            if self.state == PAUSED:
                self.state = PROGRESSING
                self._step_started = self.clock()
                self.router.set_enabled(True)
                self.router.set_weight(self.cfg.steps[self.step])
                self.reason = f"resumed at step {self.step}"
            elif self.state in (IDLE, ROLLED_BACK):
                self.start()
                return
            else:
                raise TransitionError(f"cannot resume: the rollout is {self.state}")
        self._changed()

    def promote(self, reason: str = "promoted by admin") -> None:
        with self._lock:
            self.state = PROMOTED
            self.step = len(self.cfg.steps) - 1
            self.router.set_enabled(True)
            self.router.set_weight(1.0)
            self.reason = reason
            self.rollback_kind = None
        log.info("rollout promoted: %s", reason)
        self._changed()

    def rollback(self, reason: str = "rolled back by admin", kind: str = "manual") -> None:
        if kind not in ROLLBACK_KINDS:
            raise ValueError(f"rollback kind must be one of {ROLLBACK_KINDS}")
        with self._lock:
            self.state = ROLLED_BACK
            self._consecutive_failures = 0  # a re-enabled canary starts a fresh streak
            self.router.set_weight(0.0)
            self.router.set_enabled(False, reason)
            self.reason = reason
            self.rollback_kind = kind
            self.totals["rollbacks"] += 1
        log.warning("canary rolled back (%s): %s", kind, reason)
        if self._on_rollback is not None:
            try:
                self._on_rollback(kind, reason)
            except Exception:
                log.exception("rollout: rollback hook failed")
        self._changed()

    def set_weight(self, weight: float, reason: str = "weight set by admin") -> None:
        """A manual weight: a running rollout pauses (the operator took over); after a rollback or a
        promotion the canary is back in ``idle`` (enabled) at that weight."""
        with self._lock:
            self.router.set_weight(weight)
            if self.state == PROGRESSING:
                self._held_before_pause = self._held()
                self.state = PAUSED
            elif self.state in (ROLLED_BACK, PROMOTED):
                self.state = IDLE
                self.step = -1
                self.rollback_kind = None
            self.router.set_enabled(True)
            self.reason = f"{reason}: {float(weight):g}"
        self._changed()

    def engine_failure(self, reason: str) -> None:
        """The compressed engine failed: disable the canary at once (no-op when already rolled back)."""
        with self._lock:
            if self.state == ROLLED_BACK and self.rollback_kind == "engine_failure":
                return
        self.rollback(f"engine_failure: {reason}", kind="engine_failure")

    # -- events --------------------------------------------------------------------------------------

    def record_comparison(self, kl_mean: float, top1_agreement: float) -> None:
        if not (math.isfinite(kl_mean) and math.isfinite(top1_agreement)):
            return
        with self._lock:
            self.window.kl_means.append(kl_mean)
            self.window.agreements.append(top1_agreement)
            self.totals["comparisons"] += 1
        self.tick()

    def record_outcome(self, variant: str, ok: bool, latency_s: float | None = None,
                       failure: str | None = None) -> None:
        """One request's outcome on ``variant``; ``failure`` (an error or stall description) for a
        compressed failure counts towards ``max_consecutive_errors``."""
        trip = None
        with self._lock:
            self.window.requests[variant] += 1
            self.totals["requests"][variant] += 1
            if not ok:
                self.window.errors[variant] += 1
                self.totals["errors"][variant] += 1
            elif latency_s is not None:
                self.window.latencies[variant].append(latency_s)
            if variant == COMPRESSED:
                if ok:
                    self._consecutive_failures = 0
                else:
                    self._consecutive_failures += 1
                    if self._consecutive_failures >= self.cfg.failure.max_consecutive_errors:
                        trip = (f"{self._consecutive_failures} consecutive compressed failures"
                                + (f" (last: {failure})" if failure else ""))
        if trip:
            self.engine_failure(trip)
        else:
            self.tick()

    def note_retry(self) -> None:
        with self._lock:
            self.totals["retries"] += 1

    def tick(self) -> Analysis | None:
        """End the current step's hold if due: analyse, then advance / promote / roll back."""
        with self._lock:
            if self.state != PROGRESSING or self._held() < self.cfg.interval_s:
                return None
            a = analyse(self.window, self.cfg.thresholds)
            self.last_analysis = a
            if a.passed is None:
                self.reason = f"step {self.step}: {a.reason}"
                return a
            if a.passed:
                if self.step + 1 < len(self.cfg.steps):
                    self._enter_step(self.step + 1)
                    self.reason = f"step {self.step - 1} passed; step {self.step} at weight {self.router.weight:g}"
                else:
                    self.state = PROMOTED
                    self.router.set_weight(1.0)
                    self.reason = f"step {self.step} passed; promoted"
            failed = not a.passed
        if failed:
            self.rollback(f"step {self.step}: {a.reason}", kind=a.kind or "manual")
        else:
            log.info("rollout: %s", self.reason)
            self._changed()
        return a
