"""Divergence of a pair with a remote variant, from echo scoring with top-k logprobs.

A remote model's full next-token distribution is not available over the API; its top-k logprobs are
(vLLM caps k at ``--max-logprobs``, 20 by default; this server at 20). Each compared output is scored
under both models by one request each: ``prompt + output`` as the prompt, ``echo: true``,
``logprobs: k``, ``max_tokens: 0``. Every position then has the logprob of the actual next token and
the k most likely tokens with their logprobs (keyed by token text). The positions compared are the
tokens that start at or after the end of the prompt text.

Per position, with P = original and Q = compressed:

- KL: tokens listed by BOTH models are kept one by one, every other token is merged into one "rest"
  outcome of probability ``1 - sum(listed)`` on each side; the KL of these coarse distributions is
  ``sum_{t in both} p_t log(p_t / q_t) + p_rest log(p_rest / q_rest)``. Merging outcomes never increases
  a KL (data-processing inequality), so this is a LOWER BOUND of the full-vocabulary KL(P || Q); it is
  exact when the listed tokens carry (nearly) all the mass, and ``kl_max`` is a lower bound as well.
- top-1 agreement, first divergent position: the two top-ranked tokens (exact: the argmax is always
  in the top k);
- log-prob gap: ``log p(tok) - log q(tok)`` of the actual tokens (exact: the echo gives them).

Tokens are matched by their text; two distinct tokens with the same text (lone bytes of a multi-byte
character) cannot be told apart, so the numbers are exact only on text whose tokens decode distinctly.

``EchoScores`` comes from ``RemoteEchoScorer`` (a backend) or ``LocalEchoScorer`` (an in-process
engine, for a pair with one local and one remote variant: the same top-k view of both sides).
``TopKScorer`` is the ``scorer`` of ``server.canary.shadow.ShadowWorker`` for such pairs.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from server.api.errors import APIError
from server.canary.divergence import Divergence
from server.canary.shadow import Output, ShadowJob, VariantUnavailable

REST_FLOOR = 1e-12  # the rest outcome's probability under Q when the listed tokens took it all


@dataclass
class EchoScores:
    """One text's echo under one model: per token its text, start offset in the text, the logprob of
    the token itself, and the top-k alternatives (text -> logprob; None for the first token)."""

    tokens: list[str]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]

    @classmethod
    def from_logprobs(cls, lp: dict) -> "EchoScores":
        """From an OpenAI ``logprobs`` object (a completion choice's)."""
        try:
            s = cls(list(lp["tokens"]), list(lp["text_offset"]), list(lp["token_logprobs"]), list(lp["top_logprobs"]))
        except (KeyError, TypeError):
            raise ValueError("the echo answer has no complete logprobs object") from None
        if not len(s.tokens) == len(s.offsets) == len(s.logprobs) == len(s.top):
            raise ValueError("the echo answer's logprobs lists differ in length")
        return s

    def positions_from(self, start_char: int) -> list[int]:
        """Indices of the tokens that start at or after ``start_char`` and have logprobs."""
        return [i for i, off in enumerate(self.offsets)
                if off >= start_char and self.logprobs[i] is not None and self.top[i]]


def _prob(lp: float) -> float:
    return math.exp(lp) if lp > -1e4 else 0.0  # -9999 stands for -inf in the OpenAI API


def kl_lower_bound(p: dict[str, float], q: dict[str, float]) -> float:
    """KL(P || Q) of the coarse distributions {tokens in both top-k lists} + {rest} (module docstring)."""
    kl = mass_p = mass_q = 0.0
    for t in p.keys() & q.keys():
        pt, qt = _prob(p[t]), _prob(q[t])
        mass_p += pt
        mass_q += qt
        if pt > 0:
            kl += pt * (p[t] - q[t])
    rest_p, rest_q = max(0.0, 1.0 - mass_p), max(0.0, 1.0 - mass_q)
    if rest_p > 0:
        kl += rest_p * (math.log(rest_p) - math.log(max(rest_q, REST_FLOOR)))
    return max(kl, 0.0)


def top_token(top: dict[str, float]) -> str:
    return max(top.items(), key=lambda kv: kv[1])[0]


def topk_divergence(orig: EchoScores, comp: EchoScores, start_char: int) -> Divergence:
    """The divergence measures on the continuation (tokens from ``start_char`` on) of one text scored
    under both models."""
    if orig.tokens != comp.tokens:
        raise ValueError("the two variants tokenized the scored text differently")
    idx = orig.positions_from(start_char)
    idx = [i for i in idx if comp.logprobs[i] is not None and comp.top[i]]
    if not idx:
        return Divergence(0, math.nan, math.nan, math.nan, math.nan, None)
    kls = [kl_lower_bound(orig.top[i], comp.top[i]) for i in idx]
    agree = [top_token(orig.top[i]) == top_token(comp.top[i]) for i in idx]
    gaps = [orig.logprobs[i] - comp.logprobs[i] for i in idx]
    n = len(idx)
    first = next((k for k, a in enumerate(agree) if not a), None)
    return Divergence(n, sum(kls) / n, max(kls), sum(agree) / n, sum(gaps) / n, first,
                      kl_sum=sum(kls), agree_count=sum(agree), gap_sum=sum(gaps))


class RemoteEchoScorer:
    """Echo scoring on a remote backend (``server.remote.backend.RemoteBackend``)."""

    def __init__(self, backend: Any, k: int):
        self.backend = backend
        self.k = k

    async def __call__(self, text: str) -> EchoScores:
        body = {"model": self.backend.model_id, "prompt": text, "echo": True, "logprobs": self.k,
                "max_tokens": 0, "temperature": 0.0}
        try:
            data = await self.backend.post_json("/completions", body)
        except APIError as e:
            if e.status < 500:
                raise
            raise VariantUnavailable(f"{self.backend.model_id}: {e.message}") from None
        try:
            lp = data["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.backend.model_id}: the echo answer has no logprobs") from None
        return EchoScores.from_logprobs(lp)


class LocalEchoScorer:
    """What the echo request would answer, computed on an in-process engine (``engine.score``)."""

    def __init__(self, engine: Any, k: int):
        from server.api.logprobs import TokenTexts

        self.engine = engine
        self.k = k
        self.texts = TokenTexts(engine.tokenizer)

    async def __call__(self, text: str) -> EchoScores:
        from server.engine.detokenize import IncrementalDetokenizer

        if not getattr(self.engine, "is_running", True):
            raise VariantUnavailable(f"{self.engine.model_id}: engine is not running")
        tok = self.engine.tokenizer
        ids = list(tok(text)["input_ids"])
        (lp,) = await self.engine.score([ids])

        def build() -> EchoScores:
            detok = IncrementalDetokenizer(tok, [], True)
            for t in ids:
                detok.step(t)
            values, top_ids = lp[:-1].float().topk(min(self.k, lp.shape[-1]), dim=-1)
            logprobs: list[float | None] = [None]
            top: list[dict[str, float] | None] = [None]
            for i in range(1, len(ids)):
                entry = {}
                for tid, v in zip(top_ids[i - 1].tolist(), values[i - 1].tolist()):
                    entry.setdefault(self.texts(tid), v)
                actual = float(lp[i - 1, ids[i]])
                entry.setdefault(self.texts(ids[i]), actual)
                logprobs.append(actual)
                top.append(entry)
            return EchoScores([self.texts(t) for t in ids], list(detok.text_offsets), logprobs, top)

        return await asyncio.to_thread(build)


class TopKScorer:
    """``ShadowWorker`` scorer for a pair with a remote variant: each output's text after the prompt
    text, scored under both variants (concurrently), measured with ``topk_divergence``."""

    def __init__(self, original: Any, compressed: Any, k: int):
        self.original = original
        self.compressed = compressed
        self.k = k

    async def __call__(self, job: ShadowJob, outputs: list[Output]) -> list[Divergence]:
        if not job.prompt_text:
            raise ValueError("a token-id prompt cannot be scored over the API (no prompt text)")
        results = []
        for out in outputs:
            if not out.text:
                results.append(Divergence(0, math.nan, math.nan, math.nan, math.nan, None))
                continue
            text = job.prompt_text + out.text
            o, c = await asyncio.gather(self.original(text), self.compressed(text))
            results.append(topk_divergence(o, c, len(job.prompt_text)))
        return results


def echo_scorer(served: Any, k: int):
    """The echo scorer of a served model (``server.api.registry.ServedModel``): remote or in-process."""
    if served.remote is not None:
        return RemoteEchoScorer(served.remote, k)
    return LocalEchoScorer(served.engine, k)


def scorer_for(original: Any, compressed: Any) -> TopKScorer | None:
    """The top-k scorer when either variant is remote (k: the remote backend's ``score_logprobs``);
    None when both are in process (they are compared on full distributions)."""
    remotes = [s.remote for s in (original, compressed) if getattr(s, "remote", None) is not None]
    if not remotes:
        return None
    k = min(r.options.score_logprobs for r in remotes)
    return TopKScorer(echo_scorer(original, k), echo_scorer(compressed, k), k)

