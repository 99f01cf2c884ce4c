"""The engine: scheduler + model runner + sampler, one `step()` at a time.

`LLMEngine` is single-threaded and deterministic (tests and offline use drive it directly);
`server.engine.async_engine.AsyncEngine` runs it in a background thread for the API server.

A step: schedule -> run the flat batch -> prompt logprobs for prompt positions -> sample the rows that
reached the end of their known tokens -> append tokens, check stops -> emit one `TokenEvent` per
request that produced something. Finish reasons: "stop" (EOS unless ignore_eos, or a stop token id;
`stop_token_id` set for stop_token_ids only, as vLLM's `stop_reason`), "length" (max_tokens or
max_model_len), "abort". A request with `max_tokens == 0` gets one final event carrying only its
prompt logprobs.

Async scheduling (as vLLM's `--async-scheduling`; on by default where decode steps replay CUDA graphs;
`async_scheduling=` or env `MODEGPT_ASYNC_SCHEDULING=0/1`):
- a decode-only step is left in flight, its sampled tokens on the device;
- the next `step()` plans the following decode step (`Scheduler.schedule_continuation`) and launches
  it with those tokens as inputs (`ModelRunner.execute(..., input_ids=)`); only then does it read the
  tokens back and do the host work of the step in flight (append, stop checks, events), while the GPU
  runs the next step;
- events therefore come one `step()` later; the tokens are the same. A row whose sequence stopped (EOS,
  stop id, abort) in the step in flight is computed once more and dropped;
- penalties and min_tokens count the pending token on the device (`Sampler.launch(pending_tokens=)`);
- steps that need the tokens on the host to be planned (admissions, prefills, preemptions) wait for
  them first, as without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from server.engine.runner import ModelRunner, StepResult
from server.engine.sampler import PendingSample, Sampler, make_generator, top_logprobs
from server.engine.scheduler import Scheduler, SchedulerOutput, Sequence, SeqStatus
from server.engine.transfer import to_device
from server.engine.types import EngineStats, GenerationRequest, SamplingParams, TokenEvent


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(t) for t in eos]


_ASYNC_ENV = "MODEGPT_ASYNC_SCHEDULING"


def async_scheduling_enabled(flag: bool | None, runner: ModelRunner) -> bool:
    """`flag`, else env `MODEGPT_ASYNC_SCHEDULING` ("0"/"1"), else on where decode steps replay CUDA
    graphs (there the host's work per step is otherwise GPU idle time; on CPU the forward runs on the
    host thread, so nothing overlaps)."""
    if flag is not None:
        return bool(flag)
    env = os.environ.get(_ASYNC_ENV)
    if env in ("0", "1"):
        return env == "1"
    return runner.use_graphs


@dataclass
class _Launched:
    """A step whose forward and sampling are enqueued on the device and whose host work is not done."""
    out: SchedulerOutput
    res: StepResult
    sample: PendingSample
    rows: list[Sequence]


class LLMEngine:
    def __init__(self, config: dict, state_dict: dict[str, Tensor], *, device="cpu",
                 dtype: torch.dtype = torch.float32, kv_cache_bytes: int, max_model_len: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 eos_token_id: int | list[int] | None = None, kv_cache_dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True, compile: bool = False, cuda_graph_max_len: int = 4096,
                 use_kernels: bool | None = None, async_scheduling: bool | None = None):
        mpe = int(config["max_position_embeddings"])
        self.max_model_len = min(int(max_model_len or mpe), mpe) if config["position_type"] == "learned" \
            else int(max_model_len or mpe)
        self.max_num_batched_tokens = int(max_num_batched_tokens or max(2048, max_num_seqs))
        self.config = config
        self.vocab_size = int(config["vocab_size"])
        self.runner = ModelRunner(config, state_dict, device=device, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
                                  block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                  kv_cache_dtype=kv_cache_dtype, cuda_graphs=cuda_graphs, compile=compile,
                                  cuda_graph_max_len=cuda_graph_max_len, use_kernels=use_kernels,
                                  max_num_batched_tokens=self.max_num_batched_tokens)
        self.device = self.runner.device
        if eos_token_id is None:
            eos_token_id = config.get("eos_token_id")
        self.eos_token_ids = _eos_list(eos_token_id)
        self.scheduler = Scheduler(self.runner.kv.allocator, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.sampler = Sampler(self.eos_token_ids)
        self._stats = EngineStats()
        self.async_scheduling = async_scheduling_enabled(async_scheduling, self.runner)
        self._in_flight: _Launched | None = None
        self.num_steps_ahead = 0  # steps launched before the previous step's tokens were read back

    # ------------------------------------------------------------------------------ requests

    def validate(self, req: GenerationRequest) -> None:
        p: SamplingParams = req.params
        V = self.vocab_size
        if not req.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        if any(not (0 <= int(t) < V) for t in req.prompt_token_ids):
            raise ValueError(f"prompt token id out of range [0, {V})")
        if len(req.prompt_token_ids) > self.max_model_len:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens exceeds max_model_len {self.max_model_len}")
        alloc = self.runner.kv.allocator
        if alloc.blocks_for(len(req.prompt_token_ids) + 1) > alloc.num_usable_blocks:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens does not fit the KV cache "
                             f"({alloc.num_usable_blocks * alloc.block_size} tokens)")
        if p.max_tokens < 0 or p.min_tokens < 0:
            raise ValueError("max_tokens and min_tokens must be >= 0")
        if p.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not (0.0 < p.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if p.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        for n in (p.logprobs, p.prompt_logprobs):
            if n is not None and not (0 <= n <= V):
                raise ValueError(f"logprobs must be in [0, {V}]")

    def add_request(self, req: GenerationRequest) -> None:
        self.validate(req)
        seq = Sequence(request_id=req.request_id, prompt_token_ids=[int(t) for t in req.prompt_token_ids],
                       params=req.params, generator=make_generator(req.params.seed, self.device))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> TokenEvent | None:
        """Abort now; the cache blocks are freed immediately. Returns the final event (None if unknown)."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self._stats.requests_finished_total += 1
        return TokenEvent(request_id=request_id, token_id=None, finished=True, finish_reason="abort")

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    def flush(self) -> list[TokenEvent]:
        """Complete the step in flight, if any, and return its events: afterwards the host's state
        (tokens, cache accounting) is current and `scheduler.schedule()` may be called directly."""
        prev, self._in_flight = self._in_flight, None
        return self._complete(prev) if prev is not None else []

    def drop_in_flight(self) -> None:
        """Forget a launched step without reading it (after a failure, or once every request of it was
        finished elsewhere)."""
        self._in_flight = None

    # ------------------------------------------------------------------------------ step

    def step(self) -> list[TokenEvent]:
        """Advance by one step; the events of the step whose host work this call did (with async
        scheduling that may be the previous launch, and a call that only launches returns [])."""
        prev = self._in_flight
        if prev is not None:
            self._in_flight = None  # a failure below must not leave it to be completed again
            self._in_flight = self._launch_ahead(prev)
            return self._complete(prev)
        out = self.scheduler.schedule()
        if not out:
            return []
        launched = self._launch(out, self.runner.execute(out))
        if self.async_scheduling and self._can_defer(launched):
            self._in_flight = launched
            return []
        return self._complete(launched)

    def _launch(self, out: SchedulerOutput, res: StepResult, pending_tokens: Tensor | None = None) -> _Launched:
        self._stats.num_steps_total += 1
        rows = [c.seq for c, _ in res.sample_rows]
        logits = res.logits
        if rows:
            picked = [r for _, r in res.sample_rows]
            if picked != list(range(logits.shape[0])):  # decode steps: every row, in order
                logits = logits.index_select(0, to_device(picked, torch.long, logits.device))
            sample = self.sampler.launch(logits, rows, pending_tokens)
        else:
            sample = PendingSample.empty()
        return _Launched(out, res, sample, rows)

    @staticmethod
    def _can_defer(step: _Launched) -> bool:
        """A decode-only step in which every row samples: the next step can be launched ahead of it."""
        out = step.out
        return not out.prefills and bool(out.decodes) and len(step.rows) == len(out.decodes)

    def _launch_ahead(self, prev: _Launched) -> _Launched | None:
        """Plan and launch the decode step after `prev` with its sampled tokens as inputs; None where
        it needs them on the host first (see the module docstring)."""
        if not (self.async_scheduling and self._can_defer(prev)):
            return None
        out = self.scheduler.schedule_continuation(prev.rows)
        if out is None:
            return None
        index = {id(s): i for i, s in enumerate(prev.rows)}
        rows = [index[id(c.seq)] for c in out.decodes]
        ids = prev.sample.tokens
        if rows != list(range(len(prev.rows))):
            ids = ids.index_select(0, to_device(rows, torch.long, ids.device))
        self.num_steps_ahead += 1
        return self._launch(out, self.runner.execute(out, input_ids=ids), pending_tokens=ids)

    def _complete(self, step: _Launched) -> list[TokenEvent]:
        """The host work of a launched step: read its tokens back, append them, check stops, events.
        Sequences finished since the launch (a stop in the step before, an abort) are skipped."""
        sched = self.scheduler
        out, res, rows = step.out, step.res, step.rows
        events: dict[str, TokenEvent] = {}
        tokens, lps = step.sample.result()

        for c, row, count in res.prompt_rows:
            seq = c.seq
            targets = seq.token_ids[c.start + 1:c.start + 1 + count]
            lp = torch.log_softmax(res.logits[row:row + count], dim=-1)
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
            seq.prompt_logprobs.extend(top_logprobs(lp, targets, [seq.params.prompt_logprobs] * count))

        for c in out.chunks:
            seq = c.seq
            if seq.status is SeqStatus.FINISHED:
                continue
            if seq.num_preemptions == 0 and c.start < seq.prompt_len:
                self._stats.prompt_tokens_total += min(c.end, seq.prompt_len) - c.start
            seq.num_computed = c.end

        for c in out.chunks:  # prompt-only requests (max_tokens == 0)
            seq = c.seq
            if seq.params.max_tokens == 0 and c.completes_prefill and seq.status is not SeqStatus.FINISHED:
                ev = TokenEvent(request_id=seq.request_id, token_id=None, finished=True, finish_reason="length")
                if seq.wants_prompt_logprobs:
                    ev.prompt_logprobs = seq.prompt_logprobs or [None]
                    seq.prompt_logprobs_sent = True
                sched.finish(seq, "length")
                self._stats.requests_finished_total += 1
                events[seq.request_id] = ev

        for seq, tok, lp in zip(rows, tokens, lps):
            if seq.status is SeqStatus.FINISHED:
                continue
            p = seq.params
            seq.output_token_ids.append(tok)
            seq.token_ids.append(tok)
            self._stats.generation_tokens_total += 1
            ev = TokenEvent(request_id=seq.request_id, token_id=tok, logprob=lp)
            if seq.wants_prompt_logprobs:
                ev.prompt_logprobs = seq.prompt_logprobs or [None]
                seq.prompt_logprobs_sent = True
            reason, stop_id = None, None
            if tok in p.stop_token_ids:
                reason, stop_id = "stop", tok
            elif not p.ignore_eos and tok in self.eos_token_ids:
                reason = "stop"
            elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                ev.finished, ev.finish_reason, ev.stop_token_id = True, reason, stop_id
                sched.finish(seq, reason, stop_id)
                self._stats.requests_finished_total += 1
            events[seq.request_id] = ev
        self._stats.num_preemptions_total = sched.num_preemptions
        return list(events.values())

    # ------------------------------------------------------------------------------ helpers

    def run_to_completion(self, reqs: Iterable[GenerationRequest]) -> dict[str, list[TokenEvent]]:
        """Add all requests, step until done; events per request id (offline / tests)."""
        out: dict[str, list[TokenEvent]] = {}
        for r in reqs:
            self.add_request(r)
            out[r.request_id] = []
        while self.has_work():
            for ev in self.step():
                out.setdefault(ev.request_id, []).append(ev)
        return out

    def score(self, token_ids: list[list[int]]) -> list[Tensor]:
        res = self.runner.score(token_ids)
        self._stats.num_score_sequences_total += len(token_ids)
        return res

    def stats(self) -> EngineStats:
        s = self._stats
        kv = self.runner.kv
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage(), kv_cache_blocks=kv.allocator.num_usable_blocks,
            kv_cache_tokens=kv.capacity_tokens, prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total, num_preemptions_total=s.num_preemptions_total,
            requests_finished_total=s.requests_finished_total, num_steps_total=s.num_steps_total,
            num_score_sequences_total=s.num_score_sequences_total)
