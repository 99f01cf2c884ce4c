"""Background comparisons: score a served answer under both models, and (for a sampled fraction) run the
same request on the other variant first ("shadow run") so both answers can be compared.

``ShadowWorker.submit(job)`` is called after the user's response is complete; it never blocks and never
raises: the job goes on a bounded asyncio queue, or is dropped and counted when the queue is full.
Worker tasks run the shadow generation (same prompt ids, same sampling params), score the answers
under both engines (``divergence.score_continuations``) and hand a ``Comparison`` to every subscriber
(the review module, the metrics, the rollout analysis). Any exception on that path is logged and
counted (``errors``), never propagated. A pair with a remote variant passes its own ``scorer``
(``server.remote.scoring.TopKScorer``: echo scoring with top-k logprobs over the API).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .divergence import Divergence, pooled, score_continuations
from .router import COMPRESSED, ORIGINAL

log = logging.getLogger(__name__)


class VariantUnavailable(RuntimeError):
    """The other variant could not answer or score (e.g. its remote backend is down): an expected
    failure, counted and logged without a traceback."""


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class ShadowJob:
    """What the API hands over once a compared request is answered."""

    request_id: str
    public_id: str
    route_reason: str
    served_variant: str  # "original" | "compressed"
    prompt_text: str
    prompt_ids: list[int]
    served: Output
    started_at: float  # wall clock, request arrival
    finished_at: float  # wall clock, response complete
    # runs the same request on the other variant; None: score the served answer only
    run_other: Callable[[], Awaitable[Output]] | None = None


@dataclass
class Comparison:
    request_id: str
    public_id: str
    route_reason: str
    served_variant: str
    shadow_variant: str | None  # the variant run in the background (None: no shadow run)
    original_model: str
    compressed_model: str
    prompt_text: str
    original_text: str | None
    compressed_text: str | None
    original_token_ids: list[int] | None
    compressed_token_ids: list[int] | None
    exact_match: bool | None  # both texts exist (shadow run) and are identical
    # pooled over every scored continuation; first divergence on the served answer
    kl_mean: float
    kl_max: float
    top1_agreement: float
    logprob_gap: float
    first_divergence_position: int | None
    n_positions: int
    started_at: float
    finished_at: float
    compared_at: float
    per_output: dict[str, Divergence] = field(default_factory=dict)  # variant whose answer -> measures

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(v for v in (self.served_variant, self.shadow_variant) if v)

    @property
    def valid(self) -> bool:
        return self.n_positions > 0 and math.isfinite(self.kl_mean)


Subscriber = Callable[[Comparison], Any]
# (job, outputs in order) -> one Divergence per output
Scorer = Callable[[ShadowJob, list[Output]], Awaitable[list[Divergence]]]


class ShadowWorker:
    def __init__(self, original_engine: Any, compressed_engine: Any, original_id: str, compressed_id: str, *,
                 queue_size: int = 64, workers: int = 1,
                 on_shadow_result: Callable[[str], None] | None = None, scorer: Scorer | None = None):
        self.engines = {ORIGINAL: original_engine, COMPRESSED: compressed_engine}
        self.scorer: Scorer = scorer or self._score_in_process
        self.ids = {ORIGINAL: original_id, COMPRESSED: compressed_id}
        self.queue_size = queue_size
        self.n_workers = workers
        self._on_result = on_shadow_result  # "ok" | "error" | "dropped" (metrics)
        self._subscribers: list[Subscriber] = []
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self.submitted = self.dropped = self.errors = self.compared = self.shadow_runs = 0
        self.subscriber_errors = 0
        self.outstanding = 0  # queued or running jobs

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    # -- queue ---------------------------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue(maxsize=self.queue_size)
            self._tasks = [loop.create_task(self._work(), name=f"canary-shadow-{i}") for i in range(self.n_workers)]
        return self._queue

    def submit(self, job: ShadowJob) -> bool:
        """Queue a job (from the event loop); False if it was dropped. Never raises."""
        try:
            q = self._ensure_started()
            q.put_nowait(job)
            self.submitted += 1
            self.outstanding += 1
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            self._result("dropped")
            return False
        except Exception:  # e.g. no running loop
            log.exception("shadow: could not queue request %s", job.request_id)
            self.errors += 1
            return False

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every queued job is done (tests, shutdown)."""
        if self._queue is not None:
            await asyncio.wait_for(self._queue.join(), timeout)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except BaseException:
                pass
        self._tasks = []
        self._queue = None
        self.outstanding = 0

    def _result(self, what: str) -> None:
        if self._on_result is not None:
            try:
                self._on_result(what)
            except Exception:
                log.exception("shadow: result hook failed")

    async def _work(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            job = await q.get()
            try:
                comparison = await self.compare(job)
            except asyncio.CancelledError:
                raise
            except VariantUnavailable as e:
                self.errors += 1
                log.warning("shadow comparison of request %s failed: %s", job.request_id, e)
            except Exception:
                self.errors += 1
                log.exception("shadow comparison of request %s failed", job.request_id)
            else:
                await self._publish(comparison)
            finally:
                self.outstanding -= 1
                q.task_done()

    async def _publish(self, c: Comparison) -> None:
        for fn in list(self._subscribers):
            try:
                res = fn(c)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                self.subscriber_errors += 1
                log.exception("shadow: subscriber %r failed on request %s", fn, c.request_id)

    # -- one comparison ------------------------------------------------------------------------------

    async def _score_in_process(self, job: ShadowJob, outputs: list[Output]) -> list[Divergence]:
        """Both engines in process: full next-token distributions on the outputs' token ids."""
        return await score_continuations(self.engines[ORIGINAL], self.engines[COMPRESSED], job.prompt_ids,
                                         [o.token_ids for o in outputs])

    async def compare(self, job: ShadowJob) -> Comparison:
        outputs = {job.served_variant: job.served}
        other = COMPRESSED if job.served_variant == ORIGINAL else ORIGINAL
        shadow_variant = None
        if job.run_other is not None:
            try:
                outputs[other] = await job.run_other()
            except Exception:
                self._result("error")
                raise
            shadow_variant = other
            self.shadow_runs += 1
            self._result("ok")
        order = [job.served_variant] + ([other] if shadow_variant else [])
        divs = await self.scorer(job, [outputs[v] for v in order])
        pool = pooled(divs, first_from=0)
        o, c = outputs.get(ORIGINAL), outputs.get(COMPRESSED)
        exact = (o.text == c.text) if (o is not None and c is not None) else None
        self.compared += 1
        return Comparison(
            request_id=job.request_id, public_id=job.public_id, route_reason=job.route_reason,
            served_variant=job.served_variant, shadow_variant=shadow_variant,
            original_model=self.ids[ORIGINAL], compressed_model=self.ids[COMPRESSED], prompt_text=job.prompt_text,
            original_text=o.text if o else None, compressed_text=c.text if c else None,
            original_token_ids=list(o.token_ids) if o else None,
            compressed_token_ids=list(c.token_ids) if c else None, exact_match=exact,
            kl_mean=pool.kl_mean, kl_max=pool.kl_max, top1_agreement=pool.top1_agreement,
            logprob_gap=pool.logprob_gap, first_divergence_position=pool.first_divergence,
            n_positions=pool.n_positions, started_at=job.started_at, finished_at=job.finished_at,
            compared_at=time.time(), per_output=dict(zip(order, divs)))
