"""Bearer-key checks shared by the admin and review APIs (constant time, keys never logged)."""
from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi.responses import JSONResponse

from .errors import error_body


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
