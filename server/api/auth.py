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


def json_error(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error object as a response."""
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)
