"""The review HTTP API: admin key, listing, decisions, OpenAI-style errors, metrics."""
from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from server.api.errors import install_error_handlers
from server.canary.metrics import CanaryMetrics
from server.canary.review import ReviewQueue
from server.canary.review_api import bearer_ok, build_review_router

KEY = "s3cret-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _item(i: int) -> dict:
    return {"request_id": f"cmpl-{i}", "variant": "compressed", "route_reason": "weight", "prompt": "Q",
            "original_output": "A", "compressed_output": "B", "divergence": {"kl_mean": 0.9},
            "triggers": ["divergence"]}


@pytest.fixture()
def setup(tmp_path):
    reg = CollectorRegistry()
    metrics = CanaryMetrics(reg)
    queue = ReviewQueue(tmp_path / "review.db")
    ids = [queue.add(_item(i)) for i in range(3)]
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_review_router(queue, metrics, [KEY, "other-key"]))
    with TestClient(app) as client:
        yield client, queue, reg, ids
    queue.close()


def _err(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == status and body["type"] and body["message"]
    return body


def test_auth_required(setup, caplog):
    client, _, _, ids = setup
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
        r = client.get("/v1/review/items", headers=headers)
        assert _err(r, 401)["type"] == "AuthenticationError"
        assert r.headers["www-authenticate"] == "Bearer"
        _err(client.post(f"/v1/review/items/{ids[0]}/approve", json={"reviewer": "x"}, headers=headers), 401)
        _err(client.get(f"/v1/review/items/{ids[0]}", headers=headers), 401)
    assert client.get("/v1/review/items", headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert client.post(f"/v1/review/items/{ids[0]}/approve", json={"reviewer": "alice"},
                       headers=AUTH).status_code == 200
    assert KEY not in caplog.text and "wrong" not in caplog.text


def test_no_keys_means_disabled(tmp_path):
    q = ReviewQueue(tmp_path / "r.db")
    app = FastAPI()
    app.include_router(build_review_router(q, None, []))
    with TestClient(app) as client:
        r = client.get("/v1/review/items", headers={"Authorization": "Bearer "})
        assert r.status_code == 401 and "no admin key" in r.json()["error"]["message"]
    assert not bearer_ok(None, [b"k"]) and bearer_ok("bearer k", [b"k"]) and not bearer_ok("Bearer k2", [b"k"])


def test_list_get_decide(setup):
    client, queue, reg, ids = setup
    r = client.get("/v1/review/items", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["status"] == "pending" and body["total"] == 3
    assert [d["id"] for d in body["data"]] == ids and body["data"][0]["divergence"] == {"kl_mean": 0.9}

    r = client.get(f"/v1/review/items/{ids[1]}", headers=AUTH)
    assert r.status_code == 200 and r.json()["request_id"] == "cmpl-1" and r.json()["status"] == "pending"

    r = client.post(f"/v1/review/items/{ids[1]}/approve", json={"reviewer": "alice", "note": "ok"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["reviewer"], r.json()["note"]) == ("approved", "alice", "ok")
    r = client.post(f"/v1/review/items/{ids[2]}/reject", json={"reviewer": "bob"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["decision"] == "rejected"

    body = _err(client.post(f"/v1/review/items/{ids[1]}/reject", json={"reviewer": "bob"}, headers=AUTH), 409)
    assert "already approved" in body["message"] and body["param"] == "id"
    _err(client.post(f"/v1/review/items/{ids[1]}/approve", json={"reviewer": "bob"}, headers=AUTH), 409)

    assert [d["id"] for d in client.get("/v1/review/items", headers=AUTH).json()["data"]] == [ids[0]]
    got = client.get("/v1/review/items?status=all&limit=2&offset=1", headers=AUTH).json()
    assert [d["id"] for d in got["data"]] == ids[1:] and got["total"] == 3
    assert client.get("/v1/review/items?status=rejected", headers=AUTH).json()["data"][0]["id"] == ids[2]
    assert queue.get(ids[1]).reviewer == "alice"
    assert reg.get_sample_value("modegpt_review_decisions_total", {"decision": "approved"}) == 1
    assert reg.get_sample_value("modegpt_review_decisions_total", {"decision": "rejected"}) == 1
    assert reg.get_sample_value("modegpt_review_queue_depth") == 1


def test_errors(setup):
    client, _, _, ids = setup
    _err(client.get("/v1/review/items/999", headers=AUTH), 404)
    _err(client.get("/v1/review/items/abc", headers=AUTH), 404)
    _err(client.post("/v1/review/items/999/approve", json={"reviewer": "a"}, headers=AUTH), 404)
    _err(client.get("/v1/review/items?status=bogus", headers=AUTH), 400)
    _err(client.get("/v1/review/items?limit=0", headers=AUTH), 400)
    _err(client.get("/v1/review/items?limit=x", headers=AUTH), 400)
    _err(client.get("/v1/review/items?offset=-1", headers=AUTH), 400)
    url = f"/v1/review/items/{ids[0]}/approve"
    assert _err(client.post(url, json={}, headers=AUTH), 400)["param"] == "reviewer"
    assert _err(client.post(url, json={"reviewer": ""}, headers=AUTH), 400)["param"] == "reviewer"
    assert _err(client.post(url, json={"reviewer": "a", "note": 3}, headers=AUTH), 400)["param"] == "note"
    assert _err(client.post(url, json={"reviewer": "a", "x": 1}, headers=AUTH), 400)["param"] == "x"
    _err(client.post(url, json=["reviewer"], headers=AUTH), 400)
    _err(client.post(url, content=b"{nope", headers={**AUTH, "content-type": "application/json"}), 400)
    _err(client.post(url, content=b'{"reviewer": "a"}', headers={**AUTH, "content-type": "text/plain"}), 400)
    # nothing above decided the item
    assert client.get(f"/v1/review/items/{ids[0]}", headers=AUTH).json()["status"] == "pending"
