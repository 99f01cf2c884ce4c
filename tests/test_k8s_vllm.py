"""``deploy/k8s-vllm/``: the manifests parse, reference each other consistently, and the router's
command line is one that ``modegpt serve`` accepts and that points at the vLLM Services' model names."""
from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.canary.config import CanaryConfig
from server.cli import add_serve_arguments
from server.remote.backend import RemoteSpec

DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s-vllm"


def load(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DIR / name).read_text()) if d is not None]
    for d in docs:
        assert {"apiVersion", "kind"} <= d.keys(), (name, d)
        assert d["kind"] == "Kustomization" or d["metadata"]["name"], (name, d)
    return docs


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(DIR.glob("*.yaml")):
        if f.name in ("kustomization.yaml", "secrets.example.yaml"):
            continue
        for d in load(f.name):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_every_manifest_parses_and_the_kustomization_lists_them():
    kust = load("kustomization.yaml")[0]
    assert kust["kind"] == "Kustomization"
    for f in kust["resources"]:
        assert (DIR / f).is_file(), f
    assert set(kust["resources"]) == {"models-pvc.yaml", "vllm.yaml", "router.yaml", "servicemonitor.yaml"}
    secrets = {d["metadata"]["name"] for d in load("secrets.example.yaml")}
    assert secrets == {"modegpt-admin", "modegpt-backend-key"}
    objs = objects()
    for (kind, name), d in objs.items():
        if kind == "Deployment":  # selectors match the pod labels
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in c.get("env", []):  # every secret referenced is one of the documented two
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, (name, ref)


def test_two_vllm_deployments_on_their_own_gpus_with_services():
    objs = objects()
    names = {}
    for variant in ("original", "compressed"):
        dep = objs[("Deployment", f"vllm-{variant}")]
        c = container(dep)
        assert c["image"] == "modegpt-vllm:latest" and int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert c["args"][0] == f"/models/{variant}"
        assert int(arg_after(c["args"], "--max-logprobs")) >= 20
        names[variant] = arg_after(c["args"], "--served-model-name")
        svc = objs[("Service", f"vllm-{variant}")]
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        port_names = {p["name"] for p in c["ports"]}
        assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health" and probe["port"] in port_names
    assert names["original"] != names["compressed"]
    dockerfile = (DIR / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --no-deps /opt/modegpt" in dockerfile and "vllm/vllm-openai" in dockerfile
    job = objs[("Job", "modegpt-compress")]
    cmd = " ".join(container(job)["args"])
    assert "modegpt compress /models/original" in cmd and "--out /models/compressed" in cmd


def test_the_router_points_at_the_vllm_services_with_a_valid_command_line():
    objs = objects()
    router = container(objs[("Deployment", "modegpt-router")])
    args = router["args"]
    assert args[:2] == ["modegpt", "serve"]
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    parsed = p.parse_args(args[2:])  # the real CLI accepts every flag
    assert "nvidia.com/gpu" not in str(router["resources"])
    for variant, url in (("original", parsed.original), ("compressed", parsed.compressed)):
        spec = RemoteSpec.parse(url)
        host, port = spec.base_url.split("://")[1].split("/")[0].split(":")
        svc = objs[("Service", host)]
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]] and spec.base_url.endswith("/v1")
        served = arg_after(container(objs[("Deployment", host)])["args"], "--served-model-name")
        assert host == f"vllm-{variant}" and spec.model_id == served
    assert parsed.remote_score_logprobs <= 20
    env = {e["name"] for e in router["env"]}
    assert {"MODEGPT_ADMIN_KEY", "MODEGPT_REMOTE_API_KEY"} <= env
    cm = objs[("ConfigMap", "modegpt-router-canary")]
    cfg = CanaryConfig.from_dict(yaml.safe_load(cm["data"]["canary.yaml"]))
    assert cfg.public_name == parsed.name
    mounts = {v["name"]: v for v in objs[("Deployment", "modegpt-router")]["spec"]["template"]["spec"]["volumes"]}
    assert mounts["canary-config"]["configMap"]["name"] == "modegpt-router-canary"
    assert (objs[("PersistentVolumeClaim", mounts["state"]["persistentVolumeClaim"]["claimName"])]["kind"]
            == "PersistentVolumeClaim")
    assert cfg.review_db.startswith("/var/lib/modegpt/")


def test_prometheus_scrapes_the_router_and_both_vllm_servers():
    objs = objects()
    (sm,) = [d for (kind, _), d in objs.items() if kind == "ServiceMonitor"]
    sel = sm["spec"]["selector"]["matchLabels"]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["interval"] == "5s"
    scraped = {name for (kind, name), d in objs.items()
               if kind == "Service" and sel.items() <= d["metadata"]["labels"].items()}
    assert scraped == {"modegpt-router", "vllm-original", "vllm-compressed"}
    for name in scraped:
        assert ep["port"] in [p["name"] for p in objs[("Service", name)]["spec"]["ports"]]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_directory():
    out = subprocess.run(["kubectl", "kustomize", str(DIR)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d}
    assert built == set(objects()) - {("Job", "modegpt-compress")}
