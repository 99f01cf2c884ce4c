"""``Canary``: the one object the API layer talks to. It owns the router, the rollout controller and the
shadow worker for one (original, compressed) pair under one public id, and wires them to the metrics
(``server.canary.metrics.CanaryMetrics``) and, optionally, to the review queue.

- ``route(model_id, headers, user)``: a ``Decision``; a decision for the compressed variant whose
  engine is not running (or whose remote backend is ejected) disables the canary at once
  (``engine_failure``) and falls back to the original; a weight / sticky / fallback decision for an
  original that is down goes to a compressed variant that is up (``failover``).
- ``retry_decision(decision)``: where a request goes whose attempt failed before any output: a failed
  compressed attempt to the original, a failed original attempt (not critical, not pinned) to a
  compressed variant that is up.
- ``sample(decision)``: whether to compare this request's answer (score it under both models) and
  whether to also shadow-run it on the other variant. Only requests to the public id, not critical,
  not fallback or failover, and only while both variants are up.
- ``record(...)``: a request's outcome (rollout analysis, error / stall tripwire, request counter).
- comparisons from the shadow worker go to the rollout window, the metrics and the subscribers.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import CanaryConfig
from .rollout import RolloutController
from .router import COMPRESSED, ORIGINAL, CanaryRouter, Decision
from .shadow import Comparison, ShadowJob, ShadowWorker

log = logging.getLogger(__name__)

NO_COMPARE = ("critical", "fallback", "pinned_model", "failover")
FAILOVER_FROM = ("weight", "sticky", "fallback")  # the router's own choices; never critical or pinned


class Canary:
    def __init__(self, config: CanaryConfig, original: Any, compressed: Any, *, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, review_queue: Any = None):
        """``original`` / ``compressed``: ``server.api.registry.ServedModel``s."""
        self.config = config
        self.models = {ORIGINAL: original, COMPRESSED: compressed}
        self.metrics = metrics
        self.router = CanaryRouter(config.public_name, original.name, compressed.name, config.weight,
                                   sticky=config.sticky, critical_keys=config.critical.api_keys, seed=config.seed,
                                   enabled=config.enabled)
        self.rollout = RolloutController(config.rollout, self.router, clock=clock, on_change=self._state_changed,
                                         on_rollback=self._rolled_back)
        scorer = None
        if original.remote is not None or compressed.remote is not None:
            from server.remote.scoring import scorer_for

            scorer = scorer_for(original, compressed)  # top-k echo scoring over the API
            for variant, served in self.models.items():
                if served.remote is not None:
                    served.remote.health.subscribe(
                        lambda up, reason, variant=variant: self._backend_changed(variant, up, reason))
        self.scoring_top_k: int | None = scorer.k if scorer is not None else None
        self.shadow = ShadowWorker(original.engine, compressed.engine, original.name, compressed.name,
                                   queue_size=config.shadow.queue_size, workers=config.shadow.workers,
                                   on_shadow_result=self._shadow_result, scorer=scorer)
        self.shadow.subscribe(self._on_comparison)
        self._rng = random.Random(None if config.seed is None else config.seed + 1)
        self._rng_lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        self.comparisons: list[Comparison] = []  # the most recent ones (bounded), for inspection
        self.max_kept = 256
        self.review_rules = None
        self.review_queue = None
        if review_queue is not None:
            self.attach_review(review_queue)
        if metrics is not None:  # the model_name of the variant's vllm:* series (a remote backend's own id)
            metrics.set_variant_models(*(m.remote.model_id if m.remote is not None else m.name
                                         for m in (original, compressed)))
        if config.enabled and config.rollout.auto_start:
            self.rollout.start()
        self._state_changed(self.rollout)

    # -- identity ------------------------------------------------------------------------------------

    @property
    def public_id(self) -> str:
        return self.router.public_id

    def handles(self, model_id: str | None) -> bool:
        return self.router.handles(model_id)

    def served(self, variant: str) -> Any:
        return self.models[variant]

    def subscribe(self, fn: Callable[[Comparison], Any]) -> None:
        """Receive every ``Comparison`` (sync or async callable; exceptions are logged, never raised)."""
        self.shadow.subscribe(fn)

    def attach_review(self, queue: Any) -> None:
        """Send comparisons with both outputs through ``review.ReviewRules`` to ``queue``."""
        from .review import ReviewRules

        self.review_rules = ReviewRules.from_config(self.config.review)
        self.review_queue = queue
        if self.review_rules.active:
            self.shadow.subscribe(self._to_review)

    # -- routing -------------------------------------------------------------------------------------

    def compressed_up(self) -> bool:
        return self.models[COMPRESSED].up

    def original_up(self) -> bool:
        return self.models[ORIGINAL].up

    def route(self, model_id: str | None, headers=None, user: str | None = None) -> Decision:
        d = self.router.decide(model_id, headers or {}, user)
        if d.variant == COMPRESSED and not self.compressed_up():
            remote = self.models[COMPRESSED].remote is not None
            self.rollout.engine_failure("compressed backend is out of service" if remote
                                        else "compressed engine is not running")
            d = self.fallback()
        elif d.variant == ORIGINAL and d.reason in FAILOVER_FROM and not self.original_up() and self.compressed_up():
            d = self.failover()
        return d

    def fallback(self) -> Decision:
        return Decision(ORIGINAL, "fallback", self.models[ORIGINAL].name)

    def failover(self) -> Decision:
        return Decision(COMPRESSED, "failover", self.models[COMPRESSED].name)

    def retry_decision(self, decision: Decision) -> Decision | None:
        """Where to retry a request whose attempt per ``decision`` failed before any output (None: it
        fails)."""
        if decision.variant == COMPRESSED:
            return self.fallback()
        if decision.reason in FAILOVER_FROM and self.compressed_up():
            return self.failover()
        return None

    def sample(self, model_id: str | None, decision: Decision) -> tuple[bool, bool]:
        """(compare, shadow) for a request to ``model_id`` answered per ``decision``."""
        if model_id != self.public_id or decision.reason in NO_COMPARE or not self.router.enabled:
            return False, False
        if not (self.compressed_up() and self.original_up()):
            return False, False
        with self._rng_lock:
            u, v = self._rng.random(), self._rng.random()
        shadow = u < self.config.shadow_fraction
        compare = shadow or v < self.config.score_fraction
        return compare, shadow

    @property
    def stall_timeout_s(self) -> float:
        return self.config.rollout.failure.stall_timeout_s

    # -- outcomes ------------------------------------------------------------------------------------

    def record(self, decision: Decision, variant: str, ok: bool, latency_s: float | None,
               failure: str | None = None) -> None:
        """The answered variant (after a retry: original) and whether the ATTEMPT on ``decision.variant``
        failed (``failure``); never raises."""
        try:
            if failure is not None:
                self.rollout.record_outcome(decision.variant, False, None, failure)
                if variant != decision.variant:
                    self.rollout.note_retry()
            if variant != decision.variant or failure is None:
                self.rollout.record_outcome(variant, ok, latency_s)
            if self.metrics is not None:
                if variant == decision.variant:
                    reason = decision.reason
                else:
                    reason = "fallback" if variant == ORIGINAL else "failover"
                self.metrics.count_request(variant, reason)
        except Exception:
            log.exception("canary: recording an outcome failed")

    def submit(self, job: ShadowJob) -> None:
        self.shadow.submit(job)

    # -- hooks ---------------------------------------------------------------------------------------

    def _on_comparison(self, c: Comparison) -> None:
        self.comparisons.append(c)
        del self.comparisons[:-self.max_kept]
        self.rollout.record_comparison(c.kl_mean, c.top1_agreement)
        if self.metrics is not None:
            self.metrics.observe_comparison(c.kl_mean, c.kl_max, c.top1_agreement, c.logprob_gap,
                                            c.first_divergence_position, bool(c.exact_match))

    async def _to_review(self, c: Comparison) -> None:
        if c.original_text is None or c.compressed_text is None:
            return  # the rules compare two outputs
        div = {"kl_mean": c.kl_mean, "kl_max": c.kl_max, "top1_agreement": c.top1_agreement,
               "logprob_gap": c.logprob_gap, "first_divergence_position": c.first_divergence_position,
               "n_positions": c.n_positions, "exact_match": c.exact_match}
        await asyncio.to_thread(self.review_rules.submit, self.review_queue, request_id=c.request_id,
                                variant=c.served_variant, route_reason=c.route_reason, prompt=c.prompt_text,
                                original_output=c.original_text, compressed_output=c.compressed_text,
                                divergence=div)

    def _backend_changed(self, variant: str, up: bool, reason: str) -> None:
        """A remote backend's health changed: an ejected compressed backend is an engine failure."""
        if variant == COMPRESSED and not up:
            self.rollout.engine_failure(f"compressed backend: {reason}")

    def _shadow_result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.count_shadow(result)

    def _state_changed(self, r: RolloutController) -> None:
        if self.metrics is not None:
            self.metrics.set_weight(self.router.weight)
            self.metrics.set_rollout(r.state, r.step)

    def _rolled_back(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_rollback(kind)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start_ticker(self, period_s: float = 1.0) -> None:
        """A daemon thread that ends rollout steps on time even without traffic."""
        if self._ticker is not None:
            return

        def loop() -> None:
            while not self._ticker_stop.wait(period_s):
                try:
                    self.rollout.tick()
                except Exception:
                    log.exception("rollout tick failed")

        self._ticker = threading.Thread(target=loop, name="canary-rollout", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._ticker_stop.set()

    def status(self) -> dict:
        s = self.rollout.snapshot()
        s.update(public_id=self.public_id, original=self.models[ORIGINAL].name,
                 compressed=self.models[COMPRESSED].name, shadow_fraction=self.config.shadow_fraction,
                 sticky=self.router.sticky, compressed_up=self.compressed_up(), original_up=self.original_up(),
                 divergence_top_k=self.scoring_top_k,
                 shadow={"submitted": self.shadow.submitted, "dropped": self.shadow.dropped,
                         "errors": self.shadow.errors, "compared": self.shadow.compared,
                         "shadow_runs": self.shadow.shadow_runs, "pending": self.shadow.pending})
        return s
