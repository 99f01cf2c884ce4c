"""Continuous batching with chunked prefill.

Every step the scheduler builds one flat batch under a token budget (`max_num_batched_tokens`):
1. DECODES FIRST: every running sequence whose prompt is fully in the cache gets its one token. If the
   cache has no block for it, the most recently admitted running sequence is preempted (blocks freed,
   put back at the head of the waiting queue to be recomputed later: vLLM's "recompute" preemption).
   Decodes therefore advance on every step; a long prompt can never stall them.
2. then running sequences in the middle of a chunked prefill continue with the next chunk;
3. then waiting requests are admitted in FCFS order while the budget, `max_num_seqs` and the free KV
   cache allow. Admission reserves blocks for the WHOLE prompt plus the first generated token, so
   an admitted prompt is never starved of cache by later arrivals; its prefill may be split across
   steps (chunked prefill) with the chunk sized by what is left of the budget.

A sequence is in one phase or the other by arithmetic, not by flags: `num_computed` tokens are in the
cache; a step processes `token_ids[num_computed : num_computed + n]`; when that reaches the end of
`token_ids` the logits of the last token are sampled (a decode is simply n == 1). A preempted
sequence restarts at `num_computed = 0` with prompt + outputs as its recompute prefill.

Prompt logprobs (echo) need the logits of every prompt position, so the scheduler marks, per chunk,
the positions `p < prompt_len - 1` whose logits predict prompt token `p + 1`.
Requests join (`add`) and leave (`finish`, `abort`) only between steps.

`schedule_continuation` plans the decode step after one whose sampled tokens are still on the device
(the engine's async scheduling): every running sequence advances by its pending token. It only ever
plans such a plain step: it returns None, and the engine reads the tokens back and schedules
normally, whenever a request waits, a prefill is in progress, or a block cannot be had without
preempting.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.engine.kv_cache import BlockAllocator
from server.engine.types import SamplingParams, TokenLogprob


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    prompt_logprobs: list[TokenLogprob | None] | None = None  # accumulated while prefilling
    prompt_logprobs_sent: bool = False
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_token_id: int | None = None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position processed (== num_computed before the step)
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token: its logits give the next token."""
        return self.end == self.seq.num_tokens and self.seq.params.max_tokens > 0

    @property
    def completes_prefill(self) -> bool:
        return self.end == self.seq.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions whose logits score the next PROMPT token (for echo / prompt_logprobs)."""
        if not self.seq.wants_prompt_logprobs:
            return range(0)
        return range(self.start, min(self.end, self.seq.prompt_len - 1))


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # one token each, first in the batch
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 2048):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every decode needs a token)")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------ membership

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        if not seq.prompt_token_ids:
            raise ValueError("empty prompt")
        if seq.prompt_len > self.max_model_len:
            raise ValueError(f"prompt of {seq.prompt_len} tokens exceeds max_model_len {self.max_model_len}")
        if self.allocator.blocks_for(seq.prompt_len + 1) > self.allocator.num_usable_blocks:
            raise ValueError(f"prompt of {seq.prompt_len} tokens does not fit the KV cache")
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_token_id: int | None = None) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_token_id = stop_token_id
        self.allocator.free(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.seqs.pop(seq.request_id, None)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request at once, freeing its blocks. Returns it (None if unknown / done)."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------ scheduling

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.allocator.free(seq.request_id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        if not seq.prompt_logprobs_sent:
            seq.prompt_logprobs = None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule_continuation(self, pending: list[Sequence]) -> SchedulerOutput | None:
        """The next decode step for `pending`, the sequences of a launched decode step whose tokens the
        host has not read yet (each is one token past its `token_ids`). A sequence for which that token
        is certainly its last (max_tokens or the scheduler's `max_model_len` reached) is left out; one that stops on
        the token anyway (EOS, a stop id, an abort) wastes one row, which the engine drops. None where
        this cannot be planned without the tokens (see the module docstring)."""
        if self.waiting:
            return None
        members = set(pending)
        if any(s not in members for s in self.running):
            return None
        out = SchedulerOutput()
        alloc = self.allocator
        for seq in pending:
            if seq.status is not SeqStatus.RUNNING:
                continue  # finished or aborted since the launch
            n = seq.num_tokens + 1  # with the pending token
            if len(seq.output_token_ids) + 1 >= seq.params.max_tokens or n >= self.max_model_len:
                continue
            if not alloc.holds(seq.request_id, n):
                if not alloc.can_grow(seq.request_id, n):
                    return None  # would need a preemption: decide with the tokens known
                alloc.grow(seq.request_id, n)
            out.decodes.append(ScheduledChunk(seq, seq.num_tokens, 1))
        return out or None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        alloc = self.allocator

        # 1. decodes, in admission order; preempt from the back when the cache is full
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_tokens - seq.num_computed != 1:
                i += 1
                continue
            if alloc.holds(seq.request_id, seq.num_tokens):  # the common case: its last block has room
                out.decodes.append(ScheduledChunk(seq, seq.num_computed, 1))
                budget -= 1
                i += 1
                continue
            while not alloc.can_grow(seq.request_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq preempted itself: it was the last one
            alloc.grow(seq.request_id, seq.num_tokens)
            out.decodes.append(ScheduledChunk(seq, seq.num_computed, 1))
            budget -= 1
            i += 1

        # 2. running sequences in the middle of a (chunked) prefill: blocks already reserved
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed
            if remaining <= 1 or budget <= 0:
                continue
            n = min(remaining, budget)
            alloc.grow(seq.request_id, seq.num_computed + n)
            out.prefills.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n

        # 3. admit waiting requests, FCFS (no skipping: a big head request is not starved by small ones)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not alloc.can_grow(seq.request_id, seq.num_tokens + 1):
                break
            if out.preempted and seq in out.preempted:
                break  # do not re-admit what was just preempted in the same step
            self.waiting.popleft()
            alloc.grow(seq.request_id, seq.num_tokens + 1)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.prefills.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return out
