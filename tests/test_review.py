"""The durable review queue (SQLite WAL) and the rules that fill it: restart, kill -9, threads."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.canary.metrics import CanaryMetrics
from server.canary.review import AlreadyDecided, ItemNotFound, ReviewError, ReviewQueue, ReviewRules

REPO = Path(__file__).resolve().parents[1]


def _item(i: int = 0, **kw) -> dict:
    d = {"request_id": f"cmpl-{i}", "variant": "compressed", "route_reason": "weight",
         "prompt": f"prompt {i} é漢🙂", "original_output": "Paris.", "compressed_output": "Lyon.",
         "divergence": {"kl_mean": 0.7, "kl_max": 3.5, "top1_agreement": 0.5, "logprob_gap": 0.4,
                        "first_divergence": 0}, "triggers": ["divergence"]}
    d.update(kw)
    return d


def _sample(reg: CollectorRegistry, name: str, labels: dict | None = None) -> float:
    v = reg.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def test_add_get_list_decide(tmp_path):
    reg = CollectorRegistry()
    m = CanaryMetrics(reg)
    q = ReviewQueue(tmp_path / "r.db", metrics=m)
    assert q._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ids = [q.add(_item(i)) for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert q.depth() == 3 and _sample(reg, "modegpt_review_queue_depth") == 3
    assert _sample(reg, "modegpt_review_items_total", {"trigger": "divergence"}) == 3
    it = q.get(ids[1])
    assert it.prompt == "prompt 1 é漢🙂" and it.status == "pending" and it.decision is None
    assert it.divergence["kl_max"] == 3.5 and it.triggers == ["divergence"] and it.created > 0

    done = q.decide(ids[1], "approve", "alice", "fine")
    assert (done.status, done.decision, done.reviewer, done.note) == ("approved", "approved", "alice", "fine")
    assert done.decided >= done.created
    with pytest.raises(AlreadyDecided):
        q.decide(ids[1], "reject", "bob")
    with pytest.raises(AlreadyDecided):
        q.decide(ids[1], "approve", "alice")
    with pytest.raises(ItemNotFound):
        q.decide(999, "approve", "alice")
    with pytest.raises(ItemNotFound):
        q.get(999)
    with pytest.raises(ReviewError):
        q.decide(ids[0], "maybe", "alice")
    with pytest.raises(ReviewError):
        q.decide(ids[0], "approve", " ")
    q.decide(ids[2], "rejected", "bob")
    assert [i.id for i in q.list("pending")] == [ids[0]]
    assert [i.id for i in q.list("approved")] == [ids[1]]
    assert [i.id for i in q.list(limit=2, offset=1)] == ids[1:]
    assert q.depth() == 1 and _sample(reg, "modegpt_review_queue_depth") == 1
    assert _sample(reg, "modegpt_review_decisions_total", {"decision": "approved"}) == 1
    assert _sample(reg, "modegpt_review_decisions_total", {"decision": "rejected"}) == 1
    with pytest.raises(ValueError):
        q.add(_item(triggers=["nope"]))
    nan = q.get(q.add(_item(divergence={"kl_mean": float("nan")})))
    assert nan.divergence == {"kl_mean": None}
    q.close()


def test_items_and_decisions_survive_restart(tmp_path):
    path = tmp_path / "sub" / "review.sqlite3"
    with ReviewQueue(path) as q:
        ids = [q.add(_item(i)) for i in range(4)]
        q.decide(ids[0], "approve", "alice", "ok")
        q.decide(ids[3], "reject", "bob", "wrong city")
        before = [i.to_dict() for i in q.list(status=None)]
    reg = CollectorRegistry()
    with ReviewQueue(path, metrics=CanaryMetrics(reg)) as q:
        assert [i.to_dict() for i in q.list(status=None)] == before
        assert q.depth() == 2 and _sample(reg, "modegpt_review_queue_depth") == 2
        with pytest.raises(AlreadyDecided):
            q.decide(ids[3], "approve", "carol")
        assert q.add(_item(9)) > max(ids)  # ids are never reused


def test_concurrent_decisions_decide_once(tmp_path):
    q = ReviewQueue(tmp_path / "r.db")
    ids = [q.add(_item(i)) for i in range(20)]
    wins: list[tuple[int, str]] = []
    lock = threading.Lock()

    def worker(name: str):
        for i in ids:
            try:
                q.decide(i, "approve" if name < "m" else "reject", name)
            except AlreadyDecided:
                continue
            with lock:
                wins.append((i, name))

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("alice", "zed", "bob", "yan")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in wins) == ids  # each item decided exactly once
    for i, name in wins:
        assert q.get(i).reviewer == name
    assert q.depth() == 0


_CRASH_WRITER = r"""
import sys
from server.canary.review import ReviewQueue
q = ReviewQueue(sys.argv[1])
i = 0
while True:
    item_id = q.add({"request_id": f"r{i}", "variant": "compressed", "route_reason": "weight",
                     "prompt": "p" * 2000, "original_output": "a", "compressed_output": "b",
                     "divergence": {"kl_mean": 1.0}, "triggers": ["divergence"]})
    q.decide(item_id, "approve" if i % 2 else "reject", f"rev{i}", f"note {i}")
    print(item_id, flush=True)  # only after the decision's COMMIT returned
    i += 1
"""


def test_committed_decisions_survive_kill_9(tmp_path):
    path = tmp_path / "crash.sqlite3"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    printed: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: the writer is inside its next transaction
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= 40, proc.stderr.read()
    # the killed process left its WAL behind; reopening recovers it
    with ReviewQueue(path) as q:
        assert q.integrity_check() == "ok"
        for i in printed:
            item = q.get(i)
            assert item.status in ("approved", "rejected") and item.reviewer and item.decided is not None
            assert item.note.startswith("note ")
        # nothing half-written: every row satisfies the schema's checks, decided rows are complete
        decided = q.list("approved", limit=500) + q.list("rejected", limit=500)
        assert {i.id for i in decided} >= set(printed)
        assert all(i.reviewer and i.decided for i in decided)
        assert q.count() == len(decided) + q.depth() and q.depth() <= 1
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    raw.close()


def test_rules():
    assert not ReviewRules().active
    r = ReviewRules(kl_threshold=0.5)
    assert r.evaluate("a", "b", {"kl_mean": 0.4})[0] == []
    trig, checks = r.evaluate("a", "b", {"kl_mean": 0.6})
    assert trig == ["divergence"] and checks["divergence"]["threshold"] == 0.5
    assert r.evaluate("a", "b", {"kl_mean": float("nan")})[0] == ["divergence"]
    assert r.evaluate("a", "b", {})[0] == []

    r = ReviewRules(regex=r"^\s*[A-Z][^\n]*\.$")
    assert r.evaluate("Paris.", "Lyon.")[0] == []
    trig, checks = r.evaluate("Paris.", "lyon")
    assert trig == ["regex"] and checks["regex"]["failed"] == ["compressed"]

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = ReviewRules(kl_threshold=0.1, json_schema=schema)
    assert r.evaluate('{"city": "Paris"}', '{"city": "Lyon"}', {"kl_mean": 0.01})[0] == []
    trig, checks = r.evaluate('{"city": "Paris"}', '{"town": 1}', {"kl_mean": 0.2})
    assert trig == ["divergence", "json_schema"] and checks["json_schema"]["failed"] == ["compressed"]
    trig, checks = r.evaluate("not json", '{"city": "Lyon"}', {"kl_mean": 0.0})
    assert trig == ["json_schema"] and "not JSON" in checks["json_schema"]["errors"]["original"]
    with pytest.raises(ValueError):
        ReviewRules(json_schema={"type": "no-such-type"})
    with pytest.raises(ValueError):
        ReviewRules(kl_threshold=-1)

    from server.canary import config

    assert ReviewRules.from_config(config.ReviewRules(kl_threshold=0.3, regex="x")).regex == "x"


def test_rules_submit(tmp_path):
    reg = CollectorRegistry()
    q = ReviewQueue(tmp_path / "r.db", metrics=CanaryMetrics(reg))
    rules = ReviewRules(kl_threshold=0.5, regex=r"\.$")
    kw = dict(request_id="cmpl-1", variant="original", route_reason="sticky", prompt="Q")
    assert rules.submit(q, original_output="A.", compressed_output="B.", divergence={"kl_mean": 0.1}, **kw) is None
    iid = rules.submit(q, original_output="A.", compressed_output="B", divergence={"kl_mean": 0.9}, **kw)
    item = q.get(iid)
    assert item.triggers == ["divergence", "regex"] and item.divergence["kl_mean"] == 0.9
    assert item.divergence["checks"]["regex"]["failed"] == ["compressed"]
    assert _sample(reg, "modegpt_review_items_total", {"trigger": "regex"}) == 1
    assert _sample(reg, "modegpt_review_items_total", {"trigger": "divergence"}) == 1
    assert _sample(reg, "modegpt_review_queue_depth") == 1
