"""kernels.pick_store: the engine's timed kernel picks survive a restart, and only where they still apply.

Real files in a temporary Triton cache dir; a "restart" is a fresh in-memory state (the module's loaded
tables and skinny_linear's pick dict cleared), as a new process would start."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from kernels import pick_store

pytest.importorskip("triton")

CPU = torch.device("cpu")
MARGIN = 0.97


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MODEGPT_PICK_CACHE", raising=False)
    monkeypatch.setattr(pick_store, "_loaded", {})
    monkeypatch.setattr(pick_store, "_warned", False)
    return tmp_path


def _restart(monkeypatch):
    from kernels import skinny_linear

    monkeypatch.setattr(pick_store, "_loaded", {})
    monkeypatch.setattr(skinny_linear, "_PICKS", {})


def _must_not_time():
    raise AssertionError("a stored pick was timed again")


def test_a_restarted_process_reuses_the_stored_pick_without_timing(store, monkeypatch):
    """_timed_pick finds an earlier process's pick on disk (string and tuple names, as the dense and
    low-rank picks use) and returns it without running any candidate."""
    from kernels.skinny_linear import PICK_MARGIN, _timed_pick

    dense = ("dense", (4096, 7288), 1, torch.bfloat16, False, False, torch.device("cuda", 0), True)
    lowrank = ("lowrank", (512, 4096), (11008, 512), 16, torch.bfloat16, True, torch.device("cuda", 0), True)
    pick_store.record(dense, "theirs", CPU, PICK_MARGIN)
    pick_store.record(lowrank, (True, False), CPU, PICK_MARGIN)
    files = list((store / "modegpt-picks").glob("picks-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 2
    _restart(monkeypatch)
    assert _timed_pick(dense, {"ours": _must_not_time, "theirs": _must_not_time}, CPU, prefer="ours") == "theirs"
    pairs = {(a, b): _must_not_time for a in (True, False) for b in (True, False)}
    assert _timed_pick(lowrank, pairs, CPU) == (True, False)


def test_keys_are_process_independent_and_stale_picks_are_not_reused(store):
    """A device written as cuda or cuda:0 is the same key; a stored name that is no longer a candidate
    is ignored; another margin, GPU model or kernel source set is another file."""
    key = ("swiglu_mlp", (2 * 7288, 4096), (4096, 7288), 1, torch.bfloat16, False, False, torch.device("cuda"), True)
    same = key[:-2] + (torch.device("cuda", 0), True)
    assert pick_store.key_text(key) == pick_store.key_text(same)
    pick_store.record(key, "epilogue", CPU, MARGIN)
    assert pick_store.lookup(same, {"epilogue": None, "chain": None}, CPU, MARGIN) == "epilogue"
    assert pick_store.lookup(same, {"fused": None, "chain": None}, CPU, MARGIN) is None
    assert pick_store.lookup(key, {"epilogue": None}, CPU, 0.9) is None
    path = pick_store.store_path(CPU, MARGIN)
    assert pick_store.store_path(torch.device("meta"), MARGIN) != path
    old_sources = pick_store._SOURCES
    try:
        pick_store._SOURCES = old_sources[:-1]  # as if a kernel source had changed
        assert pick_store.store_path(CPU, MARGIN) != path
    finally:
        pick_store._SOURCES = old_sources


def test_a_corrupt_store_warns_and_is_rewritten(store):
    path = pick_store.store_path(CPU, MARGIN)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    key = ("dense", (8, 8), 1, torch.float32, False, False, CPU, False)
    with pytest.warns(RuntimeWarning, match="pick store"):
        assert pick_store.lookup(key, {"ours": None}, CPU, MARGIN) is None
    pick_store.record(key, "ours", CPU, MARGIN)
    assert json.loads(path.read_text()) == {pick_store.key_text(key): "'ours'"}


def test_the_store_can_be_turned_off(store, monkeypatch):
    monkeypatch.setenv("MODEGPT_PICK_CACHE", "0")
    key = ("dense", (8, 8), 1, torch.float32, False, False, CPU, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pick_store.record(key, "ours", CPU, MARGIN)
        assert pick_store.lookup(key, {"ours": None}, CPU, MARGIN) is None
    assert not (store / "modegpt-picks").exists()
