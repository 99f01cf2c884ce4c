"""``/v1/completions``: from a validated request to engine requests, and back to OpenAI choices.

Every prompt of a batch times every sample is one engine request; choice ``index = i_prompt * n +
i_sample``. The engine requests run concurrently; their events are merged in arrival order. Leaving
early (client disconnect, a stop string, an error) aborts every engine request still running.

Canary routes (``Route.canary`` set): a request the router sent to the compressed model that fails
(engine error, or no first event within the stall timeout) before any output was sent is retried on
the original, invisibly; the outcome goes to the canary (rollout analysis, tripwire, metrics); after
the response is complete, a sampled request is handed to the shadow worker (comparison, optional
shadow run on the other variant). ``plan.route`` always names the variant that actually answered. A
failed original attempt of a request the router placed itself (weight, sticky, fallback) is retried on
the compressed model when that is up (``failover``).

Remote models (``route.served.remote``): ``plan_for`` leaves tokenizing and length checks to the
backend, and the one attempt of ``_complete_runs`` / ``_stream_body`` forwards the request
(``server.remote.forward``); the canary logic around attempts is the same for both kinds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.canary.shadow import Output, VariantUnavailable
from server.engine.types import EngineStoppedError, GenerationRequest, SamplingParams, TokenEvent
from server.remote.forward import RemoteCompletions

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
        self.remote = RemoteCompletions()
        self._texts: dict[int, TokenTexts] = {}

    # -- preparing ---------------------------------------------------------------------------------

    def prepare(self, req: CompletionRequest, headers: Any = None) -> Plan:
        """Resolve the model and validate everything (before any response byte is sent). ``headers``
        (the HTTP request's) feed the canary router."""
        route = self.registry.resolve(req.model, headers, req.user)
        req.check()
        return self.plan_for(req, route)

    def plan_for(self, req: CompletionRequest, route: Route) -> Plan:
        """``req`` checked against ``route``'s model. An in-process model tokenizes and checks lengths
        here; a remote model's backend does that itself (its 4xx answers reach the client as they are)."""
        if route.served.remote is not None:
            return Plan(route, [Prompt(p if isinstance(p, str) else "", []) for p in req.prompts()], [])
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

    def build_runs(self, req: CompletionRequest, plan: Plan, cmpl_id: str, arrival: float,
                   timed: bool = True) -> list[Run]:
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
                timer = RequestTimer(self.metrics, served.name, arrival) if timed else _NullTimer()
                runs.append(Run(state, gen, timer))
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
            except EngineStoppedError as e:  # shut down while the request was being routed
                queue.put_nowait((run, APIError(str(e), status=503)))
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
                    self._finish(engine, run, "error", engine_done=True)  # counted as an error in the metrics
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
        if plan.route.canary is not None:
            return await self._complete_canary(req, plan)
        resp, _ = await self._complete_runs(req, plan)
        return resp

    async def _complete_runs(self, req: CompletionRequest, plan: Plan, stall_s: float | None = None,
                             timed: bool = True) -> tuple[CompletionResponse, Output | None]:
        """One attempt: the response, and its first choice as an ``Output`` (for comparisons). A remote
        model's attempt has no stall timeout (its backend's read timeout applies)."""
        cmpl_id, created, arrival = completion_id(), int(time.time()), time.monotonic()
        route, prompts = plan.route, plan.prompts
        if route.served.remote is not None:
            return await self.remote.complete(req, route, cmpl_id)
        runs = self.build_runs(req, plan, cmpl_id, arrival, timed)
        async for _ in _first_within(self.drive(route.served.engine, runs), stall_s):
            pass
        choices = []
        for s in self._select(req, runs, len(prompts)):
            choices.append(CompletionResponseChoice(index=s.index, text=s.full_text(),
                                                    logprobs=s.logprobs.out if s.logprobs else None,
                                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        resp = CompletionResponse(id=cmpl_id, created=created, model=route.public_id, choices=choices,
                                  usage=self.usage(prompts, runs))
        return resp, _first_output(runs)

    async def stream(self, req: CompletionRequest, plan: Plan) -> AsyncIterator[str]:
        if plan.route.canary is not None:
            async for chunk in self._stream_canary(req, plan):
                yield chunk
            return
        cmpl_id, created, arrival = completion_id(), int(time.time()), time.monotonic()
        try:
            async for chunk in self._stream_body(req, plan, cmpl_id, created, arrival, []):
                yield chunk
        except APIError as e:
            yield _sse_error(e)
        yield "data: [DONE]\n\n"

    async def _stream_body(self, req: CompletionRequest, plan: Plan, cmpl_id: str, created: int, arrival: float,
                           first_out: list, stall_s: float | None = None) -> AsyncIterator[str]:
        """The data events of one attempt (errors are raised, not written); once it is complete,
        ``first_out`` holds its first choice as an ``Output``."""
        route, prompts = plan.route, plan.prompts
        if route.served.remote is not None:
            async for chunk in _first_within(self.remote.stream(req, route, cmpl_id, first_out), stall_s):
                yield chunk
            return
        runs = self.build_runs(req, plan, cmpl_id, arrival)

        def event(choices: list[CompletionResponseChoice], usage: UsageInfo | None = None) -> str:
            chunk = CompletionStreamResponse(id=cmpl_id, object="text_completion", created=created,
                                             model=route.public_id, choices=choices)
            if usage is not None:
                chunk.usage = usage
            return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

        async for run in _first_within(self.drive(route.served.engine, runs), stall_s):
            choice = self._stream_choice(run)
            if choice is not None:
                yield event([choice])
        if req.include_usage():
            yield event([], self.usage(prompts, runs))
        first_out[:] = [_first_output(runs)]

    # -- canary routes -----------------------------------------------------------------------------

    def _retry_elsewhere(self, req: CompletionRequest, plan: Plan, failure: str) -> None:
        """Point ``plan`` at the variant the canary retries a failed attempt on (nothing was sent yet)."""
        route = plan.route
        new = self.plan_for(req, self.registry.canary_route(route.canary.retry_decision(route.decision),
                                                            route.requested))
        log.warning("%s attempt failed (%s); retrying the request on the %s", route.variant, failure,
                    new.route.variant)
        plan.route, plan.prompts, plan.params = new.route, new.prompts, new.params

    async def _complete_canary(self, req: CompletionRequest, plan: Plan) -> CompletionResponse:
        route = plan.route
        canary, decision = route.canary, route.decision
        arrival, wall = time.monotonic(), time.time()
        failure = None
        try:
            resp, first = await self._complete_runs(req, plan, _stall_for(route))
        except Exception as e:
            if not _retryable(route, e):
                if _server_error(e):
                    canary.record(decision, route.variant, False, None, _describe(e))
                raise
            failure = _describe(e)
            self._retry_elsewhere(req, plan, failure)
            try:
                resp, first = await self._complete_runs(req, plan)
            except Exception as e2:
                canary.record(decision, plan.route.variant, False, None, failure)
                raise e2
        canary.record(decision, plan.route.variant, True, time.monotonic() - arrival, failure)
        if failure is None:
            self._offer_comparison(req, plan, first, resp.id, wall)
        return resp

    async def _stream_canary(self, req: CompletionRequest, plan: Plan) -> AsyncIterator[str]:
        route = plan.route
        canary, decision = route.canary, route.decision
        cmpl_id, created, arrival, wall = completion_id(), int(time.time()), time.monotonic(), time.time()
        failure = None
        sent = False
        first: list[Output | None] = []
        try:
            try:
                async for chunk in self._stream_body(req, plan, cmpl_id, created, arrival, first, _stall_for(route)):
                    sent = True
                    yield chunk
            except Exception as e:
                if sent or not _retryable(route, e):
                    raise
                failure = _describe(e)
                self._retry_elsewhere(req, plan, failure)
                async for chunk in self._stream_body(req, plan, cmpl_id, created, arrival, first):
                    yield chunk
            canary.record(decision, plan.route.variant, True, time.monotonic() - arrival, failure)
            if failure is None:
                self._offer_comparison(req, plan, first[0] if first else None, cmpl_id, wall)
        except APIError as e:
            if _server_error(e):
                canary.record(decision, plan.route.variant, False, None, failure or _describe(e))
            yield _sse_error(e)
        except _Stall as e:
            canary.record(decision, plan.route.variant, False, None, _describe(e))
            yield _sse_error(APIError("Internal server error: the engine stalled", status=500))
        yield "data: [DONE]\n\n"

    def _offer_comparison(self, req: CompletionRequest, plan: Plan, first: Output | None, cmpl_id: str,
                          started: float) -> None:
        """Hand a sampled answered request (``first``: its first choice) to the canary's shadow worker
        (never raises). A remote answer to a token-id prompt has no prompt text to score: not compared."""
        from server.canary.shadow import ShadowJob

        route = plan.route
        try:
            compare, shadow = route.canary.sample(route.requested, route.decision)
            prompt = plan.prompts[0]
            if not compare or first is None or not (first.token_ids or first.text) or not (prompt.ids or prompt.text):
                return
            job = ShadowJob(request_id=cmpl_id, public_id=route.canary.public_id, route_reason=route.reason,
                            served_variant=route.variant, prompt_text=prompt.text, prompt_ids=list(prompt.ids),
                            served=first, started_at=started, finished_at=time.time(),
                            run_other=self._other_runner(req, plan, cmpl_id) if shadow else None)
            route.canary.submit(job)
        except Exception:
            log.exception("canary: could not queue a comparison of %s", cmpl_id)

    def _other_runner(self, req: CompletionRequest, plan: Plan, cmpl_id: str):
        """A coroutine factory: the request's first prompt and first sample on the other variant, with the
        same sampling params (seed included), not timed in the vLLM metrics (a remote backend counts it in
        its own)."""
        from server.canary.router import COMPRESSED, ORIGINAL

        route = plan.route
        other_variant = ORIGINAL if route.variant == COMPRESSED else COMPRESSED
        other = route.canary.served(other_variant)
        one = req.model_copy(update={"prompt": req.prompts()[0], "n": 1, "best_of": None, "echo": False,
                                     "logprobs": None, "stream": False, "stream_options": None})

        async def run() -> Output:
            if not other.up:
                raise VariantUnavailable(f"{other.name} is out of service")
            sub = self.plan_for(one, Route(other.name, other, variant=other_variant))
            try:
                _, out = await self._complete_runs(one, sub, timed=False)
            except APIError as e:
                if e.status < 500:
                    raise
                raise VariantUnavailable(f"{other.name}: {e.message}") from None
            if out is None:
                raise RuntimeError(f"{other.name}: the shadow run produced no comparable output")
            return out

        return run

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


class _NullTimer:
    """A timer that records nothing (shadow runs stay out of the vLLM latency metrics)."""

    def token(self, now: float) -> None:
        pass

    def finished(self, reason: str, now: float) -> None:
        pass


class _Stall(Exception):
    """No first event from the engine within the stall timeout."""


async def _first_within(events: AsyncIterator, timeout: float | None) -> AsyncIterator:
    """``events``, where the first item must come within ``timeout`` seconds (else ``_Stall``)."""
    it = events.__aiter__()
    first = timeout is not None
    try:
        while True:
            try:
                item = await (asyncio.wait_for(it.__anext__(), timeout) if first else it.__anext__())
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise _Stall(f"no output within {timeout:g} s") from None
            first = False
            yield item
    finally:
        await it.aclose()


def _stall_for(route: Route) -> float | None:
    return route.canary.stall_timeout_s if route.variant == "compressed" else None


def _server_error(e: Exception) -> bool:
    return not isinstance(e, APIError) or e.status >= 500


def _retryable(route: Route, e: Exception) -> bool:
    """A canary attempt that failed on the server side (not on the request) is retried where the canary
    says (``Canary.retry_decision``: compressed -> original; original -> compressed when that is up)."""
    return (_server_error(e) and route.canary is not None
            and route.canary.retry_decision(route.decision) is not None)


def _first_output(runs: list[Run]) -> Output | None:
    """The first run (prompt 0, sample 0) as a compared output; None when nothing was generated."""
    if not runs or runs[0].request is None:
        return None
    s = runs[0].state
    return Output(s.text, list(s.token_ids), s.finish_reason)


def _describe(e: Exception) -> str:
    if isinstance(e, _Stall):
        return f"stall: {e}"
    if isinstance(e, APIError):
        return f"error: {e.message}"
    return f"error: {type(e).__name__}: {e}"


def _sse_error(e: APIError) -> str:
    return f"data: {json.dumps(error_body(e.message, e.status, e.param, e.err_type))}\n\n"
