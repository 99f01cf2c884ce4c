"""The review queue over HTTP (admin only).

    GET  /v1/review/items?status=pending&limit=50&offset=0   list (status: pending|approved|rejected|all)
    GET  /v1/review/items/{id}                               one item
    POST /v1/review/items/{id}/approve   {"reviewer": "...", "note": "..."}
    POST /v1/review/items/{id}/reject    {"reviewer": "...", "note": "..."}

Every call needs ``Authorization: Bearer <admin key>`` (compared with ``hmac.compare_digest`` against
every configured key; with no key configured every call is refused). Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``): 401 missing/wrong key, 400 bad body or query,
404 unknown id, 409 already decided. Keys are never logged.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.api.auth import bearer_denied, bearer_ok, json_error as _error  # noqa: F401 (bearer_ok re-exported)

from .review import MAX_LIST_LIMIT, STATUSES, ReviewError, ReviewQueue

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
SQLITE_INT_MAX = 2**63 - 1  # ids and offsets past it cannot reach SQLite (OverflowError)




def _int_param(request: Request, name: str, default: int, lo: int, hi: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ReviewError(f"{name} must be an integer, got {raw!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise ReviewError(f"{name} must be between {lo} and {hi}" if hi is not None else f"{name} must be >= {lo}")
    return v


def build_review_router(queue: ReviewQueue, metrics: Any = None, admin_keys: Iterable[str] = ()) -> APIRouter:
    """The review endpoints over ``queue``. ``metrics`` (a ``CanaryMetrics``) is attached to the queue
    if it has none, so decisions and depth are counted exactly once."""
    keys = [k.encode("utf-8", "surrogateescape") for k in admin_keys if k]
    if metrics is not None and queue.metrics is None:
        queue.attach_metrics(metrics)
    router = APIRouter()

    def unauthorized(request: Request) -> JSONResponse | None:
        return bearer_denied(request, keys, "review API")

    def item_id(raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            v = -1
        if not 0 <= v <= SQLITE_INT_MAX:
            raise LookupError
        return v

    @router.get("/v1/review/items")
    async def list_items(request: Request):
        if (resp := unauthorized(request)) is not None:
            return resp
        status = request.query_params.get("status", "pending")
        if status not in STATUSES + ("all",):
            return _error(f"status must be one of {', '.join(STATUSES + ('all',))}, got {status!r}", 400, "status")
        try:
            limit = _int_param(request, "limit", 50, 1, MAX_LIST_LIMIT)
            offset = _int_param(request, "offset", 0, 0, SQLITE_INT_MAX)
        except ReviewError as e:
            return _error(str(e), 400, str(e).split(" ")[0])
        st = None if status == "all" else status
        items = await run_in_threadpool(queue.list, st, limit, offset)
        total = await run_in_threadpool(queue.count, st)
        return JSONResponse({"object": "list", "data": [i.to_dict() for i in items], "status": status,
                             "total": total, "limit": limit, "offset": offset})

    @router.get("/v1/review/items/{raw_id}")
    async def get_item(raw_id: str, request: Request):
        if (resp := unauthorized(request)) is not None:
            return resp
        try:
            item = await run_in_threadpool(queue.get, item_id(raw_id))
        except (LookupError, ReviewError):
            return _error(f"review item {raw_id} not found", 404, "id")
        return JSONResponse(item.to_dict())

    async def decide(raw_id: str, request: Request, decision: str) -> JSONResponse:
        if (resp := unauthorized(request)) is not None:
            return resp
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error("Unsupported Media Type: Only 'application/json' is allowed", 400, "body")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(f"request body over {MAX_BODY_BYTES} bytes", 400, "body")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(f"Invalid JSON in request body: {e}", 400, "body")
        if not isinstance(data, dict):
            return _error("The request body must be a JSON object", 400, "body")
        unknown = sorted(set(data) - {"reviewer", "note"})
        if unknown:
            return _error(f"unknown field {unknown[0]!r} (allowed: reviewer, note)", 400, unknown[0])
        reviewer, note = data.get("reviewer"), data.get("note")
        if not isinstance(reviewer, str) or not reviewer.strip():
            return _error("reviewer must be a non-empty string", 400, "reviewer")
        if note is not None and not isinstance(note, str):
            return _error("note must be a string", 400, "note")
        try:
            iid = item_id(raw_id)
        except LookupError:
            return _error(f"review item {raw_id} not found", 404, "id")
        try:
            item = await run_in_threadpool(queue.decide, iid, decision, reviewer, note)
        except ReviewError as e:
            return _error(str(e), e.status, "id" if e.status in (404, 409) else None)
        log.info("review item %d %s by %s", iid, item.status, item.reviewer)
        return JSONResponse(item.to_dict())

    @router.post("/v1/review/items/{raw_id}/approve")
    async def approve(raw_id: str, request: Request):
        return await decide(raw_id, request, "approve")

    @router.post("/v1/review/items/{raw_id}/reject")
    async def reject(raw_id: str, request: Request):
        return await decide(raw_id, request, "reject")

    return router
