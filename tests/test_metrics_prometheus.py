"""The modegpt_* metrics, the alert rules and the dashboards' PromQL against a REAL Prometheus.

promtool and prometheus come from Debian's ``prometheus`` package
(``apt-get install -y --no-install-recommends prometheus``); without them those tests skip.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from server.canary.metrics import (
    REVIEW_DECISIONS,
    REVIEW_TRIGGERS,
    ROLLBACK_REASONS,
    ROLLOUT_STATES,
    ROUTE_REASONS,
    SHADOW_RESULTS,
    CanaryMetrics,
)

REPO = Path(__file__).resolve().parents[1]
APT_HINT = "apt-get update && apt-get install -y --no-install-recommends prometheus"


def _load_build():
    if "modegpt_grafana_build" in sys.modules:
        return sys.modules["modegpt_grafana_build"]
    spec = importlib.util.spec_from_file_location("modegpt_grafana_build", REPO / "grafana" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


def _needs(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed ({APT_HINT})")
    return path


# -- the metric family -----------------------------------------------------------------------------


def test_canary_metrics_family():
    reg = CollectorRegistry()
    m = CanaryMetrics(reg)
    text = generate_latest(reg).decode()
    for name in ("modegpt_canary_weight", "modegpt_rollout_state", "modegpt_rollout_step", "modegpt_requests_total",
                 "modegpt_shadow_runs_total", "modegpt_comparisons_total", "modegpt_exact_match_total",
                 "modegpt_rollbacks_total", "modegpt_review_queue_depth", "modegpt_review_items_total",
                 "modegpt_review_decisions_total", "modegpt_divergence_kl_mean_bucket",
                 "modegpt_divergence_kl_max_bucket", "modegpt_top1_agreement_bucket", "modegpt_logprob_gap_bucket",
                 "modegpt_first_divergence_position_bucket"):
        assert f"\n{name}" in text, name
    for hist in ("modegpt_divergence_kl_mean", "modegpt_divergence_kl_max", "modegpt_top1_agreement",
                 "modegpt_logprob_gap", "modegpt_first_divergence_position"):
        help_line = next(line for line in text.splitlines() if line.startswith(f"# HELP {hist} "))
        assert "in process from the full next-token distributions" in help_line, help_line
    # every bounded label value exists at zero from the start; state idle
    g = reg.get_sample_value
    assert all(g("modegpt_requests_total", {"variant": v, "reason": r}) == 0
               for v in ("original", "compressed") for r in ROUTE_REASONS)
    assert all(g("modegpt_shadow_runs_total", {"result": r}) == 0 for r in SHADOW_RESULTS)
    assert all(g("modegpt_rollbacks_total", {"reason": r}) == 0 for r in ROLLBACK_REASONS)
    assert all(g("modegpt_review_items_total", {"trigger": t}) == 0 for t in REVIEW_TRIGGERS)
    assert all(g("modegpt_review_decisions_total", {"decision": d}) == 0 for d in REVIEW_DECISIONS)
    assert g("modegpt_rollout_state", {"state": "idle"}) == 1 and g("modegpt_rollout_step") == -1

    m.set_rollout("progressing", 2)
    assert [g("modegpt_rollout_state", {"state": s}) for s in ROLLOUT_STATES] == [0, 1, 0, 0, 0]
    assert g("modegpt_rollout_step") == 2
    m.set_weight(0.25)
    m.count_request("compressed", "weight")
    m.count_shadow("dropped")
    m.count_rollback("kl")
    m.count_review_item("json_schema")
    m.count_decision("approved")
    m.set_queue_depth(7)
    m.set_variant_models("orig", "comp")
    m.set_variant_models("orig2", "comp2")  # replaces, never accumulates
    assert g("modegpt_variant_info", {"variant": "compressed", "model_name": "comp2"}) == 1
    assert g("modegpt_variant_info", {"variant": "compressed", "model_name": "comp"}) is None
    m.observe_comparison(0.02, 0.9, 0.95, -0.01, 3, False)
    m.observe_comparison(0.0, 0.0, 1.0, 0.0, None, True)
    m.observe_comparison(float("nan"), float("nan"), float("nan"), float("nan"), None, False)
    assert g("modegpt_canary_weight") == 0.25
    assert g("modegpt_requests_total", {"variant": "compressed", "reason": "weight"}) == 1
    assert g("modegpt_comparisons_total") == 3 and g("modegpt_exact_match_total") == 1
    assert g("modegpt_divergence_kl_mean_count") == 2  # NaN skipped
    assert g("modegpt_first_divergence_position_count") == 1
    assert g("modegpt_first_divergence_position_bucket", {"le": "4.0"}) == 1
    assert g("modegpt_logprob_gap_bucket", {"le": "0.0"}) == 2  # signed buckets
    assert g("modegpt_review_queue_depth") == 7
    for bad in (lambda: m.count_request("other", "weight"), lambda: m.count_request("original", "user-123"),
                lambda: m.set_rollout("exploding"), lambda: m.count_rollback("x"), lambda: m.count_shadow("x"),
                lambda: m.count_review_item("x"), lambda: m.count_decision("approve")):
        with pytest.raises(ValueError):
            bad()


# -- generated files, promtool ---------------------------------------------------------------------


def test_generated_files_are_up_to_date():
    try:
        import grafana_foundation_sdk  # noqa: F401
        with_dashboards = True
    except ImportError:
        with_dashboards = False  # alerts and analysis still checked; dashboards need the `ops` extra
    for path, text in build.rendered(with_dashboards=with_dashboards).items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run python grafana/build.py"
    # the Argo analysis reads exactly the alerts' queries
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    analysis = yaml.safe_load((REPO / "deploy/k8s/analysis-template.yaml").read_text())["spec"]["metrics"]
    assert len(alerts) == len(analysis) == len(build.ALERTS) >= 4
    for rule, metric, a in zip(alerts, analysis, build.ALERTS):
        q = metric["provider"]["prometheus"]["query"]
        assert rule["expr"] == a.expr() and rule["expr"].startswith(q + " ")
    rule = yaml.safe_load((REPO / "deploy/k8s/prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"][0]["rules"] == alerts


def test_deploy_files_parse_and_agree():
    from server.canary.config import CanaryConfig

    kinds = []
    for f in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        kinds += [d["kind"] for d in yaml.safe_load_all(f.read_text()) if d]
    assert {"Deployment", "Service", "ServiceMonitor", "ConfigMap", "AnalysisTemplate", "PrometheusRule"} <= set(kinds)
    cm = yaml.safe_load((REPO / "deploy/k8s/configmap.yaml").read_text())
    assert yaml.safe_load(cm["data"]["canary.yaml"]) == yaml.safe_load((REPO / "deploy/canary.yaml").read_text())
    cfg = CanaryConfig.from_yaml(REPO / "deploy/canary.yaml")
    t = cfg.rollout.thresholds
    assert (t.max_kl_mean, t.min_top1_agreement, t.max_error_rate, t.max_latency_ratio) == (
        build.MAX_KL_MEAN, build.MIN_TOP1_AGREEMENT, build.MAX_ERROR_RATE, build.MAX_LATENCY_RATIO)
    compose = yaml.safe_load((REPO / "deploy/docker-compose.yml").read_text())
    assert {"modegpt", "prometheus", "grafana"} <= set(compose["services"])
    for prov in ("datasources/prometheus.yaml", "dashboards/modegpt.yaml"):
        assert yaml.safe_load((REPO / "grafana/provisioning" / prov).read_text())["apiVersion"] == 1


def test_promtool_check_rules_and_config():
    promtool = _needs("promtool")
    for args in (["check", "rules", "deploy/prometheus/alerts.yml"],
                 ["check", "config", "deploy/prometheus/prometheus.yml"]):
        r = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


# -- a real Prometheus scraping a real server ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for f in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        for title, expr in build.panel_queries(json.loads(f.read_text())):
            out.append((f"{f.stem}: {title}", build.substitute(expr, rate_interval="30s", model_name=".*")))
    return out


def _complete(url: str, model: str, n: int) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            r = c.post("/v1/completions", json={"model": model, "prompt": f"hello {i}", "max_tokens": 4,
                                                "temperature": 0})
            assert r.status_code == 200, r.text


def _feed(m: CanaryMetrics, k: int) -> None:
    for i in range(k):
        m.count_request("compressed" if i % 3 == 0 else "original", "weight" if i % 2 else "sticky")
        m.count_shadow("ok")
        m.observe_comparison(0.01 * (i + 1), 0.2 * (i + 1), 0.9 - 0.01 * i, 0.02 * i, i + 1, i % 4 == 0)


def test_real_prometheus_returns_data_for_every_query(tmp_path):
    prom_bin = _needs("prometheus")
    from server.api.testing import TinyStack
    from server.canary.review import ReviewQueue, ReviewRules
    from server.canary.review_api import build_review_router

    stack = TinyStack(variants={"tiny-random": "original", "tiny-script": "compressed"})
    proc = None
    queue = None
    try:
        app = stack.app
        metrics = getattr(app.state, "canary_metrics", None)
        if not isinstance(metrics, CanaryMetrics):  # before the canary integration: register ours
            metrics = CanaryMetrics(app.state.metrics.registry)
        metrics.set_variant_models("tiny-random", "tiny-script")
        # the remote-variant family (server/remote), as `modegpt serve` registers it for URL variants: here
        # the compressed "backend" is in service again after one ejection
        from server.remote.metrics import RemoteMetrics

        remote = RemoteMetrics(metrics.registry)
        remote.up.labels("compressed", "tiny-script").set(1)
        remote.ejections.labels("compressed").inc()
        queue = ReviewQueue(tmp_path / "review.sqlite3")
        app.include_router(build_review_router(queue, metrics, ["k"]))
        rules = ReviewRules(kl_threshold=0.05, regex=r"\.$")

        # a first batch before Prometheus starts, so rates over the next scrapes are > 0
        _complete(stack.url, "tiny-random", 2)
        _complete(stack.url, "tiny-script", 2)
        _feed(metrics, 3)

        # Prometheus: 1 s scrapes of the server, the deploy alert rules evaluated every second on [30s]
        rules_doc = build.alerts_doc("30s")
        rules_doc["groups"][0]["interval"] = "1s"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules_doc, sort_keys=False))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "alerts.yml")],
            "scrape_configs": [{"job_name": "modegpt", "metrics_path": "/metrics", "scrape_interval": "1s",
                                "scrape_timeout": "900ms",
                                "static_configs": [{"targets": [f"127.0.0.1:{stack.server.port}"]}]}],
        }))
        port = _free_port()
        proc = subprocess.Popen(
            [prom_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        prom = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

        def query(expr: str) -> list:
            r = prom.get("/api/v1/query", params={"query": expr})
            body = r.json()
            assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
            return body["data"]["result"]

        deadline = time.monotonic() + 30
        while True:  # ready and at least two scrapes of the server
            try:
                up = query('count_over_time(up{job="modegpt"}[1m])')
                if up and float(up[0]["value"][1]) >= 2:
                    break
            except (httpx.HTTPError, ValueError, AssertionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prometheus did not start/scrape: " + (tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(0.25)

        # a second batch of everything, spread over a few scrapes
        for _ in range(2):
            _complete(stack.url, "tiny-random", 2)
            _complete(stack.url, "tiny-script", 2)
            _feed(metrics, 3)
            metrics.set_weight(0.05)
            metrics.set_rollout("progressing", 1)
            time.sleep(1.2)
        metrics.count_rollback("manual")
        metrics.count_shadow("dropped")
        remote.ejections.labels("compressed").inc()
        remote.up.labels("compressed", "tiny-script").set(0)  # ...and it is out of service now
        ids = [rules.submit(queue, request_id=f"cmpl-{i}", variant="compressed", route_reason="weight",
                            prompt="Q", original_output="A.", compressed_output="B",
                            divergence={"kl_mean": 0.5}) for i in range(3)]
        with httpx.Client(base_url=stack.url, headers={"Authorization": "Bearer k"}) as c:
            assert c.post(f"/v1/review/items/{ids[0]}/approve", json={"reviewer": "ops"}).status_code == 200
            assert c.post(f"/v1/review/items/{ids[1]}/reject", json={"reviewer": "ops"}).status_code == 200
        time.sleep(2.5)

        queries = _dashboard_queries()
        queries += [(f"alert {name}", q) for name, q in build.alert_queries("30s").items()]
        analysis = yaml.safe_load((REPO / "deploy/k8s/analysis-template.yaml").read_text())["spec"]["metrics"]
        queries += [(f"analysis {m['name']}", m["provider"]["prometheus"]["query"].replace("[5m]", "[30s]"))
                    for m in analysis]
        queries.append(("variable model_name", "vllm:num_requests_running"))
        assert len(queries) > 50
        empty = [(where, q) for where, q in queries if not query(q)]
        assert not empty, "queries without data:\n" + "\n".join(f"{w}: {q}" for w, q in empty)

        # a few values that must be right, not just present
        def value(expr: str) -> dict[str, float]:
            return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in query(expr)}

        gen = value('sum by (model_name) (rate(vllm:generation_tokens_total[30s]))')
        assert len(gen) == 2 and all(v > 0 for v in gen.values()), gen
        # every vllm:* series carries the variant label itself, too (no join needed)
        gen_v = value('sum by (model_name, variant) (rate(vllm:generation_tokens_total[30s]))')
        assert {(json.loads(k)["model_name"], json.loads(k)["variant"]) for k in gen_v} == {
            ("tiny-random", "original"), ("tiny-script", "compressed")}, gen_v
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                     "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
                     "vllm:e2e_request_latency_seconds_count"):
            assert query(f'{name}{{variant="compressed",model_name="tiny-script"}}'), name
        err = value(build.error_rate("30s", None))
        assert sorted(json.loads(k)["variant"] for k in err) == ["compressed", "original"]
        assert all(v == 0 for v in err.values()), err
        (kl_mean,) = value(build.alert_queries("30s")["ModegptDivergenceHigh"]).values()
        assert 0 < kl_mean < 0.1
        (depth,) = value("max(modegpt_review_queue_depth)").values()
        assert depth == 1
        (rolled,) = value(build.alert_queries("30s")["ModegptCanaryRolledBack"]).values()
        assert rolled > 0
        assert value('max by (state) (modegpt_rollout_state) > 0') == {'{"state": "progressing"}': 1.0}
        # every alert rule evaluates without error (e.g. no many-to-many join) and the rollback alert fires
        deadline = time.monotonic() + 10
        while True:
            groups = prom.get("/api/v1/rules").json()["data"]["groups"]
            rules_state = {r["name"]: r for g in groups for r in g["rules"]}
            if all(r.get("health") == "ok" for r in rules_state.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {n: r.get("health") for n, r in rules_state.items()} == {a.name: "ok" for a in build.ALERTS}, \
            {n: r.get("lastError") for n, r in rules_state.items()}
        assert rules_state["ModegptCanaryRolledBack"]["state"] == "firing"
        assert value(build.alert_queries("30s")["ModegptBackendEjected"]) == {"{}": 0.0}
        assert rules_state["ModegptBackendEjected"]["state"] in ("pending", "firing")  # for: 1m
        assert rules_state["ModegptCompressedErrorRate"]["state"] == "inactive"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.close()
        if queue is not None:
            queue.close()
