"""The ``modegpt_backend_*`` series of remote variants, on the app's registry beside the ``modegpt_``
canary family. Labels are bounded: ``variant`` is ``original`` | ``compressed`` (a model that is
neither uses its id).

Metric (as scraped)                           type     meaning
``modegpt_backend_up{variant,model_name}``    gauge    1 while the variant's backend is in service, 0 while ejected
``modegpt_backend_ejections_total{variant}``  counter  times the backend was ejected (consecutive failures)
``modegpt_backend_retries_total{variant}``    counter  forwarded requests retried (connect errors, 502/503/504)
``modegpt_divergence_top_k``                  gauge    k of the top-k logprobs the divergence metrics are computed
                                                       from (set when a variant is remote; absent: full vocabulary)

The remote backends export their own engine metrics (``vllm:*``); the router exports none for a remote
variant, so scrape the backends too (``deploy/k8s-vllm/``).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RemoteMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.up = Gauge("modegpt_backend_up", "1 while the variant's remote backend is in service, 0 while it is "
                        "ejected.", ["variant", "model_name"], registry=registry)
        self.ejections = Counter("modegpt_backend_ejections", "Times a remote backend was ejected after "
                                 "consecutive failures (requests or health checks).", ["variant"], registry=registry)
        self.retries = Counter("modegpt_backend_retries", "Requests to a remote backend retried before any byte "
                               "was relayed (connect errors, broken connections, 502/503/504).", ["variant"],
                               registry=registry)
        self.top_k = Gauge("modegpt_divergence_top_k",
                           "k of the top-k logprobs that the divergence metrics of a pair with a remote variant are "
                           "computed from: their KL is then a LOWER BOUND of the full-vocabulary KL.",
                           registry=registry)

    def watch(self, variant: str, backend) -> None:
        """Publish ``backend``'s health under ``variant`` and count its ejections and retries."""
        backend.metrics, backend.variant = self, variant
        gauge = self.up.labels(variant, backend.model_id or backend.base_url)
        gauge.set(1 if backend.health.up else 0)
        self.ejections.labels(variant)
        self.retries.labels(variant)

        seen = [backend.health.ejections]

        def changed(up: bool, reason: str) -> None:
            gauge.set(1 if up else 0)
            new = backend.health.ejections - seen[0]
            if new > 0:
                self.ejections.labels(variant).inc(new)
                seen[0] += new

        backend.health.subscribe(changed)

    def count_retry(self, variant: str | None) -> None:
        self.retries.labels(variant or "unknown").inc()

    def set_top_k(self, k: int) -> None:
        self.top_k.set(k)
