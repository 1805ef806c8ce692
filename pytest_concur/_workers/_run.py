"""What every kind of worker run provides, and what the kinds share.

A ``_Run`` is how one kind of worker runs, is waited for and is stopped: a thread
(``_thread``), a task (``_task``) or a process (``_process``); its worker is the
:class:`~pytest_concur._workers._worker.Worker` the test holds. Shared by the kinds:
``_poll_async`` waits, without blocking the event loop, for what cannot wake the loop
itself; ``_call`` runs the worker's function in a thread or a child (a coroutine function
on a fresh event loop, which the worker owns); ``_running_loop`` is the event loop running
in this thread, if any, without importing asyncio when nothing uses it.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pytest_concur._workers._claims import claim

if TYPE_CHECKING:
    import asyncio


class _Run:
    """How one kind of worker runs, is waited for and is stopped."""

    def poll(self, timeout: float | None) -> bool:
        """Whether the worker is over, waiting for at most ``timeout`` seconds (None: ever)."""
        raise NotImplementedError

    async def wait_async(self, timeout: float | None) -> bool:
        """``poll`` without blocking the running event loop."""
        raise NotImplementedError

    def cancel(self) -> bool:
        raise NotImplementedError

    def stop(self) -> str:
        """Stop a worker nobody joined, as far as possible; say what was done."""
        raise NotImplementedError

    def things(self) -> list[object]:
        """The thread, task or process behind the worker (claimed from the leak checks)."""
        raise NotImplementedError

    def extra(self) -> str:
        return ""


async def _poll_async(poll: Callable[[float], bool], timeout: float | None) -> bool:
    """Look at ``poll(0)`` with a backoff of 1, 2, 4 ... ms (at most 50 ms), until ``timeout``.

    For what cannot wake the loop itself (a process): the timers keep the loop's deadlock
    watch from taking the wait for a deadlock, which it is not while the worker runs.
    """
    import asyncio

    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while not poll(0):
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
        else:
            await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call the worker's function; a coroutine runs to completion on a fresh event loop."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    result = fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        from pytest_concur._item_loops import LoopRunner

        runner = LoopRunner()
        try:
            return runner.run(_on_own_loop(result))
        finally:
            runner.close()
    return result


async def _on_own_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coro`` on the worker's fresh loop, which the worker owns, tasks and all."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    import asyncio

    # The fixture reports the worker; the leak checks leave its loop and tasks to it.
    claim([asyncio.get_running_loop()])
    return await coro


def _running_loop() -> asyncio.AbstractEventLoop | None:
    if "asyncio" not in sys.modules:
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
