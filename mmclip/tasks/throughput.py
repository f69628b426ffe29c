"""Samples per second over a sliding window, logged by the training tasks."""

from __future__ import annotations

import time


class Throughput:
    """Counts samples between calls and reports a rate once ``window`` seconds have passed.

    The first call only starts the clock (it follows the first step, which includes warm-up).
    """

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._start: float | None = None
        self._seen = 0

    def update(self, samples: int) -> float | None:
        """Adds ``samples`` finished since the last call; returns samples/s when a window closes, else None."""
        now = time.perf_counter()
        if self._start is None:
            self._start = now
            return None
        self._seen += samples
        elapsed = now - self._start
        if elapsed < self.window:
            return None
        rate = self._seen / elapsed
        self._start, self._seen = now, 0
        return rate
