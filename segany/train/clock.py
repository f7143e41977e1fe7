"""The training clock: wall time less the time the process was stopped.

A run on a shared CPU gets paused (``kill -STOP`` / Ctrl-Z, then ``kill -CONT``) to free the cores
for something else, and a laptop sleeps. Neither should eat the run's ``--time-budget-min`` or
move its LR decay. A stopped process runs no threads, so a daemon thread that notes the time every
``tick`` seconds sees a stop (or a suspend) as one long gap between two ticks; a gap beyond
``tick + slack`` is taken out of the clock. No signal handler: it works in any thread and on any OS.
"""
from __future__ import annotations

import threading
import time


class PausingClock:
    """``now()``: seconds like ``time.monotonic()``, without the gaps in which the process was
    stopped (each resolved to within ``tick``). ``close()`` stops the ticker thread."""

    def __init__(self, tick: float = 0.25, slack: float = 1.0) -> None:
        self.tick, self.slack = float(tick), float(slack)
        self.paused = 0.0  # seconds taken out so far
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segany-train-clock", daemon=True)
        self._thread.start()

    def _account(self) -> float:
        with self._lock:
            t = time.monotonic()
            gap = t - self._last
            if gap > self.tick + self.slack:
                self.paused += gap - self.tick
            self._last = t
            return t

    def _run(self) -> None:
        while not self._done.wait(self.tick):
            self._account()

    def now(self) -> float:
        return self._account() - self.paused

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=1.0)

    def __enter__(self) -> "PausingClock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
