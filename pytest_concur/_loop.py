"""Event loops owned by pytest-concur: one per item, one per higher-scoped async fixture.

An item's loop is created the first time an async fixture or an async body of that item
needs it and is closed after the item's teardown, so function-scoped async fixtures and the
body share one loop and the next test never sees it. The loop is driven through
``asyncio.Runner`` (3.11+), which never touches the deprecated event-loop policy because we
always pass a ``loop_factory``: ``_loopwatch.new_loop``, a selector loop that fails at once
when every task waits on something nothing can complete. Python 3.10 has no ``Runner``: :class:`_Runner310` does the
same steps by hand (contextvars set by one call are not seen by the next there).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, final

import pytest

from pytest_concur._locks import DeadlockError
from pytest_concur._loopwatch import new_loop

_ITEM_LOOP = pytest.StashKey["LoopRunner"]()
# What makes an item's loop, if not new_loop (schedule exploration: see _explore).
_LOOP_FACTORY = pytest.StashKey[Callable[[], asyncio.AbstractEventLoop]]()


@final
class LoopRunner:
    """Runs coroutines to completion on one private event loop, then closes it."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_loop) -> None:
        if sys.version_info >= (3, 11):
            self._runner: Any = asyncio.Runner(loop_factory=loop_factory)
        else:  # pragma: no cover - exercised by the py310 tox env
            self._runner = _Runner310(loop_factory)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` as a task on this runner's loop, from the calling thread."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        try:
            return self._runner.run(coro)
        except DeadlockError as exc:
            if not getattr(exc, "from_loop", False):
                raise
            # Raised out of the loop's select(): its traceback is asyncio's internals, not
            # the test's. The message carries every task's await chain.
            raise DeadlockError(str(exc)) from None

    def close(self) -> None:
        """Cancel what is left, shut down async generators and the default executor, close."""
        self._runner.close()


class _Runner310:  # pragma: no cover - exercised by the py310 tox env
    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_factory = loop_factory

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._loop is None:
            self._loop = self._loop_factory()
        return self._loop.run_until_complete(self._loop.create_task(coro))

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def item_loop(item: pytest.Item) -> LoopRunner:
    """The item's own loop runner, created on first use."""
    runner = item.stash.get(_ITEM_LOOP, None)
    if runner is None:
        runner = item.stash[_ITEM_LOOP] = LoopRunner(item.stash.get(_LOOP_FACTORY, new_loop))
    return runner


def set_loop_factory(item: pytest.Item, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Make ``item``'s loop with ``factory`` instead of ``new_loop``; before it is made."""
    if _ITEM_LOOP in item.stash:
        raise RuntimeError(f"{item.nodeid}: its event loop exists already")
    item.stash[_LOOP_FACTORY] = factory


def close_item_loop(item: pytest.Item) -> None:
    """Close the item's loop if it was ever created."""
    runner = item.stash.get(_ITEM_LOOP, None)
    if runner is not None:
        del item.stash[_ITEM_LOOP]
        runner.close()
