"""A request routed to a remote variant: forwarded to its backend, answered under our ids.

The client's request as validated (unknown fields included: a vLLM backend understands more than this
server's engine) goes to the backend with ``model`` rewritten to the backend's model id. The answer,
the JSON body or each SSE event as it arrives, is relayed with two fields rewritten: ``id`` (our
completion id, the same on every event) and ``model`` (the variant's public id, the model the
``x-modegpt-variant`` header names). The backend's own 4xx errors reach the client as they are.

For comparisons the first choice (prompt 0, sample 0) is kept as an ``Output``: its text without the
echoed prompt, and no token ids (the backend tokenizes; scoring a remote pair works on text).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from server.api.errors import APIError
from server.api.protocol import CompletionRequest, CompletionResponse
from server.canary.shadow import Output

COMPLETIONS = "/completions"


def forwarded_body(req: CompletionRequest, model_id: str) -> dict:
    body = req.model_dump(exclude_unset=True)
    body["model"] = model_id
    return body


def first_output(req: CompletionRequest, text: str, finish_reason: str | None) -> Output | None:
    """Choice 0 as compared output: None when the echoed prompt cannot be told apart from the answer."""
    if req.echo:
        prompt = req.prompts()[0]
        if not isinstance(prompt, str) or not text.startswith(prompt):
            return None
        text = text[len(prompt):]
    return Output(text, [], finish_reason)


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n"


class RemoteCompletions:
    """Completions on ``route.served.remote`` (a ``server.remote.backend.RemoteBackend``)."""

    async def complete(self, req: CompletionRequest, route: Any,
                       cmpl_id: str) -> tuple[CompletionResponse, Output | None]:
        backend = route.served.remote
        data = await backend.post_json(COMPLETIONS, forwarded_body(req, backend.model_id))
        if not isinstance(data, dict):
            raise APIError(f"The backend of `{backend.model_id}` answered something that is not a completion",
                           status=502)
        data["id"], data["model"] = cmpl_id, route.public_id
        try:
            resp = CompletionResponse.model_validate(data)
        except ValidationError as e:
            raise APIError(f"The backend of `{backend.model_id}` answered an invalid completion: "
                           f"{e.errors()[0].get('msg')}", status=502) from None
        first = next((c for c in resp.choices if c.index == 0), None)
        return resp, (first_output(req, first.text, first.finish_reason) if first is not None else None)

    async def stream(self, req: CompletionRequest, route: Any, cmpl_id: str,
                     first_out: list) -> AsyncIterator[str]:
        """The SSE ``data:`` events (without ``[DONE]``); on a complete stream ``first_out`` receives
        choice 0's ``Output``."""
        backend = route.served.remote
        texts: list[str] = []
        finish = None
        async for event in backend.stream_events(COMPLETIONS, forwarded_body(req, backend.model_id)):
            event["id"], event["model"] = cmpl_id, route.public_id
            for choice in event.get("choices") or ():
                if isinstance(choice, dict) and choice.get("index") == 0:
                    texts.append(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
            yield sse(event)
        first_out[:] = [first_output(req, "".join(texts), finish)]
