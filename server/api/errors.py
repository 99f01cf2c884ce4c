"""OpenAI/vLLM-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the API reports goes through ``APIError`` or one of the handlers installed by
``install_error_handlers``; bad input is always a 4xx with this body, never FastAPI's 422 and never a
traceback.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The body of every error response (documented in the OpenAPI schema)."""

    error: ErrorInfo


class APIError(Exception):
    """An error to report to the client with an HTTP status and the offending request field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or error_type(status)


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def error_body(message: str, status: int, param: str | None = None, err_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or error_type(status), "param": param,
                      "code": status}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.status, err.param, err.err_type), status_code=err.status)


def validation_error(errors: list[dict]) -> APIError:
    """A pydantic error list as one 400: the message lists every problem, param is the first field."""
    parts = []
    param = None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        msg = e.get("msg", "invalid value")
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    n = len(errors)
    head = f"{n} validation error{'s' if n != 1 else ''}"
    return APIError(f"{head}: " + "; ".join(parts), status=400, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        logger.exception("internal error while handling a request")
        return error_response(APIError("Internal server error", status=500))
