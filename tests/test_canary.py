"""Canary pieces on their own: config loading and validation, the router's split and stickiness, the
divergence math against a plain per-element computation, and the rollout state machine on a fake clock."""
from __future__ import annotations

import argparse
import math
import threading

import pytest
import torch

from server.canary.config import CanaryConfig, ConfigError, config_from_args
from server.canary.divergence import (chosen_gap, continuation_rows, divergence, first_false, kl_per_position,
                                      pooled, top1_matches)
from server.canary.rollout import (IDLE, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, RolloutController,
                                   TransitionError)
from server.canary.router import COMPRESSED, ORIGINAL, CanaryRouter, bucket


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# ------------------------------------------------------------------------------------------- config


def test_config_yaml_flags_env_and_errors(tmp_path):
    path = tmp_path / "canary.yaml"
    path.write_text("""
public_name: pub
weight: 0.2
shadow_fraction: 0.5
sticky: false
admin_keys: [file-key]
critical: {api_keys: [sekrit-c]}
rollout:
  steps: [0.1, 0.5, 1.0]
  interval_s: 60
  thresholds: {max_kl_mean: 0.3, min_comparisons: 2}
review: {kl_threshold: 0.4, regex: "^ok", json_schema: {type: object}}
review_db: /tmp/r.sqlite3
""")
    c = CanaryConfig.from_yaml(path)
    assert (c.public_name, c.weight, c.shadow_fraction, c.sticky) == ("pub", 0.2, 0.5, False)
    assert c.rollout.steps == [0.1, 0.5, 1.0] and c.rollout.thresholds.max_kl_mean == 0.3
    assert c.rollout.thresholds.min_top1_agreement == 0.6  # default kept
    assert c.review.json_schema == {"type": "object"} and c.review_db == "/tmp/r.sqlite3"
    assert "file-key" not in repr(c) and "sekrit-c" not in repr(c)  # keys never printed
    assert c.to_dict()["admin_keys"] == ["***"]

    p = argparse.ArgumentParser()
    from server.cli import add_serve_arguments

    add_serve_arguments(p)
    args = p.parse_args(["--canary-config", str(path), "--canary-weight", "0.7", "--rollout-steps", "0.5,1",
                         "--admin-key", "flag-key", "--max-kl-mean", "0.9", "--original", "x", "--compressed", "y"])
    c = config_from_args(args, environ={"MODEGPT_ADMIN_KEY": "env-a, env-b"})
    assert c.weight == 0.7 and c.shadow_fraction == 0.5 and c.rollout.steps == [0.5, 1.0]
    assert c.rollout.thresholds.max_kl_mean == 0.9 and c.rollout.interval_s == 60
    assert c.admin_keys == ["file-key", "flag-key", "env-a", "env-b"] and c.public_name == "pub"
    # embedded default: canary on; explicit models without canary flags: everything to the original
    c0 = config_from_args(p.parse_args([]), embedded_default=True, environ={})
    assert (c0.enabled, c0.weight, c0.shadow_fraction) == (True, 0.1, 0.2)
    c1 = config_from_args(p.parse_args(["--original", "x", "--compressed", "y"]), environ={})
    assert (c1.weight, c1.shadow_fraction, c1.score_fraction) == (0.0, 0.0, 0.0)

    bad = [({"weight": 1.5}, "weight: must be between 0 and 1"),
           ({"wieght": 0.1}, "wieght: unknown key"),
           ({"rollout": {"steps": [0.5, 0.1]}}, "rollout.steps: must be increasing"),
           ({"rollout": {"thresholds": {"max_kl_mean": -1}}}, "rollout.thresholds.max_kl_mean: must be >= 0"),
           ({"review": {"regex": "("}}, "review.regex: invalid regular expression"),
           ({"sticky": "yes"}, "sticky: must be true or false"),
           ({"rollout": {"interval_s": "soon"}}, "rollout.interval_s: must be a finite number"),
           ({"critical": {"api_keys": [""]}}, "critical.api_keys[0]: must be a non-empty string")]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            CanaryConfig.from_dict(data)
    path.write_text("weight: [")
    with pytest.raises(ConfigError, match="invalid YAML"):
        CanaryConfig.from_yaml(path)


# ------------------------------------------------------------------------------------------- router


def _sigma_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_router_split_and_stickiness():
    r = CanaryRouter("pub", "orig", "comp", 0.25, seed=7)
    # no key: seeded draws, binomial split
    d = [r.decide("pub") for _ in range(1000)]
    assert {x.reason for x in d} == {"weight"}
    k = sum(x.variant == COMPRESSED for x in d)
    assert _sigma_ok(k, 1000, 0.25), k
    assert all(x.model_id == ("comp" if x.variant == COMPRESSED else "orig") for x in d)
    # keyed: 1,000 users split by hash, the same user always lands on the same variant
    users = [f"user-{i}" for i in range(1000)]
    first = {u: r.decide("pub", user=u) for u in users}
    assert {x.reason for x in first.values()} == {"sticky"}
    assert _sigma_ok(sum(x.variant == COMPRESSED for x in first.values()), 1000, 0.25)
    for u in users[:200]:
        assert r.decide("pub", user=u).variant == first[u].variant
        assert r.decide("pub", {"x-canary-key": u}).variant == first[u].variant  # header key = same bucket
    # raising the weight only moves users from original to compressed
    prev = {u: x.variant for u, x in first.items()}
    for w in (0.3, 0.5, 0.9, 1.0):
        r.set_weight(w)
        now = {u: r.decide("pub", user=u).variant for u in users}
        assert all(now[u] == COMPRESSED for u in users if prev[u] == COMPRESSED)
        assert _sigma_ok(sum(v == COMPRESSED for v in now.values()), 1000, w) or w == 1.0
        prev = now
    assert set(prev.values()) == {COMPRESSED}
    assert 0 <= bucket("a") < 1 and bucket("a") == bucket("a")
    with pytest.raises(ValueError):
        r.set_weight(1.5)


def test_router_pinning_critical_fallback():
    r = CanaryRouter("pub", "orig", "comp", 0.0, critical_keys=["crit-key"])
    assert r.decide("comp").variant == COMPRESSED and r.decide("comp").reason == "pinned_model"
    assert r.decide("orig").reason == "pinned_model"
    d = r.decide("pub", {"x-modegpt-variant": "compressed"})
    assert (d.variant, d.reason, d.model_id) == (COMPRESSED, "pinned_header", "comp")
    # critical wins over every pin
    for headers in ({"x-modegpt-critical": "true"}, {"authorization": "Bearer crit-key"}):
        for model in ("pub", "comp"):
            d = r.decide(model, {**headers, "x-modegpt-variant": "compressed"})
            assert (d.variant, d.reason) == (ORIGINAL, "critical")
    assert r.decide("pub", {"authorization": "Bearer other"}).reason == "weight"
    r.set_weight(1.0)
    r.set_enabled(False, "rolled back")
    assert r.decide("pub", user="u").reason == "fallback" and r.decide("pub").variant == ORIGINAL
    assert r.decide("pub", {"x-modegpt-variant": "compressed"}).variant == COMPRESSED  # explicit pin kept


def test_router_weight_updates_are_thread_safe():
    r = CanaryRouter("pub", "orig", "comp", 0.0, seed=1)
    stop = threading.Event()
    errors = []

    def flip():
        i = 0
        while not stop.is_set():
            r.set_weight((i % 11) / 10)
            i += 1

    def read():
        try:
            for _ in range(3000):
                d = r.decide("pub")
                assert d.variant in (ORIGINAL, COMPRESSED)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=flip)
    t.start()
    readers = [threading.Thread(target=read) for _ in range(3)]
    for x in readers:
        x.start()
    for x in readers:
        x.join()
    stop.set()
    t.join()
    assert not errors


# ------------------------------------------------------------------------------------------- divergence


def _plain(lp_o: torch.Tensor, lp_c: torch.Tensor, toks: list[int]) -> dict:
    """The measures with per-element Python arithmetic (an independent reference)."""
    kls, agree, gaps, first = [], [], [], None
    for t in range(lp_o.shape[0]):
        kl = 0.0
        for v in range(lp_o.shape[1]):
            p = math.exp(float(lp_o[t, v]))
            if p > 0:
                kl += p * (float(lp_o[t, v]) - float(lp_c[t, v]))
        kls.append(kl)
        a = max(range(lp_o.shape[1]), key=lambda v: float(lp_o[t, v]))
        b = max(range(lp_c.shape[1]), key=lambda v: float(lp_c[t, v]))
        agree.append(a == b)
        if a != b and first is None:
            first = t
        gaps.append(float(lp_o[t, toks[t]]) - float(lp_c[t, toks[t]]))
    n = len(kls)
    return {"kl_mean": sum(kls) / n, "kl_max": max(kls), "agree": sum(agree) / n, "gap": sum(gaps) / n,
            "first": first}


def test_divergence_math_matches_plain_computation():
    g = torch.Generator().manual_seed(3)
    T, V = 7, 23
    lo = torch.log_softmax(torch.randn(T, V, generator=g) * 2, -1)
    lc = torch.log_softmax(lo + torch.randn(T, V, generator=g) * 0.8, -1)
    lc[0] = lo[0]  # an identical position: KL 0, agreement
    toks = torch.randint(0, V, (T,), generator=g).tolist()
    d = divergence(lo, lc, toks)
    ref = _plain(lo, lc, toks)
    assert math.isclose(d.kl_mean, ref["kl_mean"], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(d.kl_max, ref["kl_max"], rel_tol=1e-9)
    assert math.isclose(d.top1_agreement, ref["agree"]) and math.isclose(d.logprob_gap, ref["gap"], rel_tol=1e-9)
    assert d.first_divergence == ref["first"] and d.n_positions == T
    assert float(kl_per_position(lo, lc)[0]) == pytest.approx(0.0, abs=1e-12)
    # identical distributions: nothing diverges; zero-probability entries contribute nothing
    same = divergence(lo, lo.clone(), toks)
    assert same.kl_max == pytest.approx(0.0, abs=1e-12) and same.top1_agreement == 1.0
    assert same.first_divergence is None and same.logprob_gap == 0.0
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert float(kl_per_position(p, q)[0]) == pytest.approx(math.log(2))
    assert top1_matches(lo, lc).tolist() == [(float(lo[t].argmax()) == float(lc[t].argmax())) for t in range(T)]
    assert chosen_gap(lo, lc, torch.tensor(toks)).shape == (T,)
    assert first_false(torch.tensor([True, True])) is None and first_false(torch.tensor([True, False])) == 1
    full = torch.arange(10.0).view(10, 1)
    assert continuation_rows(full, 4, 3).view(-1).tolist() == [3.0, 4.0, 5.0]  # rows predicting tokens 4..6
    # pooling weighs by positions
    d2 = divergence(lo[:3], lc[:3], toks[:3])
    pool = pooled([d, d2])
    assert pool.n_positions == T + 3
    assert pool.kl_mean == pytest.approx((d.kl_mean * T + d2.kl_mean * 3) / (T + 3))
    assert pool.first_divergence == d.first_divergence


# ------------------------------------------------------------------------------------------- rollout


def _controller(**thr):
    from server.canary.config import RolloutConfig, Thresholds

    clock = FakeClock()
    router = CanaryRouter("pub", "orig", "comp", 0.0)
    cfg = RolloutConfig(steps=[0.1, 0.5, 1.0], interval_s=60,
                        thresholds=Thresholds(**{"min_comparisons": 2, **thr}))
    rb = []
    return RolloutController(cfg, router, clock=clock, on_rollback=lambda k, r: rb.append((k, r))), clock, rb


def test_rollout_progresses_and_promotes():
    c, clock, rb = _controller()
    assert c.state == IDLE
    c.start()
    assert (c.state, c.step, c.weight) == (PROGRESSING, 0, 0.1)
    clock.advance(61)
    assert c.tick().passed is None and c.step == 0  # inconclusive: 0/2 comparisons, keeps holding
    c.record_comparison(0.01, 0.99)
    c.record_comparison(0.02, 0.98)  # the hold is over: this record ends the step
    assert (c.step, c.weight) == (1, 0.5)
    # pause freezes the hold timer
    clock.advance(30)
    c.pause()
    clock.advance(1000)
    assert c.tick() is None and c.state == PAUSED
    c.resume()
    assert c.state == PROGRESSING and c.snapshot()["step_elapsed_s"] == pytest.approx(30)
    for _ in range(2):
        c.record_comparison(0.01, 1.0)
        c.record_outcome(ORIGINAL, True, 1.0)
        c.record_outcome(COMPRESSED, True, 1.5)
    clock.advance(31)
    c.tick()
    assert (c.step, c.weight) == (2, 1.0)
    c.record_comparison(0.0, 1.0)
    c.record_comparison(0.0, 1.0)
    clock.advance(60)
    c.tick()
    assert c.state == PROMOTED and c.weight == 1.0 and not rb
    with pytest.raises(TransitionError):
        c.pause()


@pytest.mark.parametrize("kind,feed", [
    ("kl", lambda c: [c.record_comparison(0.93, 0.9) for _ in range(2)]),
    ("agreement", lambda c: [c.record_comparison(0.1, 0.3) for _ in range(2)]),
    ("error_rate", lambda c: [c.record_comparison(0.1, 0.9) for _ in range(2)]
     + [c.record_outcome(COMPRESSED, ok, 1.0) for ok in (True, False, True, True)]),
    ("latency", lambda c: [c.record_comparison(0.1, 0.9) for _ in range(2)]
     + [c.record_outcome(v, True, lat) for v, lat in [(ORIGINAL, 1.0)] * 3 + [(COMPRESSED, 5.0)] * 3]),
])
def test_rollout_rolls_back_on_a_failed_check(kind, feed):
    c, clock, rb = _controller()
    c.start()
    feed(c)
    assert c.state == PROGRESSING
    clock.advance(60)
    c.tick()
    assert c.state == ROLLED_BACK and c.weight == 0.0 and not c.router.enabled
    assert c.rollback_kind == kind and rb[0][0] == kind
    if kind == "kl":
        assert "kl_mean 0.93 > 0.5" in c.reason
    assert c.router.decide("pub", user="u").reason == "fallback"
    c.set_weight(0.2)  # an operator re-enables: idle at that weight
    assert c.state == IDLE and c.router.enabled and c.weight == 0.2


def test_rollout_consecutive_compressed_failures_disable_at_once():
    c, clock, rb = _controller()
    c.cfg.failure.max_consecutive_errors = 2
    c.record_outcome(COMPRESSED, False, failure="error: boom")
    c.record_outcome(COMPRESSED, True, 1.0)  # resets the streak
    c.record_outcome(COMPRESSED, False, failure="stall: no output")
    assert c.state == IDLE
    c.record_outcome(COMPRESSED, False, failure="stall: no output")
    assert c.state == ROLLED_BACK and c.rollback_kind == "engine_failure" and "stall" in c.reason
    assert rb == [("engine_failure", c.reason)]
    c.resume()  # from rolled back: a fresh rollout
    assert c.state == PROGRESSING and c.weight == 0.1
