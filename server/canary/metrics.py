"""The ``modegpt_`` Prometheus family: canary routing, rollout, shadow comparison, review queue.

``CanaryMetrics(registry)`` registers everything on a given ``CollectorRegistry`` (the app's, see
``server/api/metrics.py``), beside the vLLM-named engine metrics. Label sets are small and bounded
(no per-user or per-request labels); every labelled series is created at zero up front, so PromQL
``rate()``/ratios return 0 instead of "no data" before the first event.

Metric (as scraped)                              type       labels / values
``modegpt_canary_weight``                        gauge      fraction of public-id traffic sent to the compressed model
``modegpt_rollout_state{state}``                 gauge      1 for the current of idle|progressing|paused|promoted|rolled_back
``modegpt_rollout_step``                         gauge      index of the current rollout step (-1: none)
``modegpt_variant_info{variant,model_name}``     gauge=1    which served ``model_name`` is the original / compressed
``modegpt_requests_total{variant,reason}``       counter    variant original|compressed;
                                                            reason pinned_model|pinned_header|critical|sticky|weight|fallback|failover
``modegpt_shadow_runs_total{result}``            counter    ok|error|dropped
``modegpt_comparisons_total``                    counter    compared (original, compressed) outputs
``modegpt_exact_match_total``                    counter    shadow comparisons whose two output texts were identical
``modegpt_divergence_kl_mean``                   histogram  per comparison: mean over positions of KL(p_orig || p_comp), nats
``modegpt_divergence_kl_max``                    histogram  per comparison: max over positions of that KL, nats
``modegpt_top1_agreement``                       histogram  per comparison: fraction of positions with equal argmax
``modegpt_logprob_gap``                          histogram  per comparison: mean of log p_orig(t) - log p_comp(t) over the scored tokens t, nats
                                                            (signed: > 0 when the compressed model is less sure of the tokens)
``modegpt_first_divergence_position``            histogram  per comparison: first position whose argmax tokens differ (not observed when
                                                            the argmaxes agree everywhere)
``modegpt_rollbacks_total{reason}``              counter    kl|agreement|error_rate|latency|manual|engine_failure
``modegpt_review_queue_depth``                   gauge      pending review items
``modegpt_review_items_total{trigger}``          counter    divergence|regex|json_schema (an item with two triggers counts under both)
``modegpt_review_decisions_total{decision}``     counter    approved|rejected

Buckets (``le``), chosen so that ``histogram_quantile`` is meaningful around the rollout thresholds
(``max_kl_mean`` 0.5, ``min_top1_agreement`` 0.6 by default):

- KL mean / max: log-spaced 1e-4 ... 10 nats (KL_BUCKETS, 1-2.5-5 per decade): a near-lossless variant
  sits at 1e-3 (llama.cpp q8_0 KLD ~0.0014), a damaged one above 0.3.
- log-prob gap: signed, -2.5 ... 10 nats (GAP_BUCKETS: 0 and +-0.01 ... 2.5 log-spaced, up to 10 above).
  Having negative buckets, it exposes no ``_sum`` (prometheus_client follows OpenMetrics there): read
  it with ``histogram_quantile``.
- top-1 agreement: 0.1 ... 1.0 (AGREEMENT_BUCKETS), dense above 0.8 where healthy variants live; an
  agreement of exactly 1.0 falls in ``le="1.0"``.
- first divergence position: powers of two 0, 1, 2, 4, ... 4096 tokens (POSITION_BUCKETS).

The divergence metrics of two in-process models are computed from their full next-token
distributions on the same prefix (teacher forcing). When a variant is remote (an OpenAI-compatible
backend, ``server/remote``) only the top-k logprobs of echo scoring are available (k <= 20 with vLLM and
this server; ``modegpt_divergence_top_k``): the KL is then computed on the tokens both top-k lists hold
plus one merged "rest" outcome, which is a LOWER BOUND of the full-vocabulary KL (``kl_max`` too);
top-1 agreement, the log-prob gap and the first divergence stay exact.
"""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

VARIANTS = ("original", "compressed")
ROUTE_REASONS = ("pinned_model", "pinned_header", "critical", "sticky", "weight", "fallback", "failover")
ROLLOUT_STATES = ("idle", "progressing", "paused", "promoted", "rolled_back")
SHADOW_RESULTS = ("ok", "error", "dropped")
ROLLBACK_REASONS = ("kl", "agreement", "error_rate", "latency", "manual", "engine_failure")
REVIEW_TRIGGERS = ("divergence", "regex", "json_schema")
REVIEW_DECISIONS = ("approved", "rejected")

KL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
              5.0, 10.0)
GAP_BUCKETS = (-2.5, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0, 10.0)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
POSITION_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_IN_PROCESS = ("One observation per comparison. Two in-process models: computed in process from the full "
               "next-token distributions of the original and the compressed model on the same prefix (teacher "
               "forcing). A remote variant: from the top-k logprobs of echo scoring (k in modegpt_divergence_top_k), "
               "where the KL is a lower bound of the full-vocabulary KL")


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(allowed)})")
    return value


class CanaryMetrics:
    """The ``modegpt_`` metrics on ``registry``; all methods are cheap and thread-safe."""

    def __init__(self, registry: CollectorRegistry):
        r = self.registry = registry
        self.canary_weight = Gauge("modegpt_canary_weight",
                                   "Fraction of public-id traffic answered by the compressed model.", registry=r)
        self.rollout_state = Gauge("modegpt_rollout_state",
                                   "Rollout state: 1 for the current state, 0 for the others.", ["state"],
                                   registry=r)
        self.rollout_step = Gauge("modegpt_rollout_step", "Index of the current rollout step (-1: none).",
                                  registry=r)
        self.variant_info = Gauge("modegpt_variant_info",
                                  "Which served model_name is the original and which the compressed variant "
                                  "(always 1; join vllm:* metrics on model_name).", ["variant", "model_name"],
                                  registry=r)
        self.requests = Counter("modegpt_requests", "Public-id requests by the variant that answered and why.",
                                ["variant", "reason"], registry=r)
        self.shadow_runs = Counter("modegpt_shadow_runs", "Shadow runs on the other variant, by outcome.",
                                   ["result"], registry=r)
        self.comparisons = Counter("modegpt_comparisons", "Compared (original, compressed) outputs. " + _IN_PROCESS
                                   + ".", registry=r)
        self.exact_match = Counter("modegpt_exact_match",
                                   "Shadow comparisons (both variants answered the request) whose two output texts were identical; "
                                   "divide by modegpt_shadow_runs_total{result=\"ok\"}.",
                                   registry=r)
        self.kl_mean = Histogram("modegpt_divergence_kl_mean",
                                 "Mean over positions of KL(p_original || p_compressed) in nats. " + _IN_PROCESS
                                 + ".", buckets=KL_BUCKETS, registry=r)
        self.kl_max = Histogram("modegpt_divergence_kl_max",
                                "Max over positions of KL(p_original || p_compressed) in nats. " + _IN_PROCESS
                                + ".", buckets=KL_BUCKETS, registry=r)
        self.top1_agreement = Histogram("modegpt_top1_agreement",
                                        "Fraction of positions where both models' argmax tokens agree. "
                                        + _IN_PROCESS + ".", buckets=AGREEMENT_BUCKETS, registry=r)
        self.logprob_gap = Histogram("modegpt_logprob_gap",
                                     "Mean of log p_original(t) - log p_compressed(t) over the scored tokens t, nats (signed). " + _IN_PROCESS
                                     + ".", buckets=GAP_BUCKETS, registry=r)
        self.first_divergence = Histogram("modegpt_first_divergence_position",
                                          "First position whose argmax tokens differ (not observed when they "
                                          "agree everywhere). " + _IN_PROCESS + ".",
                                          buckets=POSITION_BUCKETS, registry=r)
        self.rollbacks = Counter("modegpt_rollbacks", "Canary rollbacks by reason.", ["reason"], registry=r)
        self.review_queue_depth = Gauge("modegpt_review_queue_depth", "Review items waiting for a decision.",
                                        registry=r)
        self.review_items = Counter("modegpt_review_items", "Items put on the review queue, by trigger.",
                                    ["trigger"], registry=r)
        self.review_decisions = Counter("modegpt_review_decisions", "Review decisions, by decision.",
                                        ["decision"], registry=r)
        # every bounded label value exists from the start (rate() of an absent series is "no data")
        for v in VARIANTS:
            for reason in ROUTE_REASONS:
                self.requests.labels(v, reason)
        for res in SHADOW_RESULTS:
            self.shadow_runs.labels(res)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(reason)
        for t in REVIEW_TRIGGERS:
            self.review_items.labels(t)
        for d in REVIEW_DECISIONS:
            self.review_decisions.labels(d)
        self.set_weight(0.0)
        self.set_rollout("idle", -1)

    # -- routing and rollout -------------------------------------------------------------------------

    def set_variant_models(self, original: str, compressed: str) -> None:
        """Publish which ``model_name`` is which variant (dashboards and alerts join on it)."""
        self.variant_info.clear()
        self.variant_info.labels("original", original).set(1)
        self.variant_info.labels("compressed", compressed).set(1)

    def count_request(self, variant: str, reason: str) -> None:
        self.requests.labels(_check(variant, VARIANTS, "variant"), _check(reason, ROUTE_REASONS, "reason")).inc()

    def set_weight(self, weight: float) -> None:
        self.canary_weight.set(float(weight))

    def set_rollout(self, state: str, step: int | None = None) -> None:
        _check(state, ROLLOUT_STATES, "rollout state")
        for s in ROLLOUT_STATES:
            self.rollout_state.labels(s).set(1.0 if s == state else 0.0)
        self.rollout_step.set(-1 if step is None else int(step))

    def count_rollback(self, reason: str) -> None:
        self.rollbacks.labels(_check(reason, ROLLBACK_REASONS, "rollback reason")).inc()

    def count_shadow(self, result: str) -> None:
        self.shadow_runs.labels(_check(result, SHADOW_RESULTS, "shadow result")).inc()

    # -- comparisons ---------------------------------------------------------------------------------

    def observe_comparison(self, kl_mean: float, kl_max: float, agreement: float, logprob_gap: float,
                           first_divergence: int | None, exact_match: bool) -> None:
        """One compared pair. Non-finite numbers are skipped (a histogram cannot hold NaN)."""
        self.comparisons.inc()
        if exact_match:
            self.exact_match.inc()
        for hist, x in ((self.kl_mean, kl_mean), (self.kl_max, kl_max), (self.top1_agreement, agreement),
                        (self.logprob_gap, logprob_gap)):
            if x is not None and math.isfinite(x):
                hist.observe(float(x))
        if first_divergence is not None:
            self.first_divergence.observe(int(first_divergence))

    # -- review --------------------------------------------------------------------------------------

    def set_queue_depth(self, depth: int) -> None:
        self.review_queue_depth.set(int(depth))

    def count_review_item(self, trigger: str) -> None:
        self.review_items.labels(_check(trigger, REVIEW_TRIGGERS, "review trigger")).inc()

    def count_decision(self, decision: str) -> None:
        self.review_decisions.labels(_check(decision, REVIEW_DECISIONS, "review decision")).inc()
