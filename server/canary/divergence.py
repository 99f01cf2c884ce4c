"""How far the compressed model's next-token distributions are from the original's on a continuation.

Both models score ``prompt + continuation`` by teacher forcing (``engine.score``: row ``i`` of the
``[L, V]`` log-prob tensor is ``log p(. | tokens[:i+1])``). The rows that predict the continuation
tokens are ``n_prompt - 1 .. n_prompt + n_cont - 2``; on those rows (P = original, Q = compressed):

- KL(P || Q) per position ``sum_v p_v (log p_v - log q_v)`` (terms with ``p_v = 0`` are 0);
  ``kl_mean`` / ``kl_max`` over the positions;
- top-1 agreement: the fraction of positions where ``argmax P == argmax Q``;
- log-prob gap: mean over positions of ``log p(tok) - log q(tok)`` for the continuation's tokens;
- first divergent position: the first continuation position (0-based) whose argmaxes differ, or None.

The tensor functions are pure; ``score_continuations`` batches every sequence into one ``score`` call
per engine (the engines run it on their own threads, between decode steps, off the request path) and
does the math in a worker thread.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Divergence:
    n_positions: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    logprob_gap: float
    first_divergence: int | None
    kl_sum: float = 0.0  # for pooling several continuations
    agree_count: int = 0
    gap_sum: float = 0.0


# -- pure tensor math --------------------------------------------------------------------------------


def kl_per_position(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """KL(P || Q) for each row of two ``[T, V]`` log-prob tensors -> ``[T]`` (float64)."""
    lp_p, lp_q = lp_p.double(), lp_q.double()
    p = lp_p.exp()
    terms = torch.where(p > 0, p * (lp_p - lp_q), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def top1_matches(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """``[T]`` bool: the two argmaxes agree."""
    return lp_p.argmax(-1) == lp_q.argmax(-1)


def chosen_gap(lp_p: Tensor, lp_q: Tensor, tokens: Tensor) -> Tensor:
    """``[T]``: ``log p(tok_t) - log q(tok_t)``."""
    idx = tokens.long().view(-1, 1)
    return (lp_p.double().gather(-1, idx) - lp_q.double().gather(-1, idx)).view(-1)


def first_false(mask: Tensor) -> int | None:
    bad = (~mask).nonzero()
    return int(bad[0, 0]) if len(bad) else None


def continuation_rows(full: Tensor, n_prompt: int, n_cont: int) -> Tensor:
    """The rows of a ``[L, V]`` score tensor that predict the ``n_cont`` continuation tokens."""
    return full[n_prompt - 1:n_prompt - 1 + n_cont]


def divergence(lp_orig: Tensor, lp_comp: Tensor, tokens: Tensor | list[int]) -> Divergence:
    """All the measures on aligned ``[T, V]`` rows (original, compressed) and the ``T`` tokens."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if lp_orig.shape != lp_comp.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(lp_orig.shape)} vs {tuple(lp_comp.shape)}")
    n = int(lp_orig.shape[0])
    if n != len(tokens):
        raise ValueError(f"{n} rows but {len(tokens)} tokens")
    if n == 0:
        return Divergence(0, math.nan, math.nan, math.nan, math.nan, None)
    kl = kl_per_position(lp_orig, lp_comp)
    agree = top1_matches(lp_orig, lp_comp)
    gap = chosen_gap(lp_orig, lp_comp, tokens)
    return Divergence(n, float(kl.mean()), float(kl.max()), float(agree.double().mean()), float(gap.mean()),
                      first_false(agree), kl_sum=float(kl.sum()), agree_count=int(agree.sum()),
                      gap_sum=float(gap.sum()))


def pooled(parts: list[Divergence], first_from: int = 0) -> Divergence:
    """Several continuations' measures pooled over all their positions; ``first_divergence`` (and
    nothing else position-specific) is taken from ``parts[first_from]``."""
    parts_n = [d for d in parts if d.n_positions]
    n = sum(d.n_positions for d in parts_n)
    first = parts[first_from].first_divergence if parts else None
    if n == 0:
        return Divergence(0, math.nan, math.nan, math.nan, math.nan, first)
    kl_sum = sum(d.kl_sum for d in parts_n)
    agree = sum(d.agree_count for d in parts_n)
    gap = sum(d.gap_sum for d in parts_n)
    return Divergence(n, kl_sum / n, max(d.kl_max for d in parts_n), agree / n, gap / n, first,
                      kl_sum=kl_sum, agree_count=agree, gap_sum=gap)


# -- against two engines -----------------------------------------------------------------------------


async def score_continuations(original: Any, compressed: Any, prompt_ids: list[int],
                              continuations: list[list[int]]) -> list[Divergence]:
    """Score ``prompt + c`` for every continuation under both engines (one batched ``score`` call
    each, concurrently) and measure each continuation."""
    if int(original.vocab_size) != int(compressed.vocab_size):
        raise ValueError(f"vocabularies differ: {original.vocab_size} vs {compressed.vocab_size}")
    if not prompt_ids:
        raise ValueError("empty prompt")
    for e in (original, compressed):  # scoring would restart a stopped engine's thread
        if not getattr(e, "is_running", True):
            raise RuntimeError(f"{getattr(e, 'model_id', 'engine')}: engine is not running")
    todo = [i for i, c in enumerate(continuations) if c]
    results = [Divergence(0, math.nan, math.nan, math.nan, math.nan, None) for _ in continuations]
    if not todo:
        return results
    # the last continuation token is never used as context: score prompt + c[:-1]
    seqs = [list(prompt_ids) + list(continuations[i][:-1]) for i in todo]
    lp_o, lp_c = await asyncio.gather(original.score(seqs), compressed.score(seqs))

    def compute() -> list[Divergence]:
        out = []
        for k, i in enumerate(todo):
            c = continuations[i]
            a = continuation_rows(lp_o[k], len(prompt_ids), len(c))
            b = continuation_rows(lp_c[k], len(prompt_ids), len(c))
            out.append(divergence(a, b, c))
        return out

    for i, d in zip(todo, await asyncio.to_thread(compute)):
        results[i] = d
    return results
