"""Fixtures shared by the API test files: one ``TinyStack`` (the real app under uvicorn on loopback with two
tiny models) per test module, and an httpx client for it. A module that needs other settings defines its
own ``stack``. The server imports stay inside the fixtures: the GPU machine runs the engine and kernel
tests without fastapi or uvicorn installed."""
from __future__ import annotations

import pytest


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
