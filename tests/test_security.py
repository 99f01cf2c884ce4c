"""Security guarantees, each against the real thing: API keys on ``/v1/*`` (open health and metrics),
admin keys on the admin and review APIs, CORS off by default, model ids that never reach the file
system, checkpoints that are never unpickled and refused when tampered with, and keys that never show
up in logs, metrics or responses.

Servers are the real app under uvicorn on loopback over real tiny engines (``server.api.testing``).
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import pickle
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_api_cli import checkpoints, start_serve, wait_health  # noqa: F401 (fixture)

from compressor.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from compressor.loading import load_modegpt
from compressor.sources import PRESETS
from server.api import auth
from server.api.app import build_app
from server.api.registry import ModelRegistry, ServedModel
from server.api.testing import ServerThread, TinyStack
from server.canary.canary import Canary
from server.canary.config import CanaryConfig
from server.canary.review import ReviewQueue

API_KEYS = ["sk-api-key-one-7f3a9c", "sk-api-key-two-b41e06"]
ADMIN = "admin-key-5d2c8e19"
CRITICAL = "critical-key-0a6b7f"
ORIGIN = "https://app.example"
ALL_SECRETS = API_KEYS + [ADMIN, CRITICAL]
BODY = {"model": "tiny-pub", "prompt": "hello", "max_tokens": 3, "temperature": 0}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["param"] == param
    return err


def raw_status(port: int, request_line: str, headers: dict | None = None) -> tuple[int, bytes]:
    """Send a request line as is (httpx would normalise ``..`` segments); the status and the body."""
    head = request_line + "\r\nhost: x\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((head + "\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


class SecureStack:
    """TinyStack's engines behind a second app with every guard on: API keys, admin keys, a canary on
    ``tiny-pub`` (half the traffic to ``tiny-script``, every answer compared, unless ``canary`` says
    otherwise), a review queue, CORS for one origin; ``limits``: the app's request limits."""

    def __init__(self, tiny: TinyStack, review_db: Path, limits=None, **canary):
        self.registry = ModelRegistry()
        o = self.registry.add(ServedModel("tiny-random", tiny.random_engine))
        c = self.registry.add(ServedModel("tiny-script", tiny.script_engine, parent=o.name))
        self.registry.add_alias("tiny-pub", o.name)
        self.config = CanaryConfig.from_dict({
            "public_name": "tiny-pub", "weight": 0.5, "shadow_fraction": 1.0, "score_fraction": 1.0, "seed": 3,
            "admin_keys": [ADMIN], "critical": {"api_keys": [CRITICAL]}, "review": {"kl_threshold": 0.0},
            **canary})
        self.review = ReviewQueue(review_db)
        self.app = build_app(self.registry, admin_keys=self.config.admin_keys, review_queue=self.review,
                             api_keys=API_KEYS, cors_origins=[ORIGIN], limits=limits)
        self.canary = Canary(self.config, o, c, metrics=self.app.state.canary_metrics, review_queue=self.review)
        self.registry.set_canary(self.canary)
        self.registry.mark_ready()
        self.server = ServerThread(self.app).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.canary.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def tiny(stack):
    return stack


@pytest.fixture(scope="module")
def secure(tiny, tmp_path_factory):
    s = SecureStack(tiny, tmp_path_factory.mktemp("review") / "review.sqlite3")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------- API keys


@pytest.mark.parametrize("headers", [
    {}, bearer("wrong"), bearer(API_KEYS[0][:-1]), bearer(API_KEYS[0] + "x"), bearer(ADMIN),
    {"authorization": f"Basic {API_KEYS[0]}"}, {"authorization": API_KEYS[0]}, {"authorization": "Bearer"},
    {"x-api-key": API_KEYS[0]},
])
def test_v1_needs_an_api_key(secure, headers):
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/nothing")):
        r = secure.http.request(method, path, json=BODY, headers=headers)
        err = assert_openai_error(r, 401)
        assert err["type"] == "AuthenticationError" and r.headers["www-authenticate"] == "Bearer"


def test_every_configured_api_key_works(secure):
    for key in API_KEYS:
        r = secure.http.post("/v1/completions", json=BODY, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert secure.http.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200
    client = openai.OpenAI(base_url=f"{secure.server.url}/v1", api_key=API_KEYS[1], max_retries=0)
    assert client.completions.create(**BODY).usage.completion_tokens == 3
    bad = openai.OpenAI(base_url=f"{secure.server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_health_metrics_dashboard_and_schema_stay_open(secure):
    for path in ("/health", "/metrics", "/dashboard", "/dashboard/data", "/openapi.json"):
        assert secure.http.get(path).status_code == 200, path
    assert secure.http.get("/docs").status_code == 404 and secure.http.get("/redoc").status_code == 404


def test_admin_and_review_apis_need_the_admin_key_not_an_api_key(secure):
    for method, path in (("GET", "/admin/canary"), ("POST", "/admin/canary/pause"), ("GET", "/v1/review/items"),
                         ("GET", "/v1/review/items/1")):
        for headers in ({}, bearer(API_KEYS[0]), bearer("wrong")):
            assert_openai_error(secure.http.request(method, path, headers=headers), 401)
    assert secure.http.get("/admin/canary", headers=bearer(ADMIN)).status_code == 200
    assert secure.http.get("/v1/review/items", headers=bearer(ADMIN)).status_code == 200


@pytest.mark.parametrize("path", [
    "/v1/review/../completions", "/v1/review/%2e%2e/completions", "/v1/review/..%2Fmodels",
    "/v1/review/items/../../models", "//v1/models", "/v1//models", "/V1/models", "/v1/models/",
])
def test_api_key_cannot_be_skipped_by_path_tricks(secure, path):
    for method in ("GET", "POST"):
        status, body = raw_status(secure.server.port, f"{method} {path} HTTP/1.1")
        assert status in (401, 404, 405), (path, status, body)
        assert b'"object":"list"' not in body and b"text_completion" not in body


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    keys = [k.encode() for k in API_KEYS + [ADMIN]]
    assert auth.bearer_ok(f"Bearer {API_KEYS[0]}", keys)  # the first key matches: no early exit
    assert [b for _, b in calls] == keys and all(a == API_KEYS[0].encode() for a, _ in calls)
    calls.clear()
    assert not auth.bearer_ok("Bearer nope", keys) and len(calls) == len(keys)


def test_api_keys_from_flags_and_environment(monkeypatch):
    from server.cli import add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--api-key", "a,b", "--api-key", " c ", "--cors-origin", ORIGIN, "--max-body-bytes", "1000",
                         "--max-generation-tokens", "99"])
    monkeypatch.setenv(auth.API_KEY_ENV, "d, e,")
    assert auth.split_keys(args.api_key, auth.API_KEY_ENV) == ["a", "b", "c", "d", "e"]
    assert args.cors_origin == [ORIGIN] and args.max_body_bytes == 1000 and args.max_generation_tokens == 99
    monkeypatch.delenv(auth.API_KEY_ENV)
    defaults = p.parse_args([])
    assert auth.split_keys(defaults.api_key, auth.API_KEY_ENV) == [] and defaults.cors_origin is None


# ---------------------------------------------------------------------------------------- CORS


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/v1/completions", headers={"origin": origin, "access-control-request-method": "POST",
                                                      "access-control-request-headers": "authorization,content-type"})


def test_cors_is_off_by_default(tiny):
    with httpx.Client(base_url=tiny.url, timeout=30) as c:
        r = preflight(c, ORIGIN)
        assert r.status_code == 405  # no CORS middleware: OPTIONS is just a method the route lacks
        assert not [h for h in r.headers if h.startswith("access-control-")]
        r = c.get("/v1/models", headers={"origin": ORIGIN})
        assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]


def test_cors_origin_flag_allows_that_origin_only(secure):
    r = preflight(secure.http, ORIGIN)  # no API key on a preflight: browsers never send one
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers
    r = secure.http.post("/v1/completions", json=BODY, headers={"origin": ORIGIN, **bearer(API_KEYS[0])})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-modegpt-variant" in r.headers["access-control-expose-headers"]
    other = preflight(secure.http, "https://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = secure.http.get("/v1/models", headers={"origin": "https://evil.example", **bearer(API_KEYS[0])})
    assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------------------- model ids


class FileWatch:
    """Every file-system audit event (``open``, ``os.listdir`` ...) raised while ``watching`` is set.
    An audit hook cannot be removed, so one is installed per process and switched on and off."""

    _events: list[tuple[str, tuple]] = []
    _on = threading.Event()
    _installed = False
    KINDS = ("open", "os.listdir", "os.scandir", "os.chdir", "os.remove", "os.rename", "os.mkdir",
             "shutil.", "glob.glob", "pathlib.")

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            def hook(event: str, args: tuple) -> None:
                if cls._on.is_set() and event.startswith(cls.KINDS):
                    cls._events.append((event, args))
            sys.addaudithook(hook)
            cls._installed = True

    def __enter__(self) -> list:
        self.install()
        self._events.clear()
        self._on.set()
        return self._events

    def __exit__(self, *exc) -> None:
        self._on.clear()


HOSTILE_MODEL_IDS = [
    "../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "file:///etc/passwd", "~/.ssh/id_rsa",
    "%2e%2e%2fetc%2fpasswd", "tiny/../tiny", "./tiny", "tiny\x00", "/proc/self/environ", "C:\\boot.ini",
    "random:tiny-opt", "smollm2-135m", "tiny-pub/../../etc/passwd", str(Path(__file__).resolve()),
]


def test_model_ids_never_reach_the_filesystem(tiny):
    with httpx.Client(base_url=tiny.url, timeout=30) as c:
        c.get("/v1/models")  # warm up: nothing lazily opened later is blamed on the requests below
        with FileWatch() as events:
            for model in HOSTILE_MODEL_IDS:
                for stream in (False, True):
                    r = c.post("/v1/completions", json={"model": model, "prompt": "hi", "stream": stream})
                    err = assert_openai_error(r, 404, "model")
                    assert err["type"] == "NotFoundError"
        assert events == []
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-random", "tiny-script", "tiny"]


def test_review_ids_never_reach_the_filesystem(secure):
    secure.http.get("/v1/review/items/1", headers=bearer(ADMIN))
    with FileWatch() as events:
        for raw in ("...", "1%20OR%201=1", "-1", "1e3", "0x1", "etc%00passwd", "~root"):
            r = secure.http.get(f"/v1/review/items/{raw}", headers=bearer(ADMIN))
            assert_openai_error(r, 404, "id")
        # decoded to a path with a `..` segment: no longer exempt from the API key, and no route anyway
        for raw in ("..", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
            status, body = raw_status(secure.server.port, f"GET /v1/review/items/{raw} HTTP/1.1", bearer(ADMIN))
            assert status in (401, 404) and b"root:" not in body
    assert events == []


def test_review_ids_and_offsets_past_sqlite_integers_are_4xx(secure):
    """Found by schemathesis: a 30-digit id reached SQLite and answered 500."""
    for raw in ("9" * 30, str(2**63), "-" + "9" * 30):
        for method, path in (("GET", f"/v1/review/items/{raw}"), ("POST", f"/v1/review/items/{raw}/approve")):
            r = secure.http.request(method, path, headers=bearer(ADMIN), json={"reviewer": "alice"})
            assert_openai_error(r, 404, "id")
    r = secure.http.get(f"/v1/review/items?offset={2**63}", headers=bearer(ADMIN))
    assert_openai_error(r, 400, "offset")
    assert secure.http.get(f"/v1/review/items?offset={2**63 - 1}", headers=bearer(ADMIN)).json()["data"] == []


# ---------------------------------------------------------------------------------------- checkpoints


class Boom:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    m = load_modegpt("random:tiny-opt")
    out = write_checkpoint(tmp_path / "ckpt", m.config, m.state_dict, None, {"test": True})
    read_checkpoint(out)
    return out


def test_the_pickle_payload_is_live(tmp_path):
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(Boom(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.pkl", "x.pickle",
                                  "last.ckpt"])
def test_a_pickle_file_in_a_checkpoint_is_refused_and_never_loaded(checkpoint, tmp_path, name):
    marker = tmp_path / "unpickled"
    (checkpoint / name).write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(CheckpointError, match=f"pickled weights.*{name}"):
        read_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_modegpt(str(checkpoint))
    assert not marker.exists()


def test_a_model_directory_with_only_pickled_weights_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PRESETS["tiny-llama-gqa"]))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom(marker)}))
    with pytest.raises(FileNotFoundError, match="pickled weights are refused"):
        load_modegpt(str(d))
    assert not marker.exists()


def _rewrite_manifest(ckpt: Path, fn) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    fn(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,match", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]), "sha256"),
    (lambda c: (c / "config.json").write_text((c / "config.json").read_text().replace("64", "65", 1)), "sha256"),
    (lambda c: (c / "compression_report.json").write_text("{}"), "sha256"),
    (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    (lambda c: (c / "manifest.json").write_text("{not json"), "not a valid manifest"),
    (lambda c: (c / "manifest.json").write_text('{"files": []}'), "not a valid manifest"),
    (lambda c: (c / "config.json").unlink(), "no config.json"),
    (lambda c: (c / "extra.safetensors").write_bytes((c / "model.safetensors").read_bytes()), "not in the manifest"),
    (lambda c: _rewrite_manifest(c, lambda m: m["files"].pop("config.json")), "not in the manifest"),
    (lambda c: _rewrite_manifest(c, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}})),
     "not a file of the checkpoint"),
])
def test_a_tampered_or_partial_checkpoint_is_refused(checkpoint, damage, match):
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(checkpoint)


# ---------------------------------------------------------------------------------------- secrets


def wait_shadow(canary, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while canary.shadow.outstanding:
        assert time.monotonic() < deadline, "shadow worker did not drain"
        time.sleep(0.02)


def test_keys_never_appear_in_logs_metrics_or_responses(secure, caplog):
    """Every kind of call with every kind of key (right and wrong, in every header it may travel in),
    at DEBUG on every server-side logger including uvicorn's access log."""
    server_side = ("server", "compressor", "uvicorn", "fastapi", "starlette", "modegpt", "root")
    access = logging.getLogger("uvicorn.access")
    saved = access.level
    access.setLevel(logging.DEBUG)
    access.addHandler(caplog.handler)
    bodies = []
    try:
        with caplog.at_level(logging.DEBUG):
            h = secure.http
            for key in API_KEYS:
                for extra in ({}, {"x-modegpt-critical": "true"}, {"x-canary-key": "user-1"}):
                    r = h.post("/v1/completions", json=BODY, headers={**bearer(key), **extra})
                    bodies.append(r.text)
                    assert r.status_code == 200
                r = h.post("/v1/completions", json={**BODY, "stream": True}, headers=bearer(key))
                bodies.append(r.text)
            for key in ALL_SECRETS + [a + "-wrong" for a in ALL_SECRETS]:
                for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/admin/canary"),
                                     ("POST", "/admin/canary/pause"), ("GET", "/v1/review/items"),
                                     ("GET", "/v1/review/items/999")):
                    r = h.request(method, path, json=BODY, headers=bearer(key))
                    bodies.append(r.text)
            # a secret sent where routing keys go (hashed for the sticky split, never kept)
            r = h.post("/v1/completions", json={**BODY, "user": "u"}, headers={**bearer(API_KEYS[0]),
                                                                              "x-canary-key": CRITICAL})
            bodies.append(r.text)
            wait_shadow(secure.canary)
            items = h.get("/v1/review/items?status=all", headers=bearer(ADMIN)).json()
            bodies.append(json.dumps(items))
            assert items["data"], "the canary's comparisons should have queued review items"
            r = h.post(f"/v1/review/items/{items['data'][0]['id']}/approve", headers=bearer(ADMIN),
                       json={"reviewer": "alice", "note": "ok"})
            assert r.status_code == 200, r.text
            for path in ("/admin/canary/resume", "/admin/canary/pause"):
                bodies.append(h.post(path, headers=bearer(ADMIN)).text)
            bodies += [h.get(p).text for p in ("/metrics", "/dashboard/data", "/openapi.json", "/health")]
            logging.getLogger("modegpt.test").info("config %r %s", secure.config, secure.config.to_dict())
    finally:
        access.removeHandler(caplog.handler)
        access.setLevel(saved)
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                       if r.name.split(".")[0] in server_side)
    assert "HTTP/1.1" in logged  # the access log was captured
    for secret in ALL_SECRETS:
        assert secret not in logged
        for b in bodies:
            assert secret not in b


# ---------------------------------------------------------------------------------------- as deployed


def test_serve_flags_and_environment_reach_the_server(checkpoints, monkeypatch):
    """``modegpt serve`` with ``--api-key`` and ``$MODEGPT_API_KEY``, an admin key, CORS and a body limit;
    its whole output at DEBUG (uvicorn's access log included) never shows a key."""
    orig, comp = checkpoints
    monkeypatch.setenv(auth.API_KEY_ENV, API_KEYS[1])
    monkeypatch.setenv("MODEGPT_ADMIN_KEY", ADMIN)
    srv = start_serve("--original", str(orig), "--compressed", str(comp), "--name", "pub", "--log-level", "debug",
                      "--api-key", API_KEYS[0], "--cors-origin", ORIGIN, "--max-body-bytes", "2048")
    try:
        wait_health(srv.url, 200)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert_openai_error(c.get("/v1/models"), 401)
            for key in API_KEYS:
                r = c.post("/v1/completions", json={"model": "pub", "prompt": "hello", "max_tokens": 2},
                           headers={**bearer(key), "origin": ORIGIN})
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN, r.text
            r = c.post("/v1/completions", json={"model": "pub", "prompt": "x" * 3000}, headers=bearer(API_KEYS[0]))
            assert_openai_error(r, 413, "body")
            assert c.get("/admin/canary", headers=bearer(ADMIN)).status_code == 200
            assert_openai_error(c.get("/admin/canary", headers=bearer(API_KEYS[0])), 401)
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    assert "GET /v1/models HTTP/1.1" in srv.output  # the access log is in the output
    for secret in (*API_KEYS, ADMIN):
        assert secret not in srv.output and secret not in metrics


def test_serve_refuses_a_tampered_checkpoint_with_a_clear_error(checkpoints, tmp_path):
    """What ``modegpt serve --compressed TAMPERED`` does (its loader, in process): nothing is served and
    ``/health`` says why."""
    from server.cli import add_serve_arguments, load_engines

    orig, comp = checkpoints
    bad = tmp_path / "tampered"
    bad.mkdir()
    for f in comp.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (bad / "model.safetensors").write_bytes(bytes(data))
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--original", str(orig), "--compressed", str(bad), "--device", "cpu", "--kv-cache-gb", "0.01"])
    registry = ModelRegistry()
    load_engines(args, registry)
    assert registry.served() == [] and not registry.ready
    srv = ServerThread(build_app(registry)).start()
    try:
        err = assert_openai_error(httpx.get(f"{srv.url}/health", timeout=30), 503)
        assert "CheckpointError" in err["message"] and "sha256" in err["message"] and "tampered" in err["message"]
    finally:
        srv.stop()
