"""A limit on the size of request bodies (ASGI middleware).

A body over the limit is answered 413 with the OpenAI error object (``param: "body"``) on every route:

- a ``Content-Length`` far over the limit (by more than ``DRAIN_BYTES``) is refused before any of the
  body is read;
- otherwise (a small excess, or a chunked body counted while the app reads it) the app is stopped at
  the first byte over the limit, and the rest of the body, up to ``DRAIN_BYTES``, is read and dropped
  before the answer: closing a connection with unread input makes the kernel reset it, and the client
  would see "connection reset" instead of the 413.

Starlette has no such middleware; uvicorn only limits header sizes.
"""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

DRAIN_BYTES = 1 << 20


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, more_body: bool) -> None:
        drained = 0
        while more_body and drained <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client is gone
            drained += len(message.get("body", b""))
            more_body = message.get("more_body", False)
        msg = f"Request body too large: the limit is {self.max_bytes} bytes"
        await JSONResponse(error_body(msg, 413, "body"), status_code=413,
                           headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            far_over = not length.isdigit() or int(length) > self.max_bytes + DRAIN_BYTES
            await self._refuse(scope, receive, send, more_body=not far_over)
            return
        received = 0
        started = False
        more_body = True

        async def limited_receive() -> Message:
            nonlocal received, more_body
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = message.get("more_body", False)
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:  # else the app answered before reading the whole body: nothing more to say
                await self._refuse(scope, receive, send, more_body)
