"""The FastAPI app: ``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``.

``build_app(registry)`` serves whatever engines the registry holds; the registry may be filled (and
marked ready) after the app is already listening, and ``/health`` answers 503 until then.
"""
from __future__ import annotations

import asyncio
import json
import logging
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


def build_app(registry: ModelRegistry) -> FastAPI:
    app = FastAPI(title="modegpt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(lambda: [(m.name, m.engine) for m in registry.served()])
    service = CompletionService(registry, metrics)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.completions = service
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        data = await read_json_object(request)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None
        if req.ignored_fields():
            log.warning("The following fields were present in the request but ignored: %s", req.ignored_fields())
        plan = service.prepare(req)
        if req.stream:
            return StreamingResponse(service.stream(req, plan), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        resp = await with_cancellation(request, service.complete(req, plan))
        if resp is None:
            return JSONResponse(error_body("Client disconnected", 499, err_type="ClientDisconnected"),
                                status_code=499)
        return JSONResponse(resp.model_dump())

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
