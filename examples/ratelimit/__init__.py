"""A token-bucket rate limiter that threads and asyncio tasks can share.

    bucket = TokenBucket(rate=5, capacity=10)  # bursts of 10, then 5 per second
    bucket.acquire()                            # in a thread: sleeps until a token is there
    await bucket.acquire_async()                # in a task: waits without blocking its loop

:func:`throttle` puts a bucket in front of a ``def`` or an ``async def`` function.
"""

from ratelimit.bucket import TokenBucket
from ratelimit.clock import Clock, ManualClock
from ratelimit.throttle import throttle

__all__ = ["Clock", "ManualClock", "TokenBucket", "throttle"]
