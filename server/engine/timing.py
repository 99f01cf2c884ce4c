"""Timing an engine's prefill and decode phases: the loop the engine benchmarks share.

With async scheduling a `step()` call may only launch a step or only complete one, so steps are counted
from the engine's own forward-step counter (`EngineStats.num_steps_total`), not from calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from server.engine.engine import LLMEngine


@dataclass
class PhaseTimes:
    prefill_s: float
    prefill_steps: int
    decode_s: float
    decode_steps: int

    @property
    def ms_per_decode_step(self) -> float:
        return 1000 * self.decode_s / max(self.decode_steps, 1)


def prefill_then_decode(engine: LLMEngine) -> PhaseTimes:
    """Step the requests already added through their prompts (every one decoding), then to completion;
    the wall time and forward steps of each phase, the device synchronised at each boundary."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    steps = lambda: engine.stats().num_steps_total  # noqa: E731
    sync()
    t, n = time.perf_counter(), steps()
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
        engine.step()
    sync()
    prefill_s, prefill_steps = time.perf_counter() - t, steps() - n
    t, n = time.perf_counter(), steps()
    while engine.has_work():
        engine.step()
    sync()
    return PhaseTimes(prefill_s, prefill_steps, time.perf_counter() - t, steps() - n)
