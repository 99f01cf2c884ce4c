"""Fixtures shared by the API test files: one ``TinyStack`` (the real app under uvicorn on loopback with two
tiny models) per test module, and an httpx client for it. A module that needs other settings defines its
own ``stack``. The server imports stay inside the fixtures: the GPU machine runs the engine and kernel
tests without fastapi or uvicorn installed. It also turns Triton autotuning off for the tests."""
from __future__ import annotations

import os

import pytest

# Triton kernels launch with their first valid config instead of autotuning (kernels/autotune.py):
# correctness does not depend on the tile sizes, and tuning every real shape made the CUDA suite take
# minutes on the H200. A test of tuning itself sets MODEGPT_AUTOTUNE=on.
os.environ.setdefault("MODEGPT_AUTOTUNE", "off")


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
