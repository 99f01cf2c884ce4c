"""Request and response models of ``/v1/completions`` and ``/v1/models`` (vLLM + OpenAI).

Field-level constraints live on the pydantic fields (a violation becomes a 400 whose ``param`` is the
field); rules that relate several fields are in ``CompletionRequest.check`` and raise ``APIError`` with
the field to blame; per-server limits (``RequestLimits``: the generated-token budget of one request) are
checked by ``parse_completion_request``, the one entry point from a decoded JSON body to a request. Like
vLLM, unknown fields are accepted and ignored.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema, field_validator

from .errors import APIError, validation_error

MAX_LOGPROBS = 20
MAX_N = 128
MAX_BEST_OF = 20
LOGIT_BIAS_LIMIT = 100.0
INT64_MAX = 2**63 - 1
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM has no limit
MAX_STOP_CHARS = 256  # per stop string (checked against the decoded tail after every token)
MAX_LOGIT_BIAS = 1024  # entries
DEFAULT_MAX_GENERATION_TOKENS = 65536  # prompts x max(n, best_of) x max_tokens of one request
DEFAULT_MAX_BODY_BYTES = 16 << 20  # a request body (server.api.body_limit)

PromptInput = str | list[str] | list[int] | list[list[int]]

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
# what the OpenAPI schema says ``prompt`` is; the validator below is the authority
PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                           _TOKEN_IDS,
                           {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]}

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
_TOKEN_ID_KEY = r"^[0-9]{1,10}$"
TokenIdKey = Annotated[str, StringConstraints(pattern=_TOKEN_ID_KEY)]  # a logit_bias key: a token id
LogitBias = Annotated[dict[TokenIdKey, float], Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={
    "propertyNames": {"pattern": _TOKEN_ID_KEY}, "additionalProperties": False})]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


def _token_ids(x: Any) -> list[int] | None:
    """``x`` as a list of token ids, else None. An integral float (``5.0``) is an id, as it is for every
    int field (and for JSON Schema's ``integer``); booleans are not."""
    if not isinstance(x, list):
        return None
    out = []
    for t in x:
        if isinstance(t, int) and not isinstance(t, bool):
            out.append(t)
        elif isinstance(t, float) and t.is_integer():
            out.append(int(t))
        else:
            return None
    return out


class CompletionRequest(OpenAIBaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # 1e400 parses as inf: not a valid number here

    model: str | None = None
    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)]  # required (like vLLM; OpenAI defaults it)
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    seed: int | None = Field(default=None, ge=-(2**63), le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: LogitBias | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    user: str | None = None
    suffix: str | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    add_special_tokens: bool = True

    @field_validator("n", "stream", "echo", "min_tokens", "ignore_eos", "include_stop_str_in_output",
                     "skip_special_tokens", "add_special_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info) -> Any:
        """An explicit null means the default (clients serialise unset fields as null)."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("prompt")
    @classmethod
    def _prompt_form(cls, v: Any) -> PromptInput:
        if v is None:
            raise ValueError("either prompt or prompt_embeds must be provided and non-empty")
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(p, str) for p in v):
                return v
            ids = _token_ids(v)
            batch = [ids] if ids is not None else [_token_ids(p) for p in v]
            if all(b is not None for b in batch):
                if any(t < 0 for b in batch for t in b):
                    raise ValueError("token ids must be >= 0")
                return batch[0] if ids is not None else batch
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be non-empty")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids "
                         "or a list of lists of token ids")

    # -- cross-field rules -------------------------------------------------------------------------

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if _token_ids(p) is not None:
            return [p]
        return list(p)

    def effective_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def effective_best_of(self) -> int:
        return self.n if self.best_of is None else self.best_of

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Rules across fields; raises ``APIError`` (400) naming the field."""
        if self.suffix is not None:
            raise APIError("suffix is not currently supported", param="suffix")
        max_tokens = self.effective_max_tokens()
        if max_tokens == 0 and not self.echo:
            raise APIError("max_tokens must be at least 1, got 0 (0 is only allowed with echo)",
                           param="max_tokens")
        if self.min_tokens > max_tokens:
            raise APIError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                           f"got {self.min_tokens}", param="min_tokens")
        if self.stream_options is not None and not self.stream:
            raise APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
        best_of = self.effective_best_of()
        if best_of < self.n:
            raise APIError(f"best_of must be greater than or equal to n, got n={self.n} and "
                           f"best_of={best_of}", param="best_of")
        if best_of > self.n and self.stream:
            raise APIError("best_of > n is not supported with stream=True", param="best_of")

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            tid = int(key)
            if not 0 <= tid < vocab_size:
                raise APIError(f"token_id {tid} in logit_bias is out of vocabulary (size {vocab_size})",
                               param="logit_bias")
            out[tid] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
        return out


@dataclass(frozen=True)
class RequestLimits:
    """Per-server limits on one request (``modegpt serve --max-generation-tokens``, ``--max-body-bytes``)."""

    max_generation_tokens: int = DEFAULT_MAX_GENERATION_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.max_generation_tokens < 1 or self.max_body_bytes < 1:
            raise ValueError("request limits must be positive")

    def check(self, req: CompletionRequest) -> None:
        """The tokens a request may make the engines generate: prompts x samples x max_tokens."""
        prompts, samples, max_tokens = len(req.prompts()), req.effective_best_of(), req.effective_max_tokens()
        total = prompts * samples * max_tokens
        if total <= self.max_generation_tokens:
            return
        if req.best_of is not None and req.best_of > req.n:
            param = "best_of"
        elif req.n > 1:
            param = "n"
        elif prompts > 1:
            param = "prompt"
        else:
            param = "max_tokens"
        raise APIError(f"this request asks for up to {total} generated tokens ({prompts} prompt(s) x "
                       f"{samples} sample(s) x max_tokens {max_tokens}); this server's limit is "
                       f"{self.max_generation_tokens} per request", param=param)


def _invalid_text_at(data: dict) -> str | None:
    """The top-level key under which the decoded JSON holds a string that is not valid Unicode (a lone
    surrogate from a ``\\udXXX`` escape, which no tokenizer or hash can encode), else None."""
    for key, value in data.items():
        stack = [key, value]
        while stack:
            x = stack.pop()
            if isinstance(x, str) and not _encodes(x):
                return key if _encodes(key) else "body"
            if isinstance(x, list):
                stack.extend(x)
            elif isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
    return None


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_completion_request(data: Any, limits: RequestLimits | None = None) -> CompletionRequest:
    """A decoded JSON body -> a valid ``CompletionRequest``, or ``APIError`` (400 naming the field)."""
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object", param="body")
    bad = _invalid_text_at(data)
    if bad is not None:
        raise APIError("the request holds a string that is not valid Unicode (a lone surrogate escape)",
                       param=bad)
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(list(e.errors())) from None
    (limits or RequestLimits()).check(req)
    return req


# -- responses -------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "modegpt"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
