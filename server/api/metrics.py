"""Prometheus metrics under vLLM's names, labelled ``model_name`` (one value per served model) and
``variant`` (``original`` | ``compressed`` for the canary's two models, else the model id itself).

What the engine counts (running/waiting requests, KV usage, prompt and generation tokens, preemptions)
is read from ``engine.stats()`` at scrape time by a custom collector; request outcomes and latency
histograms are fed by the API as requests progress. Every app owns its own
``CollectorRegistry`` so several apps can live in one process (tests).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

EngineSource = Callable[[], Iterable[tuple[str, Any]]]  # yields (model_name, engine)
VariantOf = Callable[[str], str]  # model_name -> "original" | "compressed" | the model_name itself

LABELS = ["model_name", "variant"]


def _identity(name: str) -> str:
    return name


class EngineStatsCollector:
    """Reads ``EngineStats`` from every engine when Prometheus scrapes."""

    def __init__(self, engines: EngineSource, variant_of: VariantOf = _identity):
        self._engines = engines
        self._variant_of = variant_of

    def describe(self):
        return []

    def collect(self):
        lab = LABELS
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Number of requests in model execution batches.", labels=lab)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=lab)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               labels=lab)
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=lab)
        gen = CounterMetricFamily("vllm:generation_tokens", "Number of generation tokens processed.", labels=lab)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemptions.", labels=lab)
        for name, engine in self._engines():
            s = engine.stats()
            lv = [name, self._variant_of(name)]
            running.add_metric(lv, s.num_running)
            waiting.add_metric(lv, s.num_waiting)
            kv.add_metric(lv, s.kv_cache_usage)
            prompt.add_metric(lv, s.prompt_tokens_total)
            gen.add_metric(lv, s.generation_tokens_total)
            preempt.add_metric(lv, s.num_preemptions_total)
        yield from (running, waiting, kv, prompt, gen, preempt)


class ServerMetrics:
    """``variant_of`` maps a served model name to its ``variant`` label value (the app passes
    ``ModelRegistry.variant_of``: the canary's roles, else ``ServedModel.variant``, else the name)."""

    def __init__(self, engines: EngineSource, variant_of: VariantOf = _identity):
        self.registry = CollectorRegistry(auto_describe=True)
        self.variant_of = variant_of
        labels = LABELS
        r = self.registry
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", labels,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        r.register(EngineStatsCollector(engines, variant_of))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latency bookkeeping of one engine request (one prompt x one sample)."""

    def __init__(self, metrics: ServerMetrics, model_name: str, arrival: float):
        self._m = metrics
        self._labels = (model_name, metrics.variant_of(model_name))
        self._arrival = arrival
        self._last: float | None = None

    def token(self, now: float) -> None:
        if self._last is None:
            self._m.ttft.labels(*self._labels).observe(now - self._arrival)
        else:
            self._m.itl.labels(*self._labels).observe(now - self._last)
        self._last = now

    def finished(self, reason: str, now: float) -> None:
        self._m.request_success.labels(*self._labels, reason).inc()
        self._m.e2e.labels(*self._labels).observe(now - self._arrival)
