"""Is a remote backend in service? Consecutive-failure ejection and probe-driven re-admission.

``BackendHealth`` is a small thread-safe state machine fed from two sides: the request path (every
forwarded request's final outcome, after its retries) and ``HealthProber`` (a daemon thread that
probes the backend every ``interval_s``). Each side keeps its own streak: ``eject_after`` failed
requests in a row, or ``eject_after`` failed probes in a row, take an admitted backend out of service
(``up`` False: requests to it are refused at once, the canary routes around it), so a backend that
passes its health checks but fails its requests is ejected too. Re-admission is the prober's:
``readmit_after`` successful probes in a row. (Such a backend may then be ejected again by its next
requests; each cycle costs at most ``eject_after`` failed attempts, which the canary retries on the
other variant.) Subscribers hear every change as ``fn(up, reason)``; they run on the thread that
caused it and must not block.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Subscriber = Callable[[bool, str], None]


class BackendHealth:
    def __init__(self, name: str, eject_after: int = 3, readmit_after: int = 2):
        if eject_after < 1 or readmit_after < 1:
            raise ValueError("eject_after and readmit_after must be at least 1")
        self.name = name
        self.eject_after = eject_after
        self.readmit_after = readmit_after
        self._lock = threading.Lock()
        self._up = True
        self._failures = {"request": 0, "probe": 0}  # consecutive, while admitted
        self._successes = 0  # consecutive probes, while ejected
        self.last_error: str | None = None
        self.ejections = 0
        self._subscribers: list[Subscriber] = []

    @property
    def up(self) -> bool:
        return self._up

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def reset(self, up: bool, reason: str | None = None) -> None:
        """Set the state without counting an ejection (the first probe at startup)."""
        with self._lock:
            changed = up != self._up
            self._up, self._successes = up, 0
            self._failures = {"request": 0, "probe": 0}
            if reason:
                self.last_error = reason
        if changed:
            self._notify(up, reason or ("admitted" if up else "down at startup"))

    def record_success(self, probe: bool = False) -> None:
        with self._lock:
            self._failures["probe" if probe else "request"] = 0
            if self._up or not probe:
                return
            self._successes += 1
            if self._successes < self.readmit_after:
                return
            self._up, self._successes = True, 0
            reason = f"re-admitted after {self.readmit_after} successful check(s)"
        log.warning("backend %s: %s", self.name, reason)
        self._notify(True, reason)

    def record_failure(self, why: str, probe: bool = False) -> None:
        side = "probe" if probe else "request"
        with self._lock:
            self.last_error = why
            if probe:
                self._successes = 0
            if not self._up:
                return
            self._failures[side] += 1
            if self._failures[side] < self.eject_after:
                return
            self._up = False
            self._failures = {"request": 0, "probe": 0}
            self.ejections += 1
            reason = f"ejected after {self.eject_after} consecutive failed {side}s (last: {why})"
        log.warning("backend %s: %s", self.name, reason)
        self._notify(False, reason)

    def _notify(self, up: bool, reason: str) -> None:
        for fn in list(self._subscribers):
            try:
                fn(up, reason)
            except Exception:
                log.exception("backend %s: a health subscriber failed", self.name)

    def snapshot(self) -> dict:
        return {"up": self._up, "ejections": self.ejections, "last_error": self.last_error}


class HealthProber:
    """Calls ``probe()`` (None: healthy, else why not) every ``interval_s`` on a daemon thread and feeds
    the result to ``health``."""

    def __init__(self, health: BackendHealth, probe: Callable[[], str | None], interval_s: float):
        self.health = health
        self.probe = probe
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> None:
        try:
            why = self.probe()
        except Exception as e:  # a probe bug must not kill the thread
            why = f"probe failed: {type(e).__name__}: {e}"
        if why is None:
            self.health.record_success(probe=True)
        else:
            self.health.record_failure(why, probe=True)

    def start(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.check_once()

        self._thread = threading.Thread(target=loop, name=f"backend-health-{self.health.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
