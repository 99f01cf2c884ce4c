"""Admission control for the inference endpoint: a bound on requests in flight, a deadline per request,
and the drain phase of a graceful shutdown (``server.api.lifecycle``).

``AdmissionMiddleware`` is a plain ASGI middleware in front of ``POST /v1/completions``; every other
route passes through untouched. For each completion request, before its body is parsed:

- draining (a shutdown began): **503** ``ServiceUnavailableError`` with ``Retry-After`` and
  ``Connection: close``, so the client retries elsewhere;
- ``max_pending`` requests already in flight (queued in an engine or generating, streaming or not):
  **429** ``TooManyRequestsError`` with ``Retry-After: retry_after_s`` at once (the server never makes a
  request wait for admission, so an overloaded server never hangs a client);
- else the request runs under a deadline of ``request_timeout_s`` from admission. When it passes, the
  request is cancelled (its engine requests are aborted and their KV-cache blocks freed before the
  engine's next step) and answered with **504** ``GatewayTimeoutError``; a stream that already sent its
  200 header gets the error as a last ``data:`` event, then ``data: [DONE]``. A shutdown that reaches
  its own deadline ends the requests still in flight the same way, with 503.

The middleware only counts and cancels; what a cancelled request does is the app's business (the
completion service aborts its engine requests in ``finally`` blocks).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .errors import error_body

log = logging.getLogger(__name__)

INFERENCE_PATHS = frozenset({"/v1/completions"})


@dataclass(frozen=True)
class Limits:
    """The admission limits (``modegpt serve`` flags in brackets)."""

    max_pending: int = 256  # completion requests in flight at once; 0: no bound [--max-pending]
    request_timeout_s: float = 600.0  # from admission to the last byte; 0: none [--request-timeout]
    retry_after_s: int = 1  # the Retry-After of a 429 / 503
    shutdown_timeout_s: float = 20.0  # drain deadline after SIGTERM (server.api.lifecycle) [--shutdown-timeout]

    def __post_init__(self) -> None:
        if self.max_pending < 0:
            raise ValueError(f"--max-pending must be >= 0, got {self.max_pending}")
        if not self.request_timeout_s >= 0:  # NaN too
            raise ValueError(f"--request-timeout must be >= 0, got {self.request_timeout_s}")
        if not 0 <= self.shutdown_timeout_s < math.inf:
            raise ValueError(f"--shutdown-timeout must be a finite number >= 0, got {self.shutdown_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")


class _Ticket:
    """One admitted request: its deadline and what it has sent so far."""

    def __init__(self, deadline: asyncio.Timeout):
        self.deadline = deadline
        self.reason = "timeout"  # why the deadline passed: "timeout" | "shutdown"
        self.started = False  # http.response.start sent
        self.event_stream = False  # the response is text/event-stream
        self.complete = False  # the last body message sent


class Admission:
    """Requests in flight and the draining flag, shared by the middleware, ``/health`` and the lifecycle."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.draining = False
        self._tickets: set[_Ticket] = set()
        self.rejected = {"overloaded": 0, "draining": 0}
        self.expired = {"timeout": 0, "shutdown": 0}
        self._metrics: tuple[Any, Any, Any] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tickets)

    def register_metrics(self, registry: Any) -> None:
        """``modegpt_http_requests_in_flight``, ``modegpt_http_rejected_total{reason}`` (overloaded |
        draining) and ``modegpt_http_deadline_exceeded_total{reason}`` (timeout | shutdown)."""
        from prometheus_client import Counter, Gauge

        gauge = Gauge("modegpt_http_requests_in_flight", "Completion requests admitted and not finished.",
                      registry=registry)
        gauge.set_function(lambda: self.in_flight)
        rejected = Counter("modegpt_http_rejected", "Completion requests refused at admission.", ["reason"],
                           registry=registry)
        expired = Counter("modegpt_http_deadline_exceeded", "Admitted requests ended by a deadline.", ["reason"],
                          registry=registry)
        for r in self.rejected:
            rejected.labels(r)
        for r in self.expired:
            expired.labels(r)
        self._metrics = (gauge, rejected, expired)

    def health_problem(self) -> str | None:
        return "the server is shutting down" if self.draining else None

    def start_draining(self) -> None:
        """Refuse new requests from now on (503); requests in flight continue."""
        self.draining = True

    def end_all(self, reason: str = "shutdown") -> int:
        """Make every request in flight pass its deadline now (from the event loop); returns how many."""
        loop = asyncio.get_running_loop()
        for t in list(self._tickets):
            if not t.deadline.expired():  # an expired one is already being answered
                t.reason = reason
                t.deadline.reschedule(loop.time())
        return len(self._tickets)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self._metrics is not None:
            self._metrics[1].labels(reason).inc()

    def _expire(self, reason: str) -> None:
        self.expired[reason] += 1
        if self._metrics is not None:
            self._metrics[2].labels(reason).inc()


class AdmissionMiddleware:
    def __init__(self, app: Any, admission: Admission, paths: frozenset[str] = INFERENCE_PATHS):
        self.app = app
        self.admission = admission
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        adm, limits = self.admission, self.admission.limits
        if adm.draining:
            adm._reject("draining")
            await _refuse(scope, receive, send, 503, "The server is shutting down; retry the request",
                          limits.retry_after_s, close=True)
            return
        if limits.max_pending and adm.in_flight >= limits.max_pending:
            adm._reject("overloaded")
            await _refuse(scope, receive, send, 429, f"The server is overloaded: {adm.in_flight} requests in flight "
                          f"(the limit is {limits.max_pending}); retry after {limits.retry_after_s} s",
                          limits.retry_after_s)
            return
        loop = asyncio.get_running_loop()
        timeout = limits.request_timeout_s
        ticket = _Ticket(asyncio.timeout_at(loop.time() + timeout if 0 < timeout < math.inf else None))

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                ticket.started = True
                ctype = dict(message.get("headers") or ()).get(b"content-type", b"")
                ticket.event_stream = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ticket.complete = True
            await send(message)

        adm._tickets.add(ticket)
        try:
            async with ticket.deadline:
                await self.app(scope, receive, tracked_send)
        except TimeoutError:
            if not ticket.deadline.expired():
                raise  # the app's own TimeoutError, not our deadline
            adm._expire(ticket.reason)
            await self._expired(ticket, send, timeout)
        finally:
            adm._tickets.discard(ticket)

    @staticmethod
    async def _expired(ticket: _Ticket, send, timeout: float) -> None:
        if ticket.reason == "shutdown":
            status, message = 503, "The server is shutting down; the request was not completed in time"
        else:
            status, message = 504, f"The request did not complete within the server's limit of {timeout:g} s"
        log.warning("request ended by its deadline (%s)", ticket.reason)
        if ticket.complete:
            return
        try:
            if not ticket.started:
                await _send_error(send, status, message)
            elif ticket.event_stream:
                event = json.dumps(error_body(message, status))
                await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                            "more_body": False})
            else:  # a plain body cut short: end it (the client sees a truncated response)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone as well
            pass


MAX_DISCARD_BYTES = 1 << 20


async def _refuse(scope, receive, send, status: int, message: str, retry_after: int, close: bool = False) -> None:
    """Answer a request that was not admitted. Its body (when small) is read and dropped first, so the
    connection stays usable for the retry; a large or unsized one closes the connection instead."""
    length = Headers(scope=scope).get("content-length", "")
    if not close and length.isdigit() and int(length) <= MAX_DISCARD_BYTES:
        more = int(length) > 0
        while more:
            message_in = await receive()
            more = message_in["type"] == "http.request" and message_in.get("more_body", False)
    else:
        close = True
    headers = {"Retry-After": str(retry_after)}
    if close:
        headers["Connection"] = "close"
    await JSONResponse(error_body(message, status), status_code=status, headers=headers)(scope, receive, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = ["INFERENCE_PATHS", "Admission", "AdmissionMiddleware", "Limits"]
