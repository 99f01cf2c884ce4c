"""``/v1/completions``: from a validated request to engine requests, and back to OpenAI choices.

Every prompt of a batch times every sample is one engine request; choice ``index = i_prompt * n +
i_sample``. The engine requests run concurrently; their events are merged in arrival order. Leaving
early (client disconnect, a stop string, an error) aborts every engine request still running.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine.types import GenerationRequest, SamplingParams, TokenEvent

from .choice import ChoiceSpec, ChoiceState
from .errors import APIError, error_body
from .logprobs import TokenTexts
from .metrics import RequestTimer, ServerMetrics
from .protocol import (CompletionRequest, CompletionResponse, CompletionResponseChoice,
                       CompletionStreamResponse, UsageInfo, completion_id)
from .registry import ModelRegistry, Route

log = logging.getLogger(__name__)

MAX_PROMPTS = 1024  # prompts in one batch request
_DONE = object()


@dataclass
class Prompt:
    text: str  # what echo prepends
    ids: list[int]


@dataclass
class Plan:
    """A request checked against its model: nothing about it can fail validation any more."""

    route: Route
    prompts: list[Prompt]
    params: list[SamplingParams]  # one per sample index (seeds differ)


@dataclass
class Run:
    """One engine request: a choice's state plus its bookkeeping."""

    state: ChoiceState
    request: GenerationRequest | None  # None: nothing to generate (echo with max_tokens 0, no logprobs)
    timer: RequestTimer
    task: asyncio.Task | None = None
    finish_sent: bool = False


class CompletionService:
    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics):
        self.registry = registry
        self.metrics = metrics
        self._texts: dict[int, TokenTexts] = {}

    # -- preparing ---------------------------------------------------------------------------------

    def prepare(self, req: CompletionRequest) -> Plan:
        """Resolve the model and validate everything (before any response byte is sent)."""
        route = self.registry.resolve(req.model)
        req.check()
        engine = route.served.engine
        prompts = self._tokenize(req, engine)
        for p in prompts:
            self._check_length(len(p.ids), req.effective_max_tokens(), route.served.max_model_len)
        samples = req.effective_best_of()
        params = [self._sampling_params(req, engine, i, samples > req.n) for i in range(samples)]
        return Plan(route, prompts, params)

    @staticmethod
    def _tokenize(req: CompletionRequest, engine: Any) -> list[Prompt]:
        batch = req.prompts()
        if len(batch) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} prompts per request, got {len(batch)}", param="prompt")
        tok, vocab = engine.tokenizer, int(engine.vocab_size)
        out = []
        for p in batch:
            if isinstance(p, str):
                ids = list(tok(p, add_special_tokens=req.add_special_tokens)["input_ids"])
                text = p
            else:
                bad = [t for t in p if t >= vocab]
                if bad:
                    raise APIError(f"token id {bad[0]} in prompt is out of vocabulary (size {vocab})",
                                   param="prompt")
                ids = list(p)
                text = tok.decode(ids, skip_special_tokens=req.skip_special_tokens)
            if not ids:
                raise APIError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
            out.append(Prompt(text, ids))
        return out

    @staticmethod
    def _check_length(n_in: int, max_tokens: int, max_len: int) -> None:
        if n_in > max_len or (n_in == max_len and max_tokens > 0):
            raise APIError(f"This model's maximum context length is {max_len} tokens. However, your request "
                           f"has {n_in} input tokens. Please reduce the length of the input messages.",
                           param="input_tokens")
        if n_in + max_tokens > max_len:
            raise APIError(f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is "
                           f"{max_len} tokens and your request has {n_in} input tokens "
                           f"({max_tokens} > {max_len} - {n_in}).", param="max_tokens")

    def _sampling_params(self, req: CompletionRequest, engine: Any, i_sample: int,
                         need_logprobs: bool) -> SamplingParams:
        vocab = int(engine.vocab_size)
        stop_ids = list(req.stop_token_ids or [])
        bad = [t for t in stop_ids if t >= vocab]
        if bad:
            raise APIError(f"stop token id {bad[0]} is out of vocabulary (size {vocab})", param="stop_token_ids")
        if req.min_p:
            raise APIError("min_p is not supported by this server's engine yet", param="min_p")
        top_k = req.top_k if req.top_k is not None else 0
        logprobs = req.logprobs
        if logprobs is None and need_logprobs:
            logprobs = 0
        return SamplingParams(
            max_tokens=req.effective_max_tokens(), min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(top_k, 0),
            seed=None if req.seed is None else req.seed + i_sample,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=req.logit_bias_ids(vocab), stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None)

    def _texts_for(self, engine: Any) -> TokenTexts:
        key = id(engine.tokenizer)
        if key not in self._texts:
            self._texts[key] = TokenTexts(engine.tokenizer)
        return self._texts[key]

    def build_runs(self, req: CompletionRequest, plan: Plan, cmpl_id: str, arrival: float) -> list[Run]:
        served = plan.route.served
        engine = served.engine
        spec = ChoiceSpec(stop=req.stop_strings(), include_stop=req.include_stop_str_in_output,
                          min_tokens=req.min_tokens, logprobs=req.logprobs, echo=req.echo,
                          skip_special_tokens=req.skip_special_tokens,
                          stop_token_ids=frozenset(req.stop_token_ids or ()),
                          eos_token_ids=frozenset(engine.eos_token_ids), ignore_eos=req.ignore_eos)
        texts = self._texts_for(engine)
        runs = []
        samples = len(plan.params)
        for i_prompt, p in enumerate(plan.prompts):
            for i_sample, params in enumerate(plan.params):
                state = ChoiceState(i_prompt * samples + i_sample, spec, engine.tokenizer, texts, p.ids, p.text)
                gen = None
                if params.max_tokens > 0 or params.prompt_logprobs is not None:
                    gen = GenerationRequest(f"{cmpl_id}-{i_prompt}-{i_sample}", p.ids, params)
                runs.append(Run(state, gen, RequestTimer(self.metrics, served.name, arrival)))
        return runs

    # -- running -----------------------------------------------------------------------------------

    async def drive(self, engine: Any, runs: list[Run]) -> AsyncIterator[Run]:
        """Run every engine request; yield a run each time its state changed."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(run: Run) -> None:
            try:
                async for ev in engine.generate(run.request):
                    queue.put_nowait((run, ev))
            except asyncio.CancelledError:
                raise
            except ValueError as e:
                queue.put_nowait((run, APIError(str(e), param="prompt")))
            except Exception as e:  # engine failure: reported, never raised into the server
                log.exception("engine request %s failed", run.request.request_id)
                queue.put_nowait((run, e))
            finally:
                queue.put_nowait((run, _DONE))

        try:
            for run in runs:
                if run.request is None:
                    run.state.add(TokenEvent("", None, finished=True, finish_reason="length"))
                    run.timer.finished("length", time.monotonic())
                    yield run
                else:
                    run.task = asyncio.create_task(pump(run))
            unfinished = sum(not r.state.finished for r in runs)
            while unfinished:
                run, item = await queue.get()
                if run.state.finished:
                    continue  # late events of a run we already ended (stop string)
                if item is _DONE:  # the stream ended without a final event
                    self._finish(engine, run, "abort")
                    unfinished -= 1
                    yield run
                    continue
                if isinstance(item, APIError):
                    raise item
                if isinstance(item, Exception):
                    raise APIError("Internal server error", status=500)
                if item.token_id is not None:
                    run.timer.token(time.monotonic())
                run.state.add(item)
                if item.finish_reason == "error":
                    raise APIError("Internal server error: the engine failed on this request", status=500)
                if run.state.finished:
                    self._finish(engine, run, run.state.finish_reason, engine_done=item.finished)
                    unfinished -= 1
                yield run
        finally:
            for run in runs:
                if not run.state.finished and run.request is not None:
                    self._finish(engine, run, "abort")
                if run.task is not None and not run.task.done():
                    run.task.cancel()

    @staticmethod
    def _finish(engine: Any, run: Run, reason: str, engine_done: bool = False) -> None:
        if run.state.finish_reason is None:
            run.state.finish_reason = reason
        if not engine_done and run.request is not None:
            engine.abort(run.request.request_id)
            if run.task is not None and not run.task.done():
                run.task.cancel()
        run.timer.finished(run.state.finish_reason, time.monotonic())

    # -- responses ---------------------------------------------------------------------------------

    @staticmethod
    def _select(req: CompletionRequest, runs: list[Run], n_prompts: int) -> list[ChoiceState]:
        """Choices in output order; with best_of > n, the n samples of highest mean logprob per prompt."""
        samples = req.effective_best_of()
        states = [r.state for r in runs]
        if samples == req.n:
            return states
        chosen = []
        for i_prompt in range(n_prompts):
            group = states[i_prompt * samples:(i_prompt + 1) * samples]
            best = sorted(group, key=lambda s: -s.mean_logprob())[: req.n]
            chosen.extend(best)
        for i, s in enumerate(chosen):
            s.index = i
        return chosen

    @staticmethod
    def usage(prompts: list[Prompt], runs: list[Run]) -> UsageInfo:
        p = sum(len(x.ids) for x in prompts)
        c = sum(len(r.state.token_ids) for r in runs)
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    async def complete(self, req: CompletionRequest, plan: Plan) -> CompletionResponse:
        cmpl_id, created, arrival = completion_id(), int(time.time()), time.monotonic()
        route, prompts = plan.route, plan.prompts
        runs = self.build_runs(req, plan, cmpl_id, arrival)
        async for _ in self.drive(route.served.engine, runs):
            pass
        choices = []
        for s in self._select(req, runs, len(prompts)):
            choices.append(CompletionResponseChoice(index=s.index, text=s.full_text(),
                                                    logprobs=s.logprobs.out if s.logprobs else None,
                                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        return CompletionResponse(id=cmpl_id, created=created, model=route.public_id, choices=choices,
                                  usage=self.usage(prompts, runs))

    async def stream(self, req: CompletionRequest, plan: Plan) -> AsyncIterator[str]:
        cmpl_id, created, arrival = completion_id(), int(time.time()), time.monotonic()
        route, prompts = plan.route, plan.prompts
        runs = self.build_runs(req, plan, cmpl_id, arrival)

        def event(choices: list[CompletionResponseChoice], usage: UsageInfo | None = None) -> str:
            chunk = CompletionStreamResponse(id=cmpl_id, object="text_completion", created=created,
                                             model=route.public_id, choices=choices)
            if usage is not None:
                chunk.usage = usage
            return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

        try:
            async for run in self.drive(route.served.engine, runs):
                choice = self._stream_choice(run)
                if choice is not None:
                    yield event([choice])
            if req.include_usage():
                yield event([], self.usage(prompts, runs))
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.message, e.status, e.param, e.err_type))}\n\n"
        yield "data: [DONE]\n\n"

    @staticmethod
    def _stream_choice(run: Run) -> CompletionResponseChoice | None:
        s = run.state
        delta = s.take_delta()
        lp = s.logprobs.take_new() if s.logprobs is not None and s.logprobs.has_new() else None
        finish = s.finish_reason if s.finished and not run.finish_sent else None
        if not delta and lp is None and finish is None:
            return None
        if s.logprobs is not None and lp is None:
            lp = s.logprobs.take_new()  # an empty logprobs object keeps the chunk shape uniform
        run.finish_sent = run.finish_sent or finish is not None
        return CompletionResponseChoice(index=s.index, text=delta, logprobs=lp, finish_reason=finish,
                                        stop_reason=s.stop_reason if finish else None)
