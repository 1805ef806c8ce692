"""Where a bucket gets the time from: ``time.monotonic`` normally, a manual clock in tests."""

from __future__ import annotations

import threading
from collections.abc import Callable

Clock = Callable[[], float]
"""A clock: seconds as a float, never going backwards (like ``time.monotonic``)."""


class ManualClock:
    """A thread-safe clock that only moves when :meth:`advance` is called.

    With it, refills happen exactly when a test says so. Note that callers who have to
    wait for tokens still sleep in real time: use it with :meth:`TokenBucket.try_acquire`
    and with timeouts shorter than the wait, not to make sleeps instant.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self():g})"

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds!r})")
        with self._lock:
            self._now += seconds
            return self._now
