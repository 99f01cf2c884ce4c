"""The canary admin API (FastAPI router).

    GET  /admin/canary                      weight, state, step, reason, counts, shadow stats
    POST /admin/canary/weight   {"weight": 0.25}
    POST /admin/canary/pause
    POST /admin/canary/resume               (from idle / rolled_back: starts the staged rollout)
    POST /admin/canary/promote
    POST /admin/canary/rollback {"reason": "..."}   (body optional)

Every call needs ``Authorization: Bearer <admin key>``, compared with ``hmac.compare_digest`` against
every configured key (no early exit); with no key configured every call is refused. Keys are never
logged. Errors are OpenAI-shaped: 401 missing/wrong key, 400 bad body, 409 a transition the current
state does not allow. Every successful call answers the status object (as GET does).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.auth import bearer_denied, json_error as _error

from .rollout import TransitionError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024




class _Unavailable(Exception):
    pass


class _BadBody(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


async def _body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise _BadBody("request body too large", "body")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadBody(f"Invalid JSON in request body: {e}", "body") from None
    if not isinstance(data, dict):
        raise _BadBody("The request body must be a JSON object", "body")
    return data


def build_admin_router(canary: Any, admin_keys: Iterable[str] = ()) -> APIRouter:
    """``canary``: a ``server.canary.canary.Canary``, or a callable returning one (None while the models
    load or when no canary is configured: 503)."""
    keys = [k.encode("utf-8", "surrogateescape") for k in admin_keys if k]
    router = APIRouter()
    get = canary if callable(canary) and not hasattr(canary, "rollout") else (lambda: canary)

    def denied(request: Request) -> JSONResponse | None:
        return bearer_denied(request, keys, "admin API")

    def current():
        c = get()
        if c is None:
            raise _Unavailable()
        return c

    async def act(request: Request, fn) -> JSONResponse:
        bad = denied(request)
        if bad is not None:
            return bad
        try:
            canary = current()
            data = await _body(request)
            fn(canary.rollout, data)
        except _Unavailable:
            return _error("No canary is running (models loading, or only one model served)", 503)
        except _BadBody as e:
            return _error(e.message, 400, e.param)
        except TransitionError as e:
            return _error(str(e), 409)
        return JSONResponse(canary.status())

    @router.get("/admin/canary")
    async def status(request: Request):
        bad = denied(request)
        if bad is not None:
            return bad
        try:
            return JSONResponse(current().status())
        except _Unavailable:
            return _error("No canary is running (models loading, or only one model served)", 503)

    @router.post("/admin/canary/weight")
    async def set_weight(request: Request):
        def fn(rollout, data: dict) -> None:
            w = data.get("weight")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w <= 1:
                raise _BadBody(f"weight must be a number between 0 and 1, got {w!r}", "weight")
            rollout.set_weight(float(w))
            log.info("admin: canary weight set to %g", w)
        return await act(request, fn)

    @router.post("/admin/canary/pause")
    async def pause(request: Request):
        return await act(request, lambda r, _: r.pause())

    @router.post("/admin/canary/resume")
    async def resume(request: Request):
        return await act(request, lambda r, _: r.resume())

    @router.post("/admin/canary/promote")
    async def promote(request: Request):
        return await act(request, lambda r, _: r.promote())

    @router.post("/admin/canary/rollback")
    async def rollback(request: Request):
        def fn(rollout, data: dict) -> None:
            reason = data.get("reason", "rolled back by admin")
            if not isinstance(reason, str) or len(reason) > 500:
                raise _BadBody("reason must be a string of at most 500 characters", "reason")
            rollout.rollback(f"manual: {reason}", kind="manual")
        return await act(request, fn)

    return router
