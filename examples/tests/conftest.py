"""Fixtures shared by the example tests.

pytest-concur sets fixtures up and tears them down in the pytest process, as usual, and
hands their values to the test body wherever its backend runs it. Under ``process`` the
body runs in a forked child: it gets a copy of every fixture value, and what it changes in
that copy stays in the child.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

import pytest
from ratelimit import ManualClock, TokenBucket


class Response(NamedTuple):
    status: int
    body: str


class FakeAPI:
    """An in-memory stand-in for a remote HTTP API with a documented quota.

    It allows a burst of ``burst`` requests, then ``rate`` requests per second on average
    since the client was opened, and answers 429 to any request over that. Like most HTTP
    clients it is thread-safe and has a blocking and an async method.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.served = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._opened_at: float | None = None

    async def open(self) -> None:
        await asyncio.sleep(0)  # a real client would connect here
        self._opened_at = time.monotonic()

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self._opened_at = None

    def get(self, key: str) -> Response:
        with self._lock:
            if self._opened_at is None:
                raise RuntimeError("the API client is closed")
            # 1e-3: room for float rounding, not for a request too many.
            allowed = self.burst + self.rate * (time.monotonic() - self._opened_at) + 1e-3
            if self.served + 1 > allowed:
                self.rejected += 1
                return Response(429, "Too Many Requests")
            self.served += 1
        return Response(200, key.upper())

    async def get_async(self, key: str) -> Response:
        await asyncio.sleep(0)  # the network round trip
        return self.get(key)


@pytest.fixture
def clock() -> ManualClock:
    """A clock that stands still until the test advances it."""
    return ManualClock()


@pytest.fixture
def bucket(clock: ManualClock) -> TokenBucket:
    """A full bucket of 5 tokens refilled at 4 per second of the manual ``clock``."""
    return TokenBucket(rate=4, capacity=5, clock=clock)


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Make the interpreter switch threads every microsecond instead of every 5 ms.

    Threads then interleave in many more places, so a missing lock shows up as a failure
    instead of needing luck. Set here, in the pytest process, it holds in the test body
    under every backend: the "process" backend's child inherits it when it is forked.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
async def api(request: pytest.FixtureRequest) -> AsyncIterator[FakeAPI]:
    """An opened :class:`FakeAPI`, closed again on teardown.

    1000 requests per second in bursts of 5, unless a test parametrizes it indirectly with
    ``(rate, burst)``. pytest-concur runs this ``async def`` fixture on the test's own event
    loop, so it works for ``def`` and ``async def`` tests and under every backend.
    """
    rate, burst = getattr(request, "param", (1000.0, 5))
    client = FakeAPI(rate, burst)
    await client.open()
    yield client
    await client.aclose()
