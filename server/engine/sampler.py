"""Per-request sampling for a batch of logits rows.

Order of operations for each row (as vLLM does it):
1. logprobs (if requested) come from the RAW logits: `log_softmax(logits)` before penalties, bias,
   temperature or top-k/top-p (vLLM's default `raw_logprobs` mode); prompt logprobs likewise;
2. repetition_penalty over tokens of prompt and output (positive logits divided, negative multiplied);
3. frequency / presence penalties over OUTPUT tokens (OpenAI: `l -= count * freq + (count > 0) * pres`);
4. logit_bias added;
5. min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf until `min_tokens` tokens exist;
6. temperature 0 -> argmax; else divide by temperature, top-k then top-p (both on the sorted row),
   and draw with the exponential race `argmax(p / q), q ~ Exp(1)`.

Reproducibility: a request with a `seed` owns a `torch.Generator` (on the logits' device) and its
row draws its own `Exp(1)` noise from it, so its tokens depend only on its seed and its logits, not on
which other requests share the batch. Unseeded rows share one draw from the device's default RNG.
Penalty tensors are built only for rows that use penalties, so plain requests cost nothing extra.

Two phases, so that the engine can overlap a step's host work with the next step on the GPU
(`LLMEngine`, async scheduling): `launch` enqueues all device work and returns a `PendingSample`
without waiting for the device (host-built index and parameter tensors travel by pinned,
non-blocking copies); `PendingSample.result()` waits for the tokens and builds the logprobs.
`Sampler.__call__` is both at once. `launch(..., pending_tokens=)` samples for sequences whose previous
token is still on the device: penalties and `min_tokens` count it there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from server.engine.transfer import to_device
from server.engine.types import SamplingParams, TokenLogprob

_EPS_TEMPERATURE = 1e-5


class SamplingRow(Protocol):
    """What the sampler reads from a sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def top_logprobs(logprobs: Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprob]:
    """TokenLogprob per row of `logprobs [B, V]` for the chosen `token_ids` with `num_top[i]` alternatives.

    One topk with the batch maximum, one device->host copy.
    """
    if logprobs.shape[0] == 0:
        return []
    ids = torch.as_tensor(list(token_ids), device=logprobs.device, dtype=torch.long)
    chosen, tv, ti = _select_logprobs(logprobs, ids, max(num_top))
    return _assemble_logprobs(ids.tolist(), chosen.tolist(), tv.tolist(), ti.tolist(), num_top)


def _select_logprobs(logprobs: Tensor, ids: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Device part of `top_logprobs`: the chosen ids' log-probs `[B]` and the top `num_top` `[B, k]`."""
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    k = max(0, min(num_top, logprobs.shape[1]))
    tv, ti = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
    return chosen, tv, ti


def _assemble_logprobs(ids: list[int], chosen: list[float], tv: list[list[float]], ti: list[list[int]],
                       num_top: Sequence[int]) -> list[TokenLogprob]:
    out = []
    for i, tok in enumerate(ids):
        n = min(num_top[i], len(ti[i]))
        top = {} if n <= 0 else {int(t): float(v) for t, v in zip(ti[i][:n], tv[i][:n])}
        top.setdefault(int(tok), float(chosen[i]))
        out.append(TokenLogprob(token_id=int(tok), logprob=float(chosen[i]), top=top))
    return out


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask (-inf) tokens outside top-k (`top_k [B]`, V for none) then outside the top-p nucleus."""
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = (cum - probs) > top_p[:, None]  # the mass before this token already covers top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int] = ()):
        self.eos_token_ids = [int(t) for t in eos_token_ids]

    def stop_ids(self, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            ids += self.eos_token_ids
        return ids

    @torch.inference_mode()
    def process_logits(self, logits: Tensor, rows: Sequence[SamplingRow],
                       pending_tokens: Tensor | None = None) -> Tensor:
        """Steps 2-5: penalties, logit_bias, min_tokens (temperature not applied). Never modifies `logits`;
        returns it unchanged when no row uses any of them. `pending_tokens [B]` (on the device): each
        row's output token that is sampled but not yet in its `output_token_ids`."""
        B, V = logits.shape
        dev = logits.device
        params = [r.params for r in rows]
        given = logits  # never modified: the in-place steps below work on a copy

        pending = 0 if pending_tokens is None else 1
        # 2-3. penalties (only rows that use them); a pending token counts as an output token
        rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep:
            r_idx, t_idx = [], []
            for i in rep:
                toks = set(rows[i].prompt_token_ids) | set(rows[i].output_token_ids)
                r_idx += [i] * len(toks)
                t_idx += list(toks)
            seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            if r_idx:
                seen[to_device(r_idx, torch.long, dev), to_device(t_idx, torch.long, dev)] = True
            if pending_tokens is not None:
                ridx = to_device(rep, torch.long, dev)
                seen[ridx, pending_tokens.index_select(0, ridx)] = True
            pen = torch.ones(B, device=dev)
            pen[to_device(rep, torch.long, dev)] = to_device([params[i].repetition_penalty for i in rep],
                                                             torch.float32, dev)
            pen = pen[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        fp = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if fp:
            r_idx, t_idx = [], []
            for i in fp:
                r_idx += [i] * len(rows[i].output_token_ids)
                t_idx += rows[i].output_token_ids
            counts = torch.zeros(B, V, device=dev)
            if r_idx:
                counts.index_put_((to_device(r_idx, torch.long, dev), to_device(t_idx, torch.long, dev)),
                                  torch.ones(len(r_idx), device=dev), accumulate=True)
            fidx = to_device(fp, torch.long, dev)
            if pending_tokens is not None:
                counts.index_put_((fidx, pending_tokens.index_select(0, fidx)), torch.ones(len(fp), device=dev),
                                  accumulate=True)
            freq = torch.zeros(B, device=dev)
            pres = torch.zeros(B, device=dev)
            freq[fidx] = to_device([params[i].frequency_penalty for i in fp], torch.float32, dev)
            pres[fidx] = to_device([params[i].presence_penalty for i in fp], torch.float32, dev)
            logits = logits - counts * freq[:, None] - (counts > 0).float() * pres[:, None]

        # 4-5. logit bias, min_tokens
        b_r, b_t, b_v, m_r, m_t = [], [], [], [], []
        for i, p in enumerate(params):
            for t, v in p.logit_bias.items():
                if 0 <= int(t) < V:
                    b_r.append(i), b_t.append(int(t)), b_v.append(float(v))
            if len(rows[i].output_token_ids) + pending < p.min_tokens:
                for t in self.stop_ids(p):
                    if 0 <= t < V:
                        m_r.append(i), m_t.append(t)
        if (b_r or m_r) and logits is given:
            logits = logits.clone()
        if b_r:
            logits.index_put_((to_device(b_r, torch.long, dev), to_device(b_t, torch.long, dev)),
                              to_device(b_v, torch.float32, dev), accumulate=True)
        if m_r:
            logits[to_device(m_r, torch.long, dev), to_device(m_t, torch.long, dev)] = float("-inf")

        return logits

    @torch.inference_mode()
    def launch(self, logits: Tensor, rows: Sequence[SamplingRow],
               pending_tokens: Tensor | None = None) -> "PendingSample":
        """Enqueue the sampling of one token per row of `logits [B, V]` (float32); nothing waits for
        the device (see the module docstring for `pending_tokens`)."""
        B, V = logits.shape
        params = [r.params for r in rows]
        if B == 0:
            return PendingSample.empty()
        dev = logits.device
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_lp = torch.log_softmax(logits.index_select(0, to_device(want_lp, torch.long, dev)), dim=-1) \
            if want_lp else None
        logits = self.process_logits(logits, rows, pending_tokens)

        # 6. greedy / random
        tokens = logits.argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if p.temperature >= _EPS_TEMPERATURE]
        if rand:
            greedy = to_device([p.temperature < _EPS_TEMPERATURE for p in params], torch.bool, dev)
            temps = to_device([max(p.temperature, _EPS_TEMPERATURE) for p in params], torch.float32, dev)
            scaled = logits / temps[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
                top_k = to_device([p.top_k if 0 < p.top_k < V else V for p in params], torch.long, dev)
                top_p = to_device([p.top_p if p.top_p < 1.0 else 2.0 for p in params], torch.float32, dev)
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)
            q = torch.empty_like(probs)
            unseeded = [i for i in rand if rows[i].generator is None]
            if unseeded:
                q[to_device(unseeded, torch.long, dev)] = torch.empty(len(unseeded), V, device=dev).exponential_()
            for i in rand:
                g = rows[i].generator
                if g is not None:
                    q[i].exponential_(generator=g)
            sampled = (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, sampled)
        return PendingSample.launch(tokens, raw_lp, want_lp, [params[i].logprobs for i in want_lp])

    def __call__(self, logits: Tensor, rows: Sequence[SamplingRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Sample one token per row of `logits [B, V]` (float32). Returns token ids and logprobs."""
        return self.launch(logits, rows).result()


@dataclass
class PendingSample:
    """A launched sampling. `tokens [B]` stays on the device (the next step may read it there); what the
    host needs (the tokens and the logprob rows' values) is copied into pinned memory right behind the
    sampling, with an event, so `result()` waits for this step only, not for a step launched after it
    on the same stream."""
    tokens: Tensor | None
    host: tuple[Tensor, ...]  # tokens [B], then chosen [L], top values [L, k], top ids [L, k]
    want_lp: list[int]
    num_top: list[int]
    done: "torch.cuda.Event | None" = None

    @classmethod
    def empty(cls) -> "PendingSample":
        return cls(None, (), [], [])

    @classmethod
    def launch(cls, tokens: Tensor, raw_lp: Tensor | None, want_lp: list[int], num_top: list[int]) -> "PendingSample":
        parts = [tokens]
        if want_lp:
            ids = tokens.index_select(0, to_device(want_lp, torch.long, tokens.device))
            parts += _select_logprobs(raw_lp, ids, max(num_top))
        if tokens.device.type != "cuda":
            return cls(tokens, tuple(parts), want_lp, num_top)
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in parts)
        done = torch.cuda.Event()
        done.record()
        return cls(tokens, host, want_lp, num_top, done)

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for this sampling's copies; token ids and logprobs per row."""
        if self.tokens is None:
            return [], []
        if self.done is not None:
            self.done.synchronize()
        token_list = self.host[0].tolist()
        lps: list[TokenLogprob | None] = [None] * len(token_list)
        if self.want_lp:
            chosen, tv, ti = (t.tolist() for t in self.host[1:])
            got = _assemble_logprobs([token_list[i] for i in self.want_lp], chosen, tv, ti, self.num_top)
            for i, lp in zip(self.want_lp, got):
                lps[i] = lp
        return token_list, lps
