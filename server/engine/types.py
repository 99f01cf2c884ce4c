"""The contract between the engine and the API layer.

The API turns an OpenAI request into one `GenerationRequest` per (prompt, n-index) and consumes a
stream of `TokenEvent`s for each. Everything is in token space; detokenization for streaming lives in
`server.engine.detokenize` and is driven by the API.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives for generated tokens (None: no logprobs)
    prompt_logprobs: int | None = None  # top-N for prompt tokens (echo), None: none


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, the top-N alternatives (includes the chosen one)


@dataclass
class TokenEvent:
    """One engine step's output for one request."""

    request_id: str
    token_id: int | None  # None for the prompt-logprobs event / a final event with no new token
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, first event, if requested
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_token_id: int | None = None


@dataclass
class EngineStats:
    """A snapshot of one engine (one model) for metrics; added by the engine, not part of the request API."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction 0..1 of KV blocks in use (vllm:kv_cache_usage_perc)
    kv_cache_blocks: int = 0  # usable blocks
    kv_cache_tokens: int = 0  # usable token capacity
    prompt_tokens_total: int = 0  # prompt tokens prefilled (recomputation after preemption not counted)
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    requests_finished_total: int = 0
    num_steps_total: int = 0
    num_score_sequences_total: int = 0


class EngineStoppedError(RuntimeError):
    """A request reached an engine after `shutdown()` (the API answers 503)."""
