"""Fixtures shared by the API test files: one ``TinyStack`` (the real app under uvicorn on loopback with two
tiny models) per test module, and an httpx client for it. A module that needs other settings defines its
own ``stack``."""
from __future__ import annotations

import httpx
import pytest

from server.api.testing import TinyStack


@pytest.fixture(scope="module")
def stack():
    s = TinyStack()
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c
