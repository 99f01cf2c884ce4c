"""Fixtures shared by the API test files: one ``TinyStack`` (the real app under uvicorn on loopback with two
tiny models) per test module, and an httpx client for it. A module that needs other settings defines its
own ``stack``. The server imports stay inside the fixtures: the GPU machine runs the engine and kernel
tests without fastapi or uvicorn installed. It also turns Triton autotuning off for the tests, and holds the
kernel tests' ``seed`` and ``force_triton`` fixtures."""
from __future__ import annotations

import os

import pytest

# Triton kernels launch with their first valid config instead of autotuning (kernels/autotune.py):
# correctness does not depend on the tile sizes, and tuning every real shape made the CUDA suite take
# minutes on the H200. A test of tuning itself sets MODEGPT_AUTOTUNE=on.
os.environ.setdefault("MODEGPT_AUTOTUNE", "off")


@pytest.fixture
def seed() -> int:
    """Fresh random inputs per run; ``MODEGPT_TEST_SEED`` reproduces one (failures print their seed)."""
    import torch

    s = int(os.environ.get("MODEGPT_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


@pytest.fixture
def force_triton(monkeypatch):
    """Strict Triton dispatch (no silent fallback), the skinny kernel up to its 64 rows, and
    NaN-poisoned scratch buffers."""
    from kernels import _common

    monkeypatch.setenv("MODEGPT_KERNELS", "triton")
    monkeypatch.setenv("MODEGPT_SKINNY_MAX_TOKENS", "64")
    monkeypatch.setattr(_common, "POISON_WORKSPACES", True)


@pytest.fixture(scope="module")
def stack():
    from server.api.testing import TinyStack

    s = TinyStack()
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(stack):
    import httpx

    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c


_PROGRESS_LOG = os.environ.get("MODEGPT_TEST_PROGRESS")


def pytest_runtest_logreport(report):
    """With ``MODEGPT_TEST_PROGRESS=FILE`` every test's outcome and duration (and a failure's traceback)
    is appended to FILE as it finishes: a run killed by a time limit (the lent GPU's) still says which
    tests failed and why, where pytest's own summary would only come at the end."""
    if not _PROGRESS_LOG or (report.when != "call" and report.passed):
        return
    with open(_PROGRESS_LOG, "a") as f:
        f.write(f"{report.outcome.upper():8} {report.duration:7.2f}s {report.when:8} {report.nodeid}\n")
        if report.failed:
            f.write(str(report.longrepr)[-4000:] + "\n\n")


def pytest_collection_modifyitems(config, items):
    """``MODEGPT_TEST_SHARD=i/n`` keeps every n-th collected test starting at the i-th (0-based): the GPU
    runner (kernels/run_h200.sh) runs n shards in parallel processes."""
    shard = os.environ.get("MODEGPT_TEST_SHARD")
    if not shard:
        return
    i, n = (int(v) for v in shard.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"MODEGPT_TEST_SHARD={shard}: need 0 <= i < n")
    keep = [t for k, t in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % n != i])
    items[:] = keep
