"""The ``@throttle`` decorator, with the backend marker on a class.

A marker on a class applies to each of its test methods, parametrized ones included.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from ratelimit import TokenBucket, throttle


@pytest.mark.backend("thread", "process", "asyncio")
class TestThrottle:
    def test_sync_function_called_from_many_threads(self, api):
        bucket = TokenBucket(api.rate, api.burst)

        @throttle(bucket)
        def fetch(key: str) -> str:
            response = api.get(key)
            assert response.status == 200, response
            return response.body

        keys = [f"user-{i}" for i in range(40)]
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(fetch, keys)) == [key.upper() for key in keys]
        assert api.rejected == 0

    @pytest.mark.parametrize("tasks", [1, 10, 50])
    async def test_async_function_called_from_many_tasks(self, api, tasks):
        bucket = TokenBucket(api.rate, api.burst)

        @throttle(bucket)
        async def fetch(key: str) -> int:
            return (await api.get_async(key)).status

        statuses = await asyncio.gather(*(fetch(f"item-{i}") for i in range(tasks)))

        assert statuses == [200] * tasks
        assert api.served == tasks

    @pytest.mark.parametrize("api", [(0.1, 5)], indirect=True, ids=["slow-api"])
    async def test_without_throttle_the_api_says_429(self, api):
        # Proves the fake API really enforces its quota, so the tests above mean something.
        responses = await asyncio.gather(*(api.get_async(str(i)) for i in range(20)))
        assert sorted(r.status for r in responses) == [200] * 5 + [429] * 15

    def test_keeps_the_name_and_docstring(self, bucket):
        @throttle(bucket)
        def lookup(key: str) -> str:
            """Look a key up."""
            return key

        assert (lookup.__name__, lookup.__doc__) == ("lookup", "Look a key up.")

    @pytest.mark.parametrize("tokens", [0, 6])
    def test_rejects_a_cost_the_bucket_cannot_pay(self, bucket, tokens):
        with pytest.raises(ValueError, match="1 to 5 tokens"):
            throttle(bucket, tokens=tokens)
