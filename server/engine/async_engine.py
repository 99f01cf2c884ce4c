"""`AsyncEngine`: one model's `LLMEngine` driven by a background thread, for an asyncio server.

Design decisions:
- The step loop runs in its own daemon thread, so the FastAPI event loop is never blocked by a
  forward pass (PyTorch releases the GIL inside kernels). Several AsyncEngines (one per model) coexist
  in one process, each with its own thread, KV cache and (on CUDA) its own stream, so two models on
  one GPU can overlap.
- The engine state (scheduler, cache) is touched ONLY by that thread. `generate`, `abort` and `score`
  post commands to a thread-safe queue that the thread drains between steps; requests therefore join
  and leave at step boundaries, and an abort frees its cache blocks before the next step is scheduled.
- Events go back to the caller's event loop with `loop.call_soon_threadsafe`, batched once per step per
  loop. Leaving the `generate` iterator early (client disconnect, `aclose`, cancellation) aborts the
  request.
- `score()` (teacher-forced full-vocabulary log-probs, e.g. for divergence between models) is served
  by the same thread off the critical path: a score batch runs when no generation work is pending, or
  at most once every `score_interleave` steps while generation is busy, so it neither starves nor
  stalls decodes by more than one bounded forward.
- A failure inside a step finishes every in-flight request with `finish_reason="error"` and frees the
  cache; the engine keeps serving new requests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import deque
from typing import AsyncIterator, Callable

import torch
from torch import Tensor

from server.engine.engine import LLMEngine
from server.engine.types import EngineStats, EngineStoppedError, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, model_id: str, config: dict, state_dict: dict[str, Tensor], tokenizer, device="cpu",
                 dtype: torch.dtype = torch.bfloat16, kv_cache_bytes: int = 1 << 30, max_model_len: int | None = None,
                 *, block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 eos_token_id: int | list[int] | None = None, kv_cache_dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True, compile: bool = False, cuda_graph_max_len: int = 4096,
                 use_kernels: bool | None = None, async_scheduling: bool | None = None,
                 score_interleave: int = 8):
        self.model_id = model_id
        self.tokenizer = tokenizer
        if eos_token_id is None:
            eos_token_id = config.get("eos_token_id")
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # the engine thread pins its device with set_device, which needs an index (torch 2.11
            # raises on a bare "cuda": found on the H200, where it killed the thread and hung requests)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        with self._device_ctx():
            self.engine = LLMEngine(config, state_dict, device=device, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
                                    max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, eos_token_id=eos_token_id,
                                    kv_cache_dtype=kv_cache_dtype, cuda_graphs=cuda_graphs, compile=compile,
                                    cuda_graph_max_len=cuda_graph_max_len, use_kernels=use_kernels,
                                    async_scheduling=async_scheduling)
        self.score_interleave = max(1, int(score_interleave))
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._score_jobs: deque[tuple[list[list[int]], concurrent.futures.Future]] = deque()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False  # set by shutdown(): requests fail instead of restarting the thread
        self._stats = self.engine.stats()
        # Fault injection for tests (never set in production): a callable run in the engine thread before
        # every step. An exception from it is handled exactly like a failed step (every request in
        # flight ends with finish_reason "error"); a sleep in it stalls the engine for that long.
        self.fault: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------ properties

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_id(self) -> int | None:
        ids = self.engine.eos_token_ids
        return ids[0] if ids else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.engine.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread (idempotent; also restarts an engine that was shut down)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.model_id}", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; in-flight requests finish with "abort", pending score calls fail, and later
        `generate` / `score` calls raise `EngineStoppedError` until `start()` is called again."""
        self._closed = True
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------ public API

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the events of one request. Raises ValueError for an invalid request (before any event)."""
        self.engine.validate(req)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if req.request_id in self._streams:
                raise ValueError(f"duplicate request id {req.request_id!r}")
            self._streams[req.request_id] = (loop, q)
        try:
            self._ensure_running()
        except EngineStoppedError:
            with self._streams_lock:
                self._streams.pop(req.request_id, None)
            raise
        self._post(("add", req))
        finished = False
        try:
            while True:
                ev: TokenEvent = await q.get()
                finished = ev.finished
                yield ev
                if finished:
                    break
        finally:
            if not finished:
                self.abort(req.request_id)
            with self._streams_lock:
                self._streams.pop(req.request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread). Its blocks are freed before the next step."""
        self._post(("abort", request_id))

    async def score(self, token_ids: list[list[int]]) -> list[Tensor]:
        """Full-vocabulary log-probs `[L, V]` (float32, CPU) for every position of each sequence."""
        return await asyncio.wrap_future(self.submit_score(token_ids))

    def score_sync(self, token_ids: list[list[int]], timeout: float | None = None) -> list[Tensor]:
        """Blocking variant of `score` for non-async callers (never call it from the event loop)."""
        return self.submit_score(token_ids).result(timeout)

    def submit_score(self, token_ids: list[list[int]]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._ensure_running()
        self._post(("score", (token_ids, fut)))
        return fut

    def stats(self) -> EngineStats:
        """Latest snapshot (refreshed by the engine thread after every step and command)."""
        return self._stats

    def _ensure_running(self) -> None:
        """Start lazily on the first request, but never bring back an engine that was shut down
        (a request racing a graceful shutdown must fail, not restart the model)."""
        if self._closed:
            raise EngineStoppedError(f"model {self.model_id!r} is not running (shut down)")
        self.start()

    # ------------------------------------------------------------------------------ the thread

    def _device_ctx(self):
        if self._stream is not None:
            return torch.cuda.stream(self._stream)
        import contextlib
        return contextlib.nullcontext()

    def _post(self, cmd) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    def _emit(self, events: list[TokenEvent]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            for ev in events:
                target = self._streams.get(ev.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass

    def _queued_commands(self):
        """The commands posted so far, each taken off the queue as it is yielded."""
        while True:
            try:
                yield self._cmds.get_nowait()
            except queue.Empty:
                return

    def _drain_commands(self) -> None:
        events = []
        for kind, arg in self._queued_commands():
            if kind == "add":
                try:
                    self.engine.add_request(arg)
                except Exception as e:  # invalid late (e.g. duplicate): report as an error event
                    log.warning("request %s rejected: %s", arg.request_id, e)
                    events.append(TokenEvent(arg.request_id, None, finished=True, finish_reason="error"))
            elif kind == "abort":
                ev = self.engine.abort(arg)
                if ev is not None:
                    events.append(ev)
            elif kind == "score":
                self._score_jobs.append(arg)
        self._stats = self.engine.stats()  # refreshed before the events go out: a consumer sees it
        if events:
            self._emit(events)

    def _run_score_job(self) -> None:
        token_ids, fut = self._score_jobs.popleft()
        if not fut.set_running_or_notify_cancel():
            return
        try:
            res = self.engine.score(token_ids)
        except Exception as e:
            fut.set_exception(e)
        else:
            fut.set_result(res)

    def _fail_all(self, reason: str) -> None:
        sched = self.engine.scheduler
        self.engine.drop_in_flight()
        events = []
        for seq in list(sched.running) + list(sched.waiting):
            sched.finish(seq, reason)
            events.append(TokenEvent(seq.request_id, None, finished=True, finish_reason=reason))
        self._stats = self.engine.stats()
        self._emit(events)

    def _loop(self) -> None:
        """Serve until shutdown. If serving itself fails (outside a step, which `_serve` handles), every
        pending caller gets an error, and the thread retries rather than dying: a dead thread would
        leave later requests queued forever."""
        while True:
            try:
                self._serve()
                return
            except Exception:  # noqa: BLE001
                log.exception("engine %s: engine thread failed; failing pending requests", self.model_id)
                self._fail_pending("error")
                if self._stop:
                    return
                self._wake.wait(0.5)  # a retry per new command (or twice a second), not a spin
                self._wake.clear()

    def _fail_pending(self, reason: str) -> None:
        """After a failure of the thread: every request in flight or still queued ends with ``reason``
        and every score call fails, so no caller waits forever."""
        events = []
        for kind, arg in self._queued_commands():
            if kind == "add":
                events.append(TokenEvent(arg.request_id, None, finished=True, finish_reason=reason))
            elif kind == "score":
                self._score_jobs.append(arg)
        try:
            self._fail_all(reason)
        except Exception:  # noqa: BLE001 - the scheduler itself may be what failed
            log.exception("engine %s: could not finish the scheduled requests", self.model_id)
        # and every stream still open, whose "add" may not even have been posted yet: its generate()
        # ends on this event (a stream reads nothing after its final event)
        with self._streams_lock:
            events += [TokenEvent(rid, None, finished=True, finish_reason=reason) for rid in self._streams]
        self._emit(events)
        while self._score_jobs:
            _, fut = self._score_jobs.popleft()
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(f"engine {self.model_id!r} failed"))

    def _serve(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        steps_since_score = 0
        with self._device_ctx():
            while not self._stop:
                self._wake.clear()  # cleared before draining: a later post always wakes the wait below
                self._drain_commands()
                did = False
                if self.engine.has_work():
                    try:
                        if self.fault is not None:
                            self.fault()
                        events = self.engine.step()
                    except Exception:
                        log.exception("engine %s: step failed", self.model_id)
                        self._fail_all("error")
                        events = []
                    self._stats = self.engine.stats()
                    self._emit(events)
                    did = True
                    steps_since_score += 1
                if self._score_jobs and (not self.engine.has_work() or steps_since_score >= self.score_interleave):
                    self._run_score_job()
                    steps_since_score = 0
                    did = True
                self._stats = self.engine.stats()
                if not did:
                    self._wake.wait(0.5)
            # shutdown: finish everything
            self._drain_commands()
            self._fail_all("abort")
            while self._score_jobs:
                _, fut = self._score_jobs.popleft()
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError("engine shut down"))
            self._stats = self.engine.stats()


def _deliver(items) -> None:
    for q, ev in items:
        q.put_nowait(ev)
