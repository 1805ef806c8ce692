"""The token bucket: ``capacity`` tokens to spend in a burst, refilled at ``rate`` a second."""

from __future__ import annotations

import asyncio
import threading
import time

from ratelimit.clock import Clock


class TokenBucket:
    """A thread-safe token bucket, shared by threads and asyncio tasks alike.

    The bucket starts full and refills lazily, from the clock, whenever it is used. A
    caller that has to wait *reserves* its tokens first and then sleeps until they have
    been refilled: the balance goes negative, so waiting callers are served in the order
    they arrived instead of all waking up to fight over every new token. Over any period
    of ``t`` seconds the bucket hands out at most ``capacity + rate * t`` tokens.

    The lock is only ever held for a little arithmetic, never while sleeping, so the same
    bucket can be used from many threads and from any number of event loops at once.
    """

    def __init__(self, rate: float, capacity: int, *, clock: Clock = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be a positive number of tokens per second, got {rate!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 token, got {capacity!r}")
        self.rate = float(rate)
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._updated = clock()

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self.rate:g}, capacity={self.capacity}, "
            f"available={self.available:.2f})"
        )

    @property
    def available(self) -> float:
        """Tokens that could be taken right now; negative while callers wait for theirs."""
        with self._lock:
            self._refill()
            return self._tokens

    def try_acquire(self, tokens: int = 1) -> bool:
        """Take ``tokens`` if they are there right now, and say whether it did. Never waits."""
        return self._reserve(tokens, max_wait=0.0) is not None

    def acquire(self, tokens: int = 1, timeout: float | None = None) -> None:
        """Take ``tokens``, putting the calling thread to sleep until they are refilled.

        Raises ``TimeoutError``, having taken nothing, if that would take longer than
        ``timeout`` seconds. Raises ``RuntimeError`` when called from a thread that is
        running an event loop, where sleeping would freeze every task of that loop.
        """
        if _in_event_loop():
            raise RuntimeError(
                "TokenBucket.acquire() would block the running event loop; "
                "use 'await bucket.acquire_async()' in async code"
            )
        delay = self._reserve_or_raise(tokens, timeout)
        if delay > 0:
            time.sleep(delay)

    async def acquire_async(self, tokens: int = 1, timeout: float | None = None) -> None:
        """Take ``tokens``, suspending the calling task (not its loop) until they are refilled.

        Raises ``TimeoutError`` as :meth:`acquire` does. A task cancelled while it waits
        gives its reserved tokens back.
        """
        delay = self._reserve_or_raise(tokens, timeout)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self._give_back(tokens)
                raise

    def _reserve_or_raise(self, tokens: int, timeout: float | None) -> float:
        delay = self._reserve(tokens, max_wait=timeout)
        if delay is None:
            raise TimeoutError(f"{tokens} token(s) not available within {timeout} s")
        return delay

    def _reserve(self, tokens: int, max_wait: float | None) -> float | None:
        """Reserve ``tokens`` and return how long until they are ours; ``None`` if too long."""
        if not 1 <= tokens <= self.capacity:
            raise ValueError(f"can take 1 to {self.capacity} tokens at a time, not {tokens!r}")
        with self._lock:
            self._refill()
            delay = max(0.0, (tokens - self._tokens) / self.rate)
            if max_wait is not None and delay > max_wait:
                return None
            self._tokens -= tokens
            return delay

    def _give_back(self, tokens: int) -> None:
        with self._lock:
            self._refill()
            self._tokens = min(float(self.capacity), self._tokens + tokens)

    def _refill(self) -> None:
        """Add the tokens accrued since the last update. The caller holds the lock."""
        now = self._clock()
        if now > self._updated:
            accrued = (now - self._updated) * self.rate
            self._tokens = min(float(self.capacity), self._tokens + accrued)
            self._updated = now


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
