"""The state of one completion choice while its engine request runs.

It turns ``TokenEvent``s into text through the engine's incremental detokenizer (a multi-byte
character split across tokens is only released once complete), applies stop strings on that text
(the match and everything after it is cut, unless ``include_stop_str_in_output``; stop strings are
only looked for once ``min_tokens`` tokens exist, like vLLM), hides the text of a stop token (EOS or
``stop_token_ids``), collects logprobs, and hands out streaming deltas while holding back the last
``len(longest stop) - 1`` characters, which could still turn out to start a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.detokenize import IncrementalDetokenizer
from server.engine.types import TokenEvent, TokenLogprob

from .logprobs import LogprobsBuilder, TokenTexts, finite
from .protocol import CompletionLogprobs


@dataclass
class ChoiceSpec:
    """What one choice asks for, the same for every sample of a request."""

    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-N to report for generated tokens (None: no logprobs)
    echo: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


class ChoiceState:
    def __init__(self, index: int, spec: ChoiceSpec, tokenizer: Any, texts: TokenTexts,
                 prompt_ids: list[int], prompt_text: str):
        self.index = index
        self.spec = spec
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text if spec.echo else ""
        self._detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), spec.skip_special_tokens)
        self._tokenizer = tokenizer
        self._texts = texts
        self.text = ""  # generated text (stop-truncated); echo text is prepended on output
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self._sent = 0  # characters of `text` already streamed
        self._echo_sent = False
        self._max_stop = max((len(s) for s in spec.stop), default=0)
        self._holdback = 0 if spec.include_stop or not spec.stop else self._max_stop - 1
        self.logprobs = LogprobsBuilder(texts, spec.logprobs) if spec.logprobs is not None else None
        self._prompt_lp_done = not (spec.echo and spec.logprobs is not None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # -- consuming engine events -----------------------------------------------------------------

    def add(self, ev: TokenEvent) -> None:
        if self.finished:
            return
        if ev.prompt_logprobs is not None and not self._prompt_lp_done:
            self._add_prompt_logprobs(ev.prompt_logprobs)
        if not self._prompt_lp_done and ev.finished:
            self._add_prompt_logprobs([None] * len(self.prompt_ids))
        if ev.token_id is not None:
            self._add_token(ev)
            if self.finished:
                return
        if ev.finished:
            self._finish_text()
            self.finish_reason = ev.finish_reason or "stop"
            self.stop_reason = ev.stop_token_id

    def _add_token(self, ev: TokenEvent) -> None:
        tid = int(ev.token_id)
        self.token_ids.append(tid)
        if ev.logprob is not None:
            self.cumulative_logprob += finite(ev.logprob.logprob)
        offset = len(self.prompt_text) + len(self.text)
        if self.logprobs is not None:
            self.logprobs.add(tid, ev.logprob, offset)
        if self._is_stop_token(ev, tid):
            return  # its text is not part of the output (vLLM)
        before = len(self.text)
        self.text += self._detok.step(tid)
        if len(self.text) > before and len(self.token_ids) > self.spec.min_tokens:
            self._check_stop_strings(before)

    def _is_stop_token(self, ev: TokenEvent, tid: int) -> bool:
        if not (ev.finished and ev.finish_reason == "stop"):
            return False
        return ev.stop_token_id is not None or (not self.spec.ignore_eos and tid in self.spec.eos_token_ids)

    def _finish_text(self) -> None:
        before = len(self.text)
        self.text += self._detok.flush()
        if len(self.text) > before and len(self.token_ids) > self.spec.min_tokens:
            self._check_stop_strings(before)

    def _check_stop_strings(self, new_from: int) -> None:
        if not self.spec.stop:
            return
        start = max(0, new_from - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.spec.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return
        i, s = best
        self.text = self.text[: i + len(s)] if self.spec.include_stop else self.text[:i]
        self._sent = min(self._sent, len(self.text))
        self.finish_reason = "stop"
        self.stop_reason = s

    def _add_prompt_logprobs(self, lps: list[TokenLogprob | None]) -> None:
        self._prompt_lp_done = True
        if self.logprobs is None:
            return
        offsets = _text_offsets(self._tokenizer, self.prompt_ids, self.spec.skip_special_tokens)
        entries = list(lps) + [None] * (len(self.prompt_ids) - len(lps))
        prompt_part = LogprobsBuilder(self._texts, self.spec.logprobs)
        for tid, lp, off in zip(self.prompt_ids, entries, offsets):
            prompt_part.add(tid, lp, off)
        # prompt entries go first (they arrive with the first event, before any token is recorded)
        gen = self.logprobs.out
        merged = CompletionLogprobs(
            tokens=prompt_part.out.tokens + gen.tokens,
            token_logprobs=prompt_part.out.token_logprobs + gen.token_logprobs,
            top_logprobs=prompt_part.out.top_logprobs + gen.top_logprobs,
            text_offset=prompt_part.out.text_offset + gen.text_offset)
        self.logprobs.out = merged

    # -- output ----------------------------------------------------------------------------------

    def full_text(self) -> str:
        return self.prompt_text + self.text

    def take_delta(self) -> str:
        """Streaming: the text not yet sent that can no longer be cut by a stop string."""
        end = len(self.text) if self.finished else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent:end]
        self._sent = end
        if not self._echo_sent:
            self._echo_sent = True
            delta = self.prompt_text + delta
        return delta

    def mean_logprob(self) -> float:
        return self.cumulative_logprob / len(self.token_ids) if self.token_ids else 0.0


def _text_offsets(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> list[int]:
    """Start offset of every token in the decoded text of ``ids``."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens)
    for tid in ids:
        detok.step(tid)
    return list(detok.text_offsets)
