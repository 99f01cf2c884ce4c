"""Graceful shutdown: ``GracefulServer`` is ``uvicorn.Server`` with a drain phase before uvicorn's own
shutdown.

uvicorn, on SIGTERM, closes the listening socket at once and then waits up to
``timeout_graceful_shutdown`` for the connections it has; a client that comes in meanwhile gets
"connection refused", and ``/health`` cannot say anything. Here the first SIGTERM (or SIGINT) only
starts draining:

1. admission stops (``server.api.admission``): new completion requests are answered 503 with
   ``Retry-After`` and ``Connection: close``, ``/health`` answers 503, the socket stays open;
2. requests in flight run to completion, up to ``shutdown_timeout_s`` after the signal; the ones still
   running then are ended by the admission middleware (an error event and ``[DONE]`` for a stream, 503
   otherwise) and their engine requests aborted;
3. then uvicorn's shutdown runs (socket closed, ``timeout_graceful_shutdown`` for the last bytes to
   go out) and ``serve`` returns: ``modegpt serve`` stops its engines and exits 0.

A second signal skips the rest of the drain: every request is ended at once and the process exits
with the signal (not 0).
"""
from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from .admission import Admission

log = logging.getLogger("modegpt.serve")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission):
        super().__init__(config)
        self.admission = admission
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain ends
        self._force = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (uvicorn installs it for SIGINT and SIGTERM); only sets flags."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.admission.limits.shutdown_timeout_s
            self.admission.start_draining()
            log.info("%s: draining %d request(s) for up to %g s (signal again to stop now)",
                     signal.Signals(sig).name, self.admission.in_flight, self.admission.limits.shutdown_timeout_s)
            return
        self._force = True
        self._captured_signals.append(sig)  # re-raised by uvicorn after its shutdown: a non-zero exit
        self.should_exit = True
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop calls this every 0.1 s; True ends the loop and starts uvicorn's shutdown."""
        if self.drain_deadline is not None and not self.should_exit:
            if self.admission.in_flight == 0:
                log.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                n = self.admission.end_all("shutdown")
                log.warning("shutdown timeout: ending %d request(s) still in flight", n)
                self.should_exit = True
        if self._force and self.admission.in_flight:
            self.admission.end_all("shutdown")
        return await super().on_tick(counter)


__all__ = ["GracefulServer"]
