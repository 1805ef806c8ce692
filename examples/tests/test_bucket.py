"""TokenBucket under contention.

The module-level ``pytestmark`` runs every test here under all three backends, so each
shows up three times: ``test_...[thread]``, ``test_...[process]`` and ``test_...[asyncio]``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from ratelimit import TokenBucket

pytestmark = pytest.mark.backend("thread", "process", "asyncio")


def hammer(threads: int, attempts: int, action: Callable[[], bool]) -> int:
    """Call ``action`` ``attempts`` times in each of ``threads`` threads started together.

    Returns how many calls returned True.
    """
    start = threading.Barrier(threads)

    def worker() -> int:
        start.wait()
        return sum(action() for _ in range(attempts))

    with ThreadPoolExecutor(threads) as pool:
        return sum(f.result() for f in [pool.submit(worker) for _ in range(threads)])


@pytest.mark.parametrize("threads", [2, 8, 32])
def test_frozen_clock_never_hands_out_more_than_it_refills(bucket, clock, threads, switch_often):
    # Time stands still between refills: however hard the threads pull, they get exactly
    # the 5 tokens the bucket starts with, then exactly what each refill adds.
    assert hammer(threads, attempts=100, action=bucket.try_acquire) == 5
    for _ in range(10):
        clock.advance(0.75)  # 0.75 s at 4 tokens/s: 3 more
        assert hammer(threads, attempts=100, action=bucket.try_acquire) == 3
    assert bucket.available == 0


@pytest.mark.parametrize("api", [(2000.0, 1), (1000.0, 8)], indirect=True, ids=["steady", "bursty"])
@pytest.mark.parametrize("threads", [4, 16])
def test_blocking_acquire_keeps_threads_within_quota(api, threads):
    requests = 48
    started = time.monotonic()
    bucket = TokenBucket(api.rate, api.burst)

    def client(n: int) -> list[int]:
        statuses = []
        for i in range(requests // threads):
            bucket.acquire()
            statuses.append(api.get(f"key-{n}-{i}").status)
        return statuses

    with ThreadPoolExecutor(threads) as pool:
        statuses = [s for batch in pool.map(client, range(threads)) for s in batch]

    assert statuses == [200] * requests
    # The burst goes out at once, the rest at `rate` per second.
    assert time.monotonic() - started >= (requests - api.burst) / api.rate - 1e-3


async def test_threads_and_tasks_share_one_budget(api):
    bucket = TokenBucket(api.rate, api.burst)

    def blocking_client(n: int) -> list[int]:
        statuses = []
        for _ in range(n):
            bucket.acquire()
            statuses.append(api.get("from-a-thread").status)
        return statuses

    async def async_client(n: int) -> list[int]:
        statuses = []
        for _ in range(n):
            await bucket.acquire_async()
            statuses.append((await api.get_async("from-a-task")).status)
        return statuses

    batches = await asyncio.gather(
        *(asyncio.to_thread(blocking_client, 5) for _ in range(3)),
        *(async_client(3) for _ in range(10)),
    )

    assert [s for batch in batches for s in batch] == [200] * 45
    assert (api.served, api.rejected) == (45, 0)


async def test_cancelled_waiter_gives_its_tokens_back(bucket):
    assert bucket.try_acquire(5)
    waiter = asyncio.create_task(bucket.acquire_async())
    await asyncio.sleep(0)  # the waiter reserves a token, 0.25 s away
    assert bucket.available == -1

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert bucket.available == 0
