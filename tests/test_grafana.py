"""The generated Grafana dashboards: structure, coverage of the brief's panels, provisioning paths.
(That every query returns data from a real Prometheus: tests/test_metrics_prometheus.py.)"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _load_build():
    name = "modegpt_grafana_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "grafana" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


build = _load_build()
BOARDS = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "grafana" / "dashboards").glob("*.json"))}


def _panels(d: dict) -> list[dict]:
    return [p for p in d["panels"] if p["type"] != "row"]


def test_three_dashboards_with_unique_uids():
    assert set(BOARDS) == {"modegpt-canary", "modegpt-drift", "modegpt-performance"}
    assert len({d["uid"] for d in BOARDS.values()}) == 3
    for name, d in BOARDS.items():
        assert d["uid"] == name and d["title"].startswith("modegpt / ")
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        names = [v["name"] for v in d["templating"]["list"]]
        assert names[0] == "datasource"


def test_layout_and_datasource():
    for name, d in BOARDS.items():
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {p['title']} overlaps"
                    cells.add((x, y))
        for p in _panels(d):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["expr"] for t in p["targets"])


def test_queries_are_parametrised():
    for name, d in BOARDS.items():
        for title, expr in build.panel_queries(d):
            # every range vector uses Grafana's rate interval, so tests and dashboards can pick the range
            for rng in re.findall(r"\[([^\]]+)\]", expr):
                assert rng == "$__rate_interval", (name, title, expr)
            if "vllm:" in expr and "modegpt_variant_info" not in expr:
                assert 'model_name=~"$model_name"' in expr, (name, title, expr)
            plain = build.substitute(expr, "1m", "a|b")
            assert "$" not in plain and "[1m]" in plain or "[" not in expr


def test_brief_panels_present():
    def exprs(board: str) -> str:
        return "\n".join(e for _, e in build.panel_queries(BOARDS[board]))

    canary = exprs("modegpt-canary")
    for needle in ("modegpt_canary_weight", "modegpt_rollout_state", "modegpt_requests_total",
                   "sum by (variant, reason)", 'finished_reason="error"', "http_requests_total",
                   "modegpt_shadow_runs_total", "modegpt_rollbacks_total"):
        assert needle in canary, needle
    drift = exprs("modegpt-drift")
    for hist in ("modegpt_divergence_kl_mean", "modegpt_divergence_kl_max", "modegpt_top1_agreement",
                 "modegpt_logprob_gap", "modegpt_first_divergence_position"):
        assert f"histogram_quantile(0.5, sum by (le) (rate({hist}_bucket" in drift, hist
    for needle in ("modegpt_exact_match_total", "modegpt_review_queue_depth", "modegpt_review_decisions_total",
                   "modegpt_review_items_total"):
        assert needle in drift, needle
    perf = exprs("modegpt-performance")
    for hist in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (model_name, le) (rate({hist}_bucket" in perf, (hist, q)
    for needle in ("vllm:generation_tokens_total", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                   "vllm:num_requests_waiting"):
        assert needle in perf, needle


def test_provisioning_matches_compose_mounts():
    prov = yaml.safe_load((REPO / "grafana/provisioning/dashboards/modegpt.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((REPO / "deploy/docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{path}:ro" in mounts
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
