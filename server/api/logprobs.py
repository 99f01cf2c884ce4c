"""The OpenAI ``logprobs`` object of a completion choice, built token by token.

``tokens`` are single-token decodes, ``top_logprobs`` maps decoded alternatives (the sampled token is
always among them) to their logprobs, ``text_offset`` is each token's start in the choice's ``text``.
``-inf`` is reported as -9999.0 like vLLM (JSON has no infinities).
"""
from __future__ import annotations

import math
from typing import Any

from server.engine.detokenize import token_text
from server.engine.types import TokenLogprob

from .protocol import CompletionLogprobs

NEG_INF_LOGPROB = -9999.0


def finite(lp: float) -> float:
    if math.isnan(lp) or lp == -math.inf:
        return NEG_INF_LOGPROB
    return float(lp)


class TokenTexts:
    """Cached single-token decodes (used for ``tokens`` and the keys of ``top_logprobs``)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = token_text(self._tok, token_id)
            self._cache[token_id] = text
        return text


class LogprobsBuilder:
    def __init__(self, texts: TokenTexts, num_top: int):
        self._texts = texts
        self._num_top = num_top
        self.out = CompletionLogprobs()
        self._sent = 0

    def add(self, token_id: int, lp: TokenLogprob | None, text_offset: int) -> None:
        self.out.tokens.append(self._texts(token_id))
        self.out.text_offset.append(text_offset)
        if lp is None:
            self.out.token_logprobs.append(None)
            self.out.top_logprobs.append(None)
            return
        self.out.token_logprobs.append(finite(lp.logprob))
        ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])[: self._num_top]
        top: dict[str, float] = {}
        for tid, value in ranked:
            top.setdefault(self._texts(tid), finite(value))
        top.setdefault(self._texts(token_id), finite(lp.logprob))
        self.out.top_logprobs.append(top)

    def take_new(self) -> CompletionLogprobs:
        """The entries added since the last call (one streaming chunk's worth)."""
        o, s = self.out, self._sent
        self._sent = len(o.tokens)
        return CompletionLogprobs(tokens=o.tokens[s:], token_logprobs=o.token_logprobs[s:],
                                  top_logprobs=o.top_logprobs[s:], text_offset=o.text_offset[s:])

    def has_new(self) -> bool:
        return len(self.out.tokens) > self._sent
