"""The bucket's public API, with the backend marker on individual functions.

The last two tests have no marker: they run once, as plain pytest tests, unless you ask
for backends on the command line with ``--concur-backends=thread,process,asyncio``.
"""

from __future__ import annotations

import asyncio

import pytest
from ratelimit import ManualClock, TokenBucket


@pytest.mark.backend("thread", "process", "asyncio")
def test_blocking_acquire_refuses_to_freeze_an_event_loop(bucket, concur_backend):
    if concur_backend == "asyncio":
        # Under "asyncio" a plain `def` body is called from a task on a running event
        # loop, the way async code would call a sync helper. Sleeping here would stall
        # every task on that loop, so the bucket refuses, and takes nothing.
        assert asyncio.get_running_loop().is_running()
        with pytest.raises(RuntimeError, match="acquire_async"):
            bucket.acquire()
        assert bucket.available == 5
    else:
        # In a worker thread ("thread") or a child process ("process") blocking is fine.
        bucket.acquire(2)
        assert bucket.available == 3


@pytest.mark.backend("thread", "process", "asyncio")
async def test_timeout_fails_fast_and_takes_nothing(bucket, clock):
    assert bucket.try_acquire(5)
    with pytest.raises(TimeoutError):
        await bucket.acquire_async(timeout=0.05)  # the next token is 0.25 s away
    assert bucket.available == 0

    clock.advance(0.25)
    await bucket.acquire_async(timeout=0)
    assert bucket.available == 0


@pytest.mark.backend("thread", "process", "asyncio")
@pytest.mark.parametrize(("advance", "expected"), [(0.125, 2.5), (0.5, 4.0), (60.0, 5.0)])
def test_refill_is_capped_at_capacity(bucket, clock, advance, expected):
    assert bucket.try_acquire(3)
    clock.advance(advance)
    assert bucket.available == pytest.approx(expected)


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (-5, 1), (float("nan"), 1), (1, 0)])
def test_rejects_a_nonsense_configuration(rate, capacity):
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity)


def test_manual_clock_only_moves_forward():
    clock = ManualClock(start=100.0)
    assert clock.advance(2.5) == clock() == 102.5
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
