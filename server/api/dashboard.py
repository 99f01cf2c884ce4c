"""A built-in dashboard for hosts without Grafana (the embedded default).

    GET /dashboard        one self-contained HTML page (inline CSS and JS, no external assets)
    GET /dashboard/data   public read-only aggregates for its charts (JSON)

The page polls ``/dashboard/data`` every 2 s and draws canary state, traffic split by variant,
divergence (KL mean, top-1 agreement, exact match) and generation tokens/s per model on ``<canvas>``.
Rates and interval means are computed in the browser from the differences of consecutive counters.

``/dashboard/data`` needs no key and holds only what ``/metrics`` already publishes (it is read from
the app's Prometheus registry) plus the canary's bounded identity (public id, the two model ids, the
last rollback kind): no prompts, no outputs, no free-text reasons, no keys. Everything else the page
shows comes from the admin endpoints with the admin key the operator types into the page (kept in
``sessionStorage``, sent as ``Authorization: Bearer``): ``/admin/canary`` (status, rollback reason)
and ``/v1/review/items`` (the queue, approve / reject).
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from .registry import ModelRegistry

# the page runs its own inline script and style and talks to this origin only
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


@lru_cache(maxsize=1)
def dashboard_html() -> str:
    return resources.files("server.api").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _samples(registry) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in registry.collect():
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def dashboard_data(registry: ModelRegistry, prom_registry) -> dict[str, Any]:
    """The aggregates the page charts (counters are cumulative; the page differentiates them)."""
    smp = _samples(prom_registry)

    def one(name: str, default: float | None = 0.0) -> float | None:
        vals = smp.get(name)
        return _num(vals[0][1]) if vals else default

    def by(name: str, label: str) -> dict[str, float]:
        return {lab[label]: _num(v) for lab, v in smp.get(name, []) if label in lab}

    requests: dict[str, dict[str, float]] = {}
    for lab, v in smp.get("modegpt_requests_total", []):
        requests.setdefault(lab["variant"], {})[lab["reason"]] = _num(v)
    state = next((lab["state"] for lab, v in smp.get("modegpt_rollout_state", []) if v == 1), None)

    models: dict[str, dict[str, Any]] = {}

    def model(lab: dict) -> dict[str, Any]:
        name = lab["model_name"]
        return models.setdefault(name, {"model_name": name, "variant": lab.get("variant", name),
                                        "finished": {}})

    for metric, key in (("vllm:generation_tokens_total", "generation_tokens"),
                        ("vllm:prompt_tokens_total", "prompt_tokens"), ("vllm:num_requests_running", "running"),
                        ("vllm:num_requests_waiting", "waiting"), ("vllm:kv_cache_usage_perc", "kv_cache_usage")):
        for lab, v in smp.get(metric, []):
            model(lab)[key] = _num(v)
    for lab, v in smp.get("vllm:request_success_total", []):
        model(lab)["finished"][lab["finished_reason"]] = _num(v)

    canary = registry.canary
    ident = None
    if canary is not None:
        snap = canary.rollout.snapshot()
        ident = {"public_id": canary.public_id, "original": canary.served("original").name,
                 "compressed": canary.served("compressed").name, "rollback_kind": snap.get("rollback_kind"),
                 "steps": snap.get("steps")}
    return {
        "time": time.time(),
        "canary": ident,
        "weight": one("modegpt_canary_weight", None),
        "state": state,
        "step": one("modegpt_rollout_step", None),
        "requests": requests,
        "shadow": by("modegpt_shadow_runs_total", "result"),
        "rollbacks": by("modegpt_rollbacks_total", "reason"),
        "comparisons": one("modegpt_comparisons_total"),
        "exact_match": one("modegpt_exact_match_total"),
        "kl_mean": {"sum": one("modegpt_divergence_kl_mean_sum"), "count": one("modegpt_divergence_kl_mean_count")},
        "top1_agreement": {"sum": one("modegpt_top1_agreement_sum"), "count": one("modegpt_top1_agreement_count")},
        "review": {"depth": one("modegpt_review_queue_depth", None),
                   "items": by("modegpt_review_items_total", "trigger"),
                   "decisions": by("modegpt_review_decisions_total", "decision")},
        "models": sorted(models.values(), key=lambda m: m["model_name"]),
    }


def build_dashboard_router(registry: ModelRegistry, metrics: Any) -> APIRouter:
    """``metrics``: the app's ``ServerMetrics`` (its ``registry`` holds the vllm:* and modegpt_* families)."""
    router = APIRouter()

    @router.get("/dashboard", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(dashboard_html(), headers=_HEADERS)

    @router.get("/dashboard/data")
    async def data():
        return JSONResponse(dashboard_data(registry, metrics.registry), headers={"Cache-Control": "no-store"})

    return router
