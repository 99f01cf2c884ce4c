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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .admission import Admission, AdmissionMiddleware
from .auth import APIKeyMiddleware
from .body_limit import BodySizeLimit
from .completions import CompletionService
from .errors import APIError, error_body, install_error_handlers
from .metrics import ServerMetrics
from .openapi import COMPLETIONS_ROUTE, install_openapi
from .protocol import ModelList, RequestLimits, parse_completion_request
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
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)  # UTF-8 only (RFC 8259)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"Invalid JSON in request body: {e}", param="body") from None
    except RecursionError:
        raise APIError("Invalid JSON in request body: nested too deeply", param="body") from None
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


def build_app(registry: ModelRegistry, *, admin_keys: Iterable[str] = (), review_queue: Any = None,
              api_keys: Iterable[str] = (), cors_origins: Iterable[str] = (),
              limits: RequestLimits | None = None, admission: Admission | None = None) -> FastAPI:
    """``api_keys``: when any, ``/v1/*`` needs one as a bearer token (``server.api.auth``);
    ``cors_origins``: browser origins allowed by CORS (none: CORS off); ``limits``: request limits;
    ``admission``: in-flight bound, request deadline and draining (``server.api.admission``)."""
    from server.canary.admin import build_admin_router
    from server.canary.metrics import CanaryMetrics

    from .dashboard import build_dashboard_router

    limits = limits or RequestLimits()
    app = FastAPI(title="modegpt", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    install_openapi(app)
    admission = admission or Admission()
    app.state.admission = admission
    # outermost last: CORS answers preflights, then the API key, then the body size limit, then admission
    app.add_middleware(AdmissionMiddleware, admission=admission)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=list(api_keys))
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-canary-key", "x-modegpt-variant",
                                          "x-modegpt-critical"], expose_headers=["x-modegpt-variant"])
    # engine metrics of in-process models only: a remote backend exports its own (scrape it too)
    metrics = ServerMetrics(lambda: [(m.name, m.engine) for m in registry.served() if m.remote is None],
                            registry.variant_of)
    service = CompletionService(registry, metrics)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.canary_metrics = CanaryMetrics(metrics.registry)  # the modegpt_* family, same /metrics
    app.state.completions = service
    admission.register_metrics(metrics.registry)
    install_error_handlers(app)
    app.include_router(build_admin_router(lambda: registry.canary, admin_keys))
    app.include_router(build_dashboard_router(registry, metrics))  # /dashboard, /dashboard/data (public)
    if review_queue is not None:
        from server.canary.review_api import build_review_router

        app.include_router(build_review_router(review_queue, app.state.canary_metrics, admin_keys))

    @app.post("/v1/completions", **COMPLETIONS_ROUTE)
    async def create_completion(request: Request):
        req = parse_completion_request(await read_json_object(request), limits)
        if req.ignored_fields():
            log.warning("The following fields were present in the request but ignored: %s", req.ignored_fields())
        plan = service.prepare(req, request.headers)
        if req.stream:
            body = service.stream(req, plan)
            if plan.route.canary is not None:
                # the variant that answers is known once the first event is out (a failed compressed
                # attempt is retried on the original before that), so the header can say it
                body = await with_cancellation(request, _prefetched(body))
                if body is None:  # the client left before the first event; its engine requests are aborted
                    return Response(status_code=499)
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

    @app.get("/health", response_class=Response, responses={200: {"description": "ready (empty body)"}})
    async def health():
        problem = admission.health_problem() or registry.health_problem()
        if problem is None:
            return Response(status_code=200)
        return JSONResponse(error_body(problem, 503), status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    return app
