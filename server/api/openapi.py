"""The OpenAPI schema (``/openapi.json``) describes the request bodies the handlers parse themselves.

``/v1/completions`` reads its raw body (so that bad JSON, a wrong content type and every validation
failure are 400s in the OpenAI error shape, never FastAPI's 422), so FastAPI cannot see its body model;
``COMPLETIONS_ROUTE`` documents it (``openapi_extra``) and the responses (the completion, the SSE
stream, the error object), and ``install_openapi`` adds the models those refer to to the components.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from .errors import ErrorInfo, ErrorResponse
from .protocol import CompletionRequest, CompletionResponse

REF = "#/components/schemas/{model}"
_ERRORS = {"model": ErrorResponse, "description": "OpenAI error object"}


def _schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    """``model``'s validation JSON schema with refs into the components; its ``$defs`` go to ``defs``."""
    schema = model.model_json_schema(ref_template=REF)
    defs.update(schema.pop("$defs", {}))
    defs[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


_REQUEST_SCHEMAS: dict[str, Any] = {}
# one server-sent event (OpenAPI 3.1: the schema of a text/event-stream describes each event)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a CompletionStreamResponse or an error object as JSON; `[DONE]` last"}}}

COMPLETIONS_ROUTE: dict[str, Any] = {
    "openapi_extra": {"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _schema(CompletionRequest, _REQUEST_SCHEMAS)}}}},
    "responses": {
        200: {"model": CompletionResponse, "description": "The completion (`stream: false`), or server-sent "
              "events of `CompletionStreamResponse` chunks ending with `data: [DONE]` (`stream: true`)",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        "4XX": _ERRORS,
        "5XX": _ERRORS,
    },
}


def install_openapi(app: FastAPI) -> None:
    """Serve ``/openapi.json`` with the request models documented by ``openapi_extra`` in its components,
    and the OpenAI error object as every operation's 4XX and 5XX answer (auth, limits, bad input)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, s in _REQUEST_SCHEMAS.items():
                components.setdefault(name, s)
            components.setdefault("ErrorInfo", ErrorInfo.model_json_schema(ref_template=REF))
            components.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template=REF))
            error = {"description": "OpenAI error object",
                     "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    for status in ("4XX", "5XX"):
                        op.setdefault("responses", {}).setdefault(status, error)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
