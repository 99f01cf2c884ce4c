"""The FastAPI app: ``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``, ``/admin/canary``,
``/dashboard`` (a built-in HTML dashboard, ``server.api.dashboard``).

``build_app(registry)`` serves whatever engines the registry holds; the registry may be filled (and
marked ready) after the app is already listening, and ``/health`` answers 503 until then. A canary
attached to the registry (``registry.set_canary``) routes its public id; its responses carry the
header ``x-modegpt-variant`` (``original`` | ``compressed``) and the answering variant's id in ``model``.
``admin_keys`` guard the admin API (``server.canary.admin``); ``review_queue`` mounts the review API.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .completions import CompletionService
from .errors import APIError, error_body, install_error_handlers, validation_error
from .metrics import ServerMetrics
from .protocol import CompletionRequest, ModelList
from .registry import ModelRegistry

log = logging.getLogger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: Request) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError("Unsupported Media Type: Only 'application/json' is allowed", param="body")
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"Invalid JSON in request body: {e}", param="body") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object", param="body")
    return data


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def with_cancellation(request: Request, coro) -> Any:
    """Run ``coro`` unless the client goes away first; then cancel it (which aborts its engine
    requests) and return None. The request body must already have been read."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    return None


def _variant_header(plan) -> dict[str, str]:
    from server.canary.router import VARIANT_HEADER

    return {VARIANT_HEADER: plan.route.variant} if plan.route.variant else {}


async def _prefetched(gen):
    """``gen`` with its first item already produced (then re-yielded first)."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None

    async def chained():
        try:
            if first is not None:
                yield first
            async for x in gen:
                yield x
        finally:
            await gen.aclose()

    return chained()


def build_app(registry: ModelRegistry, *, admin_keys: Iterable[str] = (), review_queue: Any = None) -> FastAPI:
    from server.canary.admin import build_admin_router
    from server.canary.metrics import CanaryMetrics

    from .dashboard import build_dashboard_router

    app = FastAPI(title="modegpt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(lambda: [(m.name, m.engine) for m in registry.served()], registry.variant_of)
    service = CompletionService(registry, metrics)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.canary_metrics = CanaryMetrics(metrics.registry)  # the modegpt_* family, same /metrics
    app.state.completions = service
    install_error_handlers(app)
    app.include_router(build_admin_router(lambda: registry.canary, admin_keys))
    app.include_router(build_dashboard_router(registry, metrics))  # /dashboard, /dashboard/data (public)
    if review_queue is not None:
        from server.canary.review_api import build_review_router

        app.include_router(build_review_router(review_queue, app.state.canary_metrics, admin_keys))

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        data = await read_json_object(request)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None
        if req.ignored_fields():
            log.warning("The following fields were present in the request but ignored: %s", req.ignored_fields())
        plan = service.prepare(req, request.headers)
        if req.stream:
            body = service.stream(req, plan)
            if plan.route.canary is not None:
                # the variant that answers is known once the first event is out (a failed compressed
                # attempt is retried on the original before that), so the header can say it
                body = await _prefetched(body)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **_variant_header(plan)})
        resp = await with_cancellation(request, service.complete(req, plan))
        if resp is None:
            return JSONResponse(error_body("Client disconnected", 499, err_type="ClientDisconnected"),
                                status_code=499)
        return JSONResponse(resp.model_dump(), headers=_variant_header(plan))

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(ModelList(data=registry.cards()).model_dump())

    @app.get("/health")
    async def health():
        problem = registry.health_problem()
        if problem is None:
            return Response(status_code=200)
        return JSONResponse(error_body(problem, 503), status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    return app
