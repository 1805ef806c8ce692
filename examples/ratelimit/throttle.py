"""``@throttle(bucket)``: every call of the decorated function first takes a token."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ratelimit.bucket import TokenBucket

F = TypeVar("F", bound=Callable[..., Any])


def throttle(bucket: TokenBucket, *, tokens: int = 1) -> Callable[[F], F]:
    """Make every call of the decorated function take ``tokens`` from ``bucket`` first.

    A ``def`` function waits with :meth:`TokenBucket.acquire` (the calling thread sleeps),
    an ``async def`` one with :meth:`TokenBucket.acquire_async` (the calling task waits).
    One bucket may throttle functions of both kinds: they share its budget.
    """
    if not 1 <= tokens <= bucket.capacity:
        raise ValueError(f"a call can take 1 to {bucket.capacity} tokens, not {tokens!r}")

    def decorate(func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def throttled_async(*args: Any, **kwargs: Any) -> Any:
                await bucket.acquire_async(tokens)
                return await func(*args, **kwargs)

            return cast(F, throttled_async)

        @functools.wraps(func)
        def throttled(*args: Any, **kwargs: Any) -> Any:
            bucket.acquire(tokens)
            return func(*args, **kwargs)

        return cast(F, throttled)

    return decorate
