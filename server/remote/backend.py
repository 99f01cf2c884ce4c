"""One OpenAI-compatible backend (``vllm serve``, another ``modegpt serve``) that a variant's requests
are forwarded to.

Spec: ``http[s]://host:port/v1`` or ``http[s]://host:port/v1#model-id`` (``RemoteSpec.parse``). Without
a model id, ``connect()`` reads ``GET {base}/models`` and takes the only card, or else the only card not
derived from another listed card (vLLM's LoRA adapters and modegpt's aliases name their base in
``parent``); anything else is ambiguous and must be named with ``#model-id``.

Transport: one pooled ``httpx.AsyncClient`` per event loop (keep-alive connections are reused across
requests); ``connect_timeout_s`` to open a connection, ``read_timeout_s`` between two bytes of an
answer. An optional bearer key (``api_key``) is sent on every call.

Retries (completions are idempotent): a connection that could not be opened or broke before the
answer, and 502/503/504 answers, are retried up to ``retries`` times after a short exponential
backoff; a streaming request only until its first event has been received, i.e. before anything was
relayed to the client. Read timeouts are not retried (the backend may still be working on it).

Health: every request's final outcome (after its retries) feeds ``health``
(``server.remote.health.BackendHealth``), and so does ``probe()`` (``GET {root}/health`` must not fail,
``GET {base}/models`` must list the model), run every ``health_interval_s`` by a ``HealthProber``. A
request to an ejected backend is refused at once with 503, before anything is sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.api.errors import APIError

from .health import BackendHealth, HealthProber

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
# failures that happen before the backend could have produced an answer we relayed
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError)


def is_remote_spec(spec: str | None) -> bool:
    return bool(spec) and spec.split("://", 1)[0].lower() in ("http", "https") and "://" in spec


@dataclass(frozen=True)
class RemoteSpec:
    base_url: str  # ends with the API prefix, e.g. http://host:8001/v1
    model_id: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "RemoteSpec":
        if not is_remote_spec(spec):
            raise ValueError(f"not an http(s) URL: {spec!r}")
        url, _, model = spec.partition("#")
        url = url.rstrip("/")
        if not url.split("://", 1)[1]:
            raise ValueError(f"no host in {spec!r}")
        return cls(url, model or None)

    @property
    def root(self) -> str:
        """The server root (``/health`` lives there): the base URL without a trailing ``/v1``."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url


@dataclass(frozen=True)
class RemoteOptions:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0
    retries: int = 2
    backoff_s: float = 0.05  # before retry i (0-based): backoff_s * 2**i
    health_interval_s: float = 5.0
    probe_timeout_s: float = 2.0
    eject_after: int = 3
    readmit_after: int = 2
    score_logprobs: int = 20  # top-k logprobs asked for when scoring (vLLM and modegpt cap it at 20)
    max_connections: int = 256
    api_key: str | None = field(default=None, repr=False)


def pick_model(cards: list[dict], wanted: str | None, where: str) -> dict:
    """The card to serve from a ``/v1/models`` listing (see the module docstring)."""
    ids = [c.get("id") for c in cards]
    if wanted is not None:
        for c in cards:
            if c.get("id") == wanted:
                return c
        served = ", ".join(map(str, ids)) or "nothing"
        raise ValueError(f"{where} does not serve model {wanted!r} (it serves: {served})")
    if len(cards) == 1:
        return cards[0]
    bases = [c for c in cards if c.get("parent") not in ids]
    if len(bases) == 1:
        return bases[0]
    raise ValueError(f"{where} serves {', '.join(map(str, ids)) or 'no model'}: name the one to use as "
                     f"{where}#MODEL_ID")


class BackendUnavailable(Exception):
    """The backend could not be reached or answered with an error before ``connect()`` finished."""


def error_message(status: int, content: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, type) of an error answer (OpenAI / vLLM shape, old flat vLLM shape, or text)."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return (content.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"), None, None
    err = data.get("error", data) if isinstance(data, dict) else {}
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        return f"HTTP {status}", None, None
    return str(err.get("message") or f"HTTP {status}"), err.get("param"), err.get("type")


class RemoteBackend:
    def __init__(self, spec: RemoteSpec, options: RemoteOptions | None = None):
        self.spec = spec
        self.base_url = spec.base_url
        self.model_id: str | None = spec.model_id
        self.max_model_len: int | None = None
        self.options = options or RemoteOptions()
        self.health = BackendHealth(self.base_url, self.options.eject_after, self.options.readmit_after)
        self.metrics: Any = None  # server.remote.metrics.RemoteMetrics, set by its watch()
        self.variant: str | None = None  # the metrics label ("original" | "compressed")
        self._prober = HealthProber(self.health, self.probe, self.options.health_interval_s)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"RemoteBackend({self.base_url!r}, model={self.model_id!r})"

    @property
    def name(self) -> str:
        return self.model_id or self.base_url

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}

    # -- startup and probing (synchronous: the loader and prober threads) ---------------------------

    def _models(self, client: httpx.Client) -> list[dict]:
        r = client.get(f"{self.base_url}/models", headers=self.headers())
        if r.status_code != 200:
            message = error_message(r.status_code, r.content)[0]
            raise BackendUnavailable(f"GET /models answered {r.status_code}: {message}")
        data = r.json().get("data")
        if not isinstance(data, list):
            raise BackendUnavailable("GET /models: no `data` list in the answer")
        return data

    def discover(self) -> None:
        """Learn the model id (when the spec named none) and its ``max_model_len`` from ``/v1/models``;
        ``BackendUnavailable`` when the backend does not answer, ``ValueError`` when its answer does not
        say which model to use."""
        try:
            with httpx.Client(timeout=self.options.probe_timeout_s) as c:
                cards = self._models(c)
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"{type(e).__name__}: {e}") from None
        card = pick_model(cards, self.model_id, self.base_url)
        self.model_id = str(card["id"])
        mml = card.get("max_model_len")
        self.max_model_len = int(mml) if isinstance(mml, int) else None

    def connect(self, retry_every_s: float = 2.0) -> None:
        """At startup. Without a model id in the spec: wait until ``/v1/models`` answers (the id is
        needed to serve). With one: a backend that does not answer yet starts ejected (the prober
        re-admits it). A listing without the model raises ``ValueError`` (a configuration error)."""
        warned = 0.0
        while True:
            try:
                self.discover()
                self.health.reset(True)
                return
            except BackendUnavailable as e:
                if self.spec.model_id is not None:
                    log.warning("backend %s (%s) is not answering yet (%s): starting it ejected", self.base_url,
                                self.model_id, e)
                    self.health.reset(False, str(e))
                    return
                if time.monotonic() - warned > 30:
                    log.warning("waiting for backend %s to list its model (%s)", self.base_url, e)
                    warned = time.monotonic()
                time.sleep(retry_every_s)

    def probe(self) -> str | None:
        """None when the backend can serve the model, else why not."""
        try:
            with httpx.Client(timeout=self.options.probe_timeout_s) as c:
                r = c.get(f"{self.spec.root}/health", headers=self.headers())
                if r.status_code != 404 and not r.is_success:  # 404: a server without /health
                    return f"GET /health answered {r.status_code}"
                cards = self._models(c)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        except (BackendUnavailable, ValueError) as e:
            return str(e)
        card = next((c for c in cards if c.get("id") == self.model_id), None)
        if card is None:
            return f"/models does not list {self.model_id}"
        if self.max_model_len is None and isinstance(card.get("max_model_len"), int):
            self.max_model_len = card["max_model_len"]
        return None

    def start_health_checks(self) -> None:
        self._prober.start()

    def close(self) -> None:
        """Stop probing; the pooled connections go with the event loop that owns them."""
        self._prober.stop()
        self._client = None

    # -- requests (on the server's event loop) --------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            o = self.options
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s),
                limits=httpx.Limits(max_connections=o.max_connections, max_keepalive_connections=o.max_connections))
            self._client_loop = loop
        return self._client

    def ensure_admitted(self) -> None:
        if not self.health.up:
            raise APIError(f"The model `{self.model_id}` is unavailable: its backend is out of service "
                           f"({self.health.last_error or 'ejected'})", status=503)

    async def _backoff(self, attempt: int, why: str) -> None:
        log.info("backend %s: retrying (%s)", self.base_url, why)
        if self.metrics is not None:
            self.metrics.count_retry(self.variant)
        await asyncio.sleep(self.options.backoff_s * (2 ** attempt))

    def _transport_failure(self, e: Exception) -> APIError:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self.health.record_failure(why)
        log.warning("backend %s failed: %s", self.base_url, why)
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return APIError(f"The backend of `{self.model_id}` timed out", status=504)
        return APIError(f"The backend of `{self.model_id}` is unreachable ({type(e).__name__})", status=502)

    def _error_answer(self, status: int, content: bytes) -> APIError:
        """A non-200 answer: the backend's own 4xx goes to the client as is (the backend is fine); a 5xx
        is a backend failure."""
        message, param, err_type = error_message(status, content)
        if status < 500:
            self.health.record_success()
            return APIError(message, status=status, param=param, err_type=err_type)
        self.health.record_failure(f"HTTP {status}: {message}")
        return APIError(f"The backend of `{self.model_id}` failed: {message}",
                        status=status if status in RETRY_STATUSES else 502)

    async def post_json(self, path: str, body: dict) -> dict:
        """POST ``body`` to ``{base}{path}`` and return the JSON answer (with retries)."""
        self.ensure_admitted()
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            try:
                r = await self.client().post(url, json=body, headers=self.headers())
            except RETRY_ERRORS as e:
                if attempt < self.options.retries:
                    await self._backoff(attempt, type(e).__name__)
                    attempt += 1
                    continue
                raise self._transport_failure(e) from None
            except httpx.HTTPError as e:
                raise self._transport_failure(e) from None
            if r.status_code in RETRY_STATUSES and attempt < self.options.retries:
                await self._backoff(attempt, f"HTTP {r.status_code}")
                attempt += 1
                continue
            if r.status_code != 200:
                raise self._error_answer(r.status_code, r.content)
            try:
                data = r.json()
            except ValueError:
                self.health.record_failure("invalid JSON")
                raise APIError(f"The backend of `{self.model_id}` answered invalid JSON", status=502) from None
            self.health.record_success()
            return data

    async def stream_events(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST a streaming request; yield each SSE ``data:`` event decoded, until ``[DONE]``. Retries
        only until the first event arrived."""
        self.ensure_admitted()
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            received = False
            retry_status = None
            try:
                async with self.client().stream("POST", url, json=body, headers=self.headers()) as r:
                    if r.status_code in RETRY_STATUSES and attempt < self.options.retries:
                        retry_status = r.status_code
                    elif r.status_code != 200:
                        raise self._error_answer(r.status_code, await r.aread())
                    else:
                        async for data in sse_data(r.aiter_lines()):
                            if data == "[DONE]":
                                self.health.record_success()
                                return
                            event = json.loads(data)
                            if isinstance(event, dict) and "error" in event:
                                raise self._stream_error(event)
                            received = True
                            yield event
                        raise httpx.RemoteProtocolError("the event stream ended without [DONE]")
            except RETRY_ERRORS as e:
                if received or attempt >= self.options.retries:
                    raise self._transport_failure(e) from None
                await self._backoff(attempt, type(e).__name__)
                attempt += 1
                continue
            except httpx.HTTPError as e:
                raise self._transport_failure(e) from None
            except ValueError as e:  # an event that is not JSON
                self.health.record_failure(f"invalid event: {e}")
                raise APIError(f"The backend of `{self.model_id}` sent an invalid event", status=502) from None
            await self._backoff(attempt, f"HTTP {retry_status}")
            attempt += 1

    def _stream_error(self, event: dict) -> APIError:
        message, param, err_type = error_message(500, json.dumps(event).encode())
        code = event["error"].get("code") if isinstance(event["error"], dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        if status >= 500:
            self.health.record_failure(f"error event: {message}")
            return APIError(f"The backend of `{self.model_id}` failed: {message}", status=502)
        return APIError(message, status=status, param=param, err_type=err_type)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` payload of every server-sent event (multi-line data joined with newlines)."""
    buf: list[str] = []
    async for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)
