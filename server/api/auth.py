"""Bearer-key checks: the optional API keys of ``/v1/*`` (``APIKeyMiddleware``) and the mandatory admin
keys of the admin and review APIs (``bearer_denied``). Keys are compared in constant time
(``hmac.compare_digest`` against every key, no early exit) and never logged or echoed.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_body

API_KEY_ENV = "MODEGPT_API_KEY"
# guarded by API keys when any is configured (like vLLM's --api-key); the review API has the admin keys
API_PREFIX = "/v1/"
API_KEY_EXEMPT = ("/v1/review/",)


def split_keys(values: Iterable[str] | None, env: str | None = None) -> list[str]:
    """Keys from repeated flags and an environment variable, each possibly comma-separated."""
    raw = list(values or [])
    if env is not None and os.environ.get(env):
        raw.append(os.environ[env])
    return [k.strip() for v in raw for k in v.split(",") if k.strip()]


def bearer_ok(header: str | None, keys: Iterable[bytes]) -> bool:
    """True when ``header`` is ``Bearer <k>`` for one of ``keys``; constant time in the key compared."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    presented = token.strip().encode("utf-8", "surrogateescape")
    ok = False
    for k in keys:  # no early exit: the time does not tell which key matched
        ok |= hmac.compare_digest(presented, k)
    return ok


def bearer_denied(request, keys: list[bytes], api_name: str) -> JSONResponse | None:
    """None when the request carries one of ``keys`` as a bearer token, else the 401 response."""
    if keys and bearer_ok(request.headers.get("authorization"), keys):
        return None
    msg = (f"The {api_name} is disabled: no admin key is configured" if not keys
           else "Invalid or missing admin API key (Authorization: Bearer <key>)")
    return json_error(msg, 401, headers={"WWW-Authenticate": "Bearer"})


def json_error(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error object as a response."""
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


class APIKeyMiddleware:
    """With keys configured, every ``/v1/*`` request (except the review API, which has the admin keys)
    must carry ``Authorization: Bearer <one of the keys>``, else 401 (OpenAI error). ``/health``,
    ``/metrics``, ``/dashboard`` and ``/openapi.json`` stay open. CORS preflights (``OPTIONS``) pass, so the
    CORS middleware outside can answer them. No keys: everything passes."""

    def __init__(self, app: ASGIApp, keys: Iterable[str] = ()):
        self.app = app
        self.keys = [k.encode("utf-8", "surrogateescape") for k in keys if k]

    def guarded(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        exempt = path.startswith(API_KEY_EXEMPT) and ".." not in path.split("/")
        return (bool(self.keys) and scope["type"] == "http" and scope.get("method") != "OPTIONS"
                and path.startswith(API_PREFIX) and not exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.guarded(scope) and not bearer_ok(Headers(scope=scope).get("authorization"), self.keys):
            resp = json_error("Invalid or missing API key (Authorization: Bearer <key>)", 401,
                              headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
