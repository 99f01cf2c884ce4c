"""Generate the Grafana dashboards, the Prometheus alert rules and the Argo Rollouts AnalysisTemplate
from one place, so that every PromQL expression is written once.

    pip install -e '.[ops]'          # grafana-foundation-sdk (only needed to regenerate dashboards)
    python grafana/build.py          # rewrite the generated files
    python grafana/build.py --check  # exit 1 if a committed file differs from what would be generated

Writes:
    grafana/dashboards/modegpt-canary.json        canary overview
    grafana/dashboards/modegpt-drift.json         output drift and the review queue
    grafana/dashboards/modegpt-performance.json   throughput / latency / KV cache, per model_name
    deploy/prometheus/alerts.yml                  alert rules (windows of ALERT_WINDOW)
    deploy/k8s/analysis-template.yaml             Argo Rollouts AnalysisTemplate (the alerts' queries)
    deploy/k8s/prometheusrule.yaml                the alert rules for the Prometheus Operator

Dashboard queries use Grafana's ``$__rate_interval`` for range vectors and ``$model_name`` (a
multi-value variable over ``vllm:*``'s ``model_name`` label); ``substitute()`` turns them into plain
PromQL (the real-Prometheus test does that with a 30 s range). Variant-aware queries join the vLLM
metrics to ``modegpt_variant_info{variant, model_name}`` on ``model_name``, so they work whatever the
served model names are (the ``vllm:*`` series carry a ``variant`` label of their own too; the join's
``group_left (variant)`` overrides it with the same value, and keeps older scrapes without it working).
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
ANALYSIS_FILE = ROOT / "deploy" / "k8s" / "analysis-template.yaml"
RULE_FILE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"

RATE = "$__rate_interval"
MODEL = 'model_name=~"$model_name"'
ALERT_WINDOW = "5m"
DATASOURCE_UID = "${datasource}"

# thresholds: the rollout analysis defaults of server/canary/config.py (rollout.thresholds)
MAX_KL_MEAN = 0.5
MIN_TOP1_AGREEMENT = 0.6
MAX_ERROR_RATE = 0.05
MAX_LATENCY_RATIO = 2.0


# -- PromQL building blocks ------------------------------------------------------------------------


def variant_join(expr: str, variant: str | None = None) -> str:
    """``expr`` (series carrying ``model_name``) with a ``variant`` label from ``modegpt_variant_info``,
    optionally only that variant's series."""
    sel = f'{{variant="{variant}"}}' if variant else ""
    return f"{expr} * on (model_name) group_left (variant) group by (model_name, variant) (modegpt_variant_info{sel})"


def mean_of(hist: str, w: str) -> str:
    return f"sum(rate({hist}_sum[{w}])) / sum(rate({hist}_count[{w}]))"


def error_rate(w: str, variant: str | None) -> str:
    """Fraction of engine requests finished with ``error`` (per variant, or of one variant); 0 when
    there were requests but no error series yet."""
    by = "sum by (variant)" if variant is None else "sum"
    err_rate = 'rate(vllm:request_success_total{finished_reason="error"}[' + w + "])"
    all_rate = "rate(vllm:request_success_total[" + w + "])"
    errors = f"{by} ({variant_join(err_rate, variant)})"
    total = f"{by} ({variant_join(all_rate, variant)})"
    return f"({errors} or {total} * 0) / {total}"


def quantile_by_variant(q: float, hist: str, w: str, variant: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({variant_join(f'rate({hist}_bucket[{w}])', variant)}))"


def latency_ratio(w: str, q: float = 0.9) -> str:
    hist = "vllm:e2e_request_latency_seconds"
    return f"{quantile_by_variant(q, hist, w, 'compressed')} / {quantile_by_variant(q, hist, w, 'original')}"


# -- alerts (and the same queries as Argo analysis metrics) ----------------------------------------


@dataclass(frozen=True)
class Alert:
    name: str
    metric: str          # AnalysisTemplate metric name
    query: str           # PromQL with W for the range
    op: str              # alert fires when `query op threshold`
    threshold: float
    for_: str
    severity: str
    summary: str
    description: str

    def expr(self, w: str = ALERT_WINDOW) -> str:
        return f"{self.promql(w)} {self.op} {self.threshold:g}"

    def promql(self, w: str = ALERT_WINDOW) -> str:
        return self.query.replace(W, w)


W = "__WINDOW__"  # the range placeholder of alert queries


ALERTS = (
    Alert("ModegptDivergenceHigh", "kl-mean", mean_of("modegpt_divergence_kl_mean", W), ">", MAX_KL_MEAN,
          "10m", "warning", "Compressed model diverges from the original",
          "Mean KL(original || compressed) over the last " + ALERT_WINDOW + " is {{ $value | printf \"%.3g\" }} nats "
          f"(threshold {MAX_KL_MEAN:g}). See the drift dashboard and the review queue."),
    Alert("ModegptTop1AgreementLow", "top1-agreement", mean_of("modegpt_top1_agreement", W), "<",
          MIN_TOP1_AGREEMENT, "10m", "warning", "Compressed model's top-1 tokens disagree with the original",
          "Mean top-1 agreement is {{ $value | printf \"%.3g\" }} "
          f"(threshold {MIN_TOP1_AGREEMENT:g})."),
    Alert("ModegptCanaryRolledBack", "rollbacks", "sum(increase(modegpt_rollbacks_total[" + W + "]))", ">", 0,
          "0m", "critical", "The canary was rolled back",
          "The compressed model was rolled back {{ $value | printf \"%.0f\" }} time(s) in the last "
          + ALERT_WINDOW + "; modegpt_rollbacks_total{reason} and GET /admin/canary say why."),
    Alert("ModegptCompressedErrorRate", "compressed-error-rate", error_rate(W, "compressed"), ">",
          MAX_ERROR_RATE, "5m", "critical", "The compressed model fails requests",
          "{{ $value | humanizePercentage }} of the compressed model's requests finished with an error "
          f"(threshold {MAX_ERROR_RATE:.0%})."),
    Alert("ModegptLatencyRatioHigh", "latency-ratio", latency_ratio(W), ">", MAX_LATENCY_RATIO, "10m",
          "warning", "The compressed model is slower than the original",
          "p90 end-to-end latency compressed / original is {{ $value | printf \"%.2f\" }} "
          f"(threshold {MAX_LATENCY_RATIO:g})."),
    # remote variants only (server/remote): an ejected compressed backend also rolls the canary back, but an
    # ejected ORIGINAL only shows as failover (the compressed model answers everything), so this one says it
    # (no remote variant: no series; `or vector(1)` keeps the Argo analysis metric defined, not an error)
    Alert("ModegptBackendEjected", "backends-up", "(min(modegpt_backend_up) or vector(1))", "<", 1, "1m", "critical",
          "A remote model backend is out of service",
          "At least one remote backend is ejected (modegpt_backend_up{variant} is 0): if it is the original, the "
          "compressed model now answers all traffic (reason failover) and no comparisons run."),
)


def alert_queries(w: str = ALERT_WINDOW) -> dict[str, str]:
    """name -> the query of each alert without its threshold (what the analysis metric reads)."""
    return {a.name: a.promql(w) for a in ALERTS}


def alerts_doc(w: str = ALERT_WINDOW) -> dict:
    rules = []
    for a in ALERTS:
        rules.append({"alert": a.name, "expr": a.expr(w), "for": a.for_,
                      "labels": {"severity": a.severity, "service": "modegpt"},
                      "annotations": {"summary": a.summary, "description": a.description}})
    return {"groups": [{"name": "modegpt-canary", "interval": "30s", "rules": rules}]}


_NEGATE = {">": "<=", "<": ">=", ">=": "<", "<=": ">"}


def analysis_doc(w: str = ALERT_WINDOW) -> dict:
    metrics = []
    for a in ALERTS:
        bad = f"result[0] {a.op} {a.threshold:g}"
        good = f"result[0] {_NEGATE[a.op]} {a.threshold:g}"
        metrics.append({
            "name": a.metric,
            "interval": "1m",
            "initialDelay": "2m",
            # NaN (no comparisons / no traffic yet) matches neither condition: inconclusive, the rollout pauses
            "successCondition": good,
            "failureCondition": bad,
            "failureLimit": 0 if a.severity == "critical" else 2,
            "inconclusiveLimit": 10,
            "provider": {"prometheus": {"address": "{{args.prometheus-address}}", "query": a.promql(w)}},
        })
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": {"name": "modegpt-canary", "labels": {"app.kubernetes.io/name": "modegpt"}},
        "spec": {"args": [{"name": "prometheus-address", "value": "http://prometheus-operated.monitoring:9090"}],
                 "metrics": metrics},
    }


def prometheus_rule_doc(w: str = ALERT_WINDOW) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "modegpt-canary", "labels": {"app.kubernetes.io/name": "modegpt"}},
            "spec": alerts_doc(w)}


# -- dashboards ------------------------------------------------------------------------------------


def _sdk():
    try:
        from grafana_foundation_sdk.builders import dashboard as gd
        from grafana_foundation_sdk.builders import prometheus as gp
        from grafana_foundation_sdk.builders import stat as gs
        from grafana_foundation_sdk.builders import timeseries as gt
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import dashboard as md
    except ImportError as e:  # pragma: no cover - depends on the optional group
        raise SystemExit(f"grafana-foundation-sdk is missing ({e}); pip install -e '.[ops]'") from None
    return gd, gp, gs, gt, md, JSONEncoder


class Board:
    """A dashboard on a 24-column grid: panels are placed left to right, ``w`` columns by ``h`` rows."""

    def __init__(self, uid: str, title: str, description: str, model_var: bool):
        self.gd, self.gp, self.gs, self.gt, self.md, self.encoder = _sdk()
        gd, md = self.gd, self.md
        self.ds = md.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
        self.b = (gd.Dashboard(title).uid(uid).description(description).tags(["modegpt", "canary"])
                  .refresh("10s").time("now-1h", "now").timezone("browser").editable()
                  .tooltip(md.DashboardCursorSync.CROSSHAIR))
        self.b.with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        if model_var:
            self.b.with_variable(
                gd.QueryVariable("model_name").label("Model").datasource(self.ds)
                .query("label_values(vllm:num_requests_running, model_name)")
                .multi(True).include_all(True).all_value(".*").refresh(md.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(md.VariableSort.ALPHABETICAL_ASC)
                .current(md.VariableOption(selected=True, text="All", value="$__all")))
        self.x = self.y = self.row_h = self.next_id = 0

    def _place(self, panel, w: int, h: int):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        self.next_id += 1
        panel.id(self.next_id).grid_pos(self.md.GridPos(h=h, w=w, x=self.x, y=self.y))
        self.x += w
        self.row_h = max(self.row_h, h)
        self.b.with_panel(panel)

    def row(self, title: str):
        self.x, self.y = 0, self.y + self.row_h
        self.row_h = 0
        self.next_id += 1
        r = self.gd.Row(title).id(self.next_id).grid_pos(self.md.GridPos(h=1, w=24, x=0, y=self.y))
        self.b.with_row(r)
        self.y += 1

    def _targets(self, panel, queries):
        for i, (expr, legend) in enumerate(queries):
            panel.with_target(self.gp.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
                              .range())
        return panel

    def ts(self, title: str, queries: list[tuple[str, str]], unit: str = "short", desc: str = "", w: int = 12,
           h: int = 8, stack: bool = False, min_val: float | None = 0, max_val: float | None = None):
        from grafana_foundation_sdk.models import common as mc

        p = self.gt.Panel().title(title).description(desc).datasource(self.ds).unit(unit).line_width(1) \
            .fill_opacity(25 if stack else 10).show_points(mc.VisibilityMode.NEVER)
        if min_val is not None:
            p.min(min_val)
        if max_val is not None:
            p.max(max_val)
        if stack:
            from grafana_foundation_sdk.builders import common as gc

            p.stacking(gc.StackingConfig().mode(mc.StackingMode.NORMAL))
        self._place(self._targets(p, queries), w, h)

    def stat(self, title: str, queries: list[tuple[str, str]], unit: str = "short", desc: str = "", w: int = 6,
             h: int = 5, text_name: bool = False):
        from grafana_foundation_sdk.builders import common as gc
        from grafana_foundation_sdk.models import common as mc

        p = self.gs.Panel().title(title).description(desc).datasource(self.ds).unit(unit) \
            .graph_mode(mc.BigValueGraphMode.AREA).reduce_options(gc.ReduceDataOptions().calcs(["lastNotNull"]))
        if text_name:
            p.text_mode(mc.BigValueTextMode.NAME).graph_mode(mc.BigValueGraphMode.NONE)
        self._place(self._targets(p, queries), w, h)

    def build(self) -> dict:
        return json.loads(self.encoder(sort_keys=True, indent=2).encode(self.b.build()))


def _quantiles(hist: str, qs=(0.5, 0.9, 0.99), by: str = "", legend_prefix: str = "",
               mean: bool = True) -> list[tuple[str, str]]:
    group = f"sum by ({by}, le)" if by else "sum by (le)"
    sel = f"{{{MODEL}}}" if by == "model_name" else ""
    out = [(f"histogram_quantile({q}, {group} (rate({hist}_bucket{sel}[{RATE}])))",
            f"{legend_prefix}p{round(q * 100):d}") for q in qs]
    if not mean:
        return out
    if by:
        avg = f"sum by ({by}) (rate({hist}_sum{sel}[{RATE}])) / sum by ({by}) (rate({hist}_count{sel}[{RATE}]))"
    else:
        avg = mean_of(hist, RATE)
    out.append((avg, f"{legend_prefix}mean"))
    return out


def canary_dashboard() -> dict:
    d = Board("modegpt-canary", "modegpt / canary overview",
              "Canary weight, rollout state and the traffic split between the original and the compressed model.",
              model_var=True)
    d.row("Rollout")
    d.stat("Canary weight", [("max(modegpt_canary_weight)", "weight")], "percentunit",
           "Fraction of public-id traffic answered by the compressed model.")
    d.stat("Rollout state", [("max by (state) (modegpt_rollout_state) > 0", "{{state}}")],
           desc="idle | progressing | paused | promoted | rolled_back", text_name=True)
    d.stat("Rollout step", [("max(modegpt_rollout_step)", "step")], desc="Index into rollout.steps (-1: none).")
    d.stat("Rollbacks", [(f"sum by (reason) (increase(modegpt_rollbacks_total[{RATE}])) > 0 or "
                          f"sum(increase(modegpt_rollbacks_total[{RATE}]))", "{{reason}}")],
           desc="Rollbacks in the last rate interval, by reason (kl, agreement, error_rate, latency, manual, "
                "engine_failure).")
    d.ts("Canary weight over time", [("max(modegpt_canary_weight)", "weight")], "percentunit", max_val=1)
    d.ts("Rollout state over time", [("max by (state) (modegpt_rollout_state)", "{{state}}")], max_val=1)
    d.row("Traffic")
    d.ts("Public-id requests by variant and reason",
         [(f"sum by (variant, reason) (rate(modegpt_requests_total[{RATE}]))", "{{variant}} / {{reason}}")],
         "reqps", "Why each request went where it went: pinned_model, pinned_header, critical, sticky, weight, "
                  "fallback, failover (remote original ejected: the compressed variant answers).", stack=True)
    d.ts("Compressed share of public-id traffic",
         [(f'sum(rate(modegpt_requests_total{{variant="compressed"}}[{RATE}])) / '
           f"sum(rate(modegpt_requests_total[{RATE}]))", "observed"),
          ("max(modegpt_canary_weight)", "configured weight")], "percentunit", max_val=1)
    d.ts("Engine requests by model and finish reason",
         [(f"sum by (model_name, finished_reason) (rate(vllm:request_success_total{{{MODEL}}}[{RATE}]))",
           "{{model_name}} / {{finished_reason}}")], "reqps")
    d.ts("Remote backends", [("max by (variant, model_name) (modegpt_backend_up)", "up: {{variant}} ({{model_name}})"),
                             (f"sum by (variant) (increase(modegpt_backend_ejections_total[{RATE}]))",
                              "ejected: {{variant}}")], "none",
         "Only when a variant is a remote OpenAI-compatible backend (--original/--compressed URL): 1 while "
         "its health checks and requests pass, 0 once ejected (docs/OPERATIONS.md section 8). Empty otherwise.")
    d.ts("Shadow runs", [(f"sum by (result) (rate(modegpt_shadow_runs_total[{RATE}]))", "{{result}}")], "ops",
         "Requests also run on the other variant for comparison: ok, error, dropped (queue full).")
    d.row("Errors")
    d.ts("Error rate per variant", [(error_rate(RATE, None), "{{variant}}")], "percentunit",
         "Engine requests finished with finished_reason=\"error\" / all engine requests, per variant "
         f"(alert above {MAX_ERROR_RATE:.0%} for the compressed model).")
    d.ts("Aborted requests per model",
         [(f'sum by (model_name) (rate(vllm:request_success_total{{finished_reason="abort",{MODEL}}}[{RATE}])) '
           f"or sum by (model_name) (rate(vllm:request_success_total{{{MODEL}}}[{RATE}])) * 0", "{{model_name}}")],
         "reqps", "Client disconnects and shutdowns (finished_reason=\"abort\").")
    d.ts("Admission: refused and expired requests",
         [(f"sum by (reason) (rate(modegpt_http_rejected_total[{RATE}]))", "refused: {{reason}}"),
          (f"sum by (reason) (rate(modegpt_http_deadline_exceeded_total[{RATE}]))", "deadline: {{reason}}")],
         "reqps", "429 overloaded (admission queue full, --max-pending), 503 draining (SIGTERM), 504 timeout "
                  "(--request-timeout) and requests cut by the shutdown deadline.")
    d.ts("Requests in flight", [("sum(modegpt_http_requests_in_flight)", "in flight")], "none",
         "Completion requests admitted and not finished; 429s start at --max-pending.")
    d.ts("HTTP 5xx responses",
         [(f'sum by (handler, status) (rate(http_requests_total{{status=~"5.."}}[{RATE}])) or vector(0)',
           "{{handler}} {{status}}")], "reqps",
         "From http_requests_total{handler,method,status} when the server exports it "
         "(prometheus-fastapi-instrumentator); 0 otherwise.", w=24)
    return d.build()


def drift_dashboard() -> dict:
    d = Board("modegpt-drift", "modegpt / output drift",
              "How far the compressed model's outputs drift from the original's: from the full next-token "
              "distributions of both models on the same prefix when both run in process; from the top-k "
              "logprobs of echo scoring when a variant is a remote backend (the KL is then a lower bound, "
              "see modegpt_divergence_top_k); and the human review queue.",
              model_var=False)
    d.row("Divergence (per comparison)")
    d.ts("KL(original || compressed), mean over positions", _quantiles("modegpt_divergence_kl_mean"), "none",
         f"Quantiles over comparisons of the per-comparison mean KL, nats. Rollout threshold {MAX_KL_MEAN:g}.")
    d.ts("KL, max over positions", _quantiles("modegpt_divergence_kl_max"), "none",
         "Quantiles over comparisons of the per-comparison max KL, nats.")
    d.ts("Top-1 agreement", _quantiles("modegpt_top1_agreement", qs=(0.1, 0.5, 0.9)), "percentunit",
         f"Fraction of positions whose argmax tokens agree. Rollout threshold {MIN_TOP1_AGREEMENT:g} (mean).",
         max_val=1)
    d.ts("Log-prob gap of the scored tokens", _quantiles("modegpt_logprob_gap", qs=(0.1, 0.5, 0.9), mean=False),
         "none", "Per comparison: mean of log p_original(t) - log p_compressed(t) over the scored tokens, nats "
         "(> 0: the compressed model is less sure). Signed, so the histogram has no _sum (no mean line).",
         min_val=None)
    d.ts("Exact-match rate",
         [(f"sum(rate(modegpt_exact_match_total[{RATE}])) / sum(rate(modegpt_shadow_runs_total{{result=\"ok\"}}[{RATE}]))",
           "exact match"), ], "percentunit", "Shadow comparisons (both variants answered the same request) whose two output texts were identical.", max_val=1)
    d.ts("First divergence position", _quantiles("modegpt_first_divergence_position", qs=(0.1, 0.5, 0.9)),
         "short", "First position (tokens) whose argmax tokens differ.")
    d.ts("Comparisons per second", [(f"sum(rate(modegpt_comparisons_total[{RATE}]))", "comparisons")], "ops",
         w=24, h=6)
    d.row("Review queue")
    d.stat("Pending review items", [("max(modegpt_review_queue_depth)", "pending")], w=8)
    d.ts("Items queued by trigger",
         [(f"sum by (trigger) (increase(modegpt_review_items_total[{RATE}]))", "{{trigger}}")], "short",
         "divergence (kl_mean over review.kl_threshold), regex, json_schema.", w=8)
    d.ts("Decisions", [(f"sum by (decision) (increase(modegpt_review_decisions_total[{RATE}]))", "{{decision}}")],
         "short", w=8)
    return d.build()


def performance_dashboard() -> dict:
    d = Board("modegpt-performance", "modegpt / performance side by side",
              "Throughput and latency of the original and the compressed model, from the vLLM-named engine "
              "metrics, one series per model_name.", model_var=True)
    d.row("Throughput")
    d.ts("Generation tokens/s",
         [(f"sum by (model_name) (rate(vllm:generation_tokens_total{{{MODEL}}}[{RATE}]))", "{{model_name}}")],
         "none")
    d.ts("Prompt tokens/s",
         [(f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{MODEL}}}[{RATE}]))", "{{model_name}}")], "none")
    d.row("Latency")
    d.ts("Time to first token", _quantiles("vllm:time_to_first_token_seconds", by="model_name",
                                           legend_prefix="{{model_name}} "), "s", w=8)
    d.ts("Inter-token latency", _quantiles("vllm:inter_token_latency_seconds", by="model_name",
                                           legend_prefix="{{model_name}} "), "s", w=8)
    d.ts("End-to-end request latency", _quantiles("vllm:e2e_request_latency_seconds", by="model_name",
                                                  legend_prefix="{{model_name}} "), "s", w=8)
    d.ts("p90 e2e latency ratio, compressed / original", [(latency_ratio(RATE), "ratio")], "none",
         f"Rollout threshold {MAX_LATENCY_RATIO:g}.", w=24, h=6)
    d.row("Engine state")
    d.ts("KV-cache usage", [(f"max by (model_name) (vllm:kv_cache_usage_perc{{{MODEL}}})", "{{model_name}}")],
         "percentunit", max_val=1, w=8)
    d.ts("Requests running / waiting",
         [(f"sum by (model_name) (vllm:num_requests_running{{{MODEL}}})", "{{model_name}} running"),
          (f"sum by (model_name) (vllm:num_requests_waiting{{{MODEL}}})", "{{model_name}} waiting")], "short", w=8)
    d.ts("Preemptions/s",
         [(f"sum by (model_name) (rate(vllm:num_preemptions_total{{{MODEL}}}[{RATE}]))", "{{model_name}}")], "ops",
         w=8)
    return d.build()


DASHBOARDS = {"modegpt-canary.json": canary_dashboard, "modegpt-drift.json": drift_dashboard,
              "modegpt-performance.json": performance_dashboard}


# -- reading generated dashboards back (tests) -----------------------------------------------------


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus target of every panel (rows included)."""
    out = []

    def walk(panels):
        for p in panels or []:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels"))

    walk(dashboard.get("panels"))
    return out


def substitute(expr: str, rate_interval: str = "30s", model_name: str = ".*") -> str:
    """A dashboard expression as plain PromQL: Grafana's variables replaced."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$model_name", model_name)
    left = re.findall(r"\$\w+", out)
    if left:
        raise ValueError(f"unsubstituted variables {left} in {expr!r}")
    return out


# -- files -----------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)

HEADER = "# GENERATED by grafana/build.py -- edit that file, then run: python grafana/build.py\n"


def _yaml(doc: dict) -> str:
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


def rendered(with_dashboards: bool = True) -> dict[Path, str]:
    files = {ALERTS_FILE: _yaml(alerts_doc()), ANALYSIS_FILE: _yaml(analysis_doc()),
             RULE_FILE: _yaml(prometheus_rule_doc())}
    if with_dashboards:
        for name, fn in DASHBOARDS.items():
            files[DASHBOARD_DIR / name] = json.dumps(fn(), indent=2, sort_keys=True) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        if args.check:
            stale.append(path)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       str(path), "generated", n=1))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run python grafana/build.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
