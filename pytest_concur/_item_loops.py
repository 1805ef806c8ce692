"""Event loops owned by pytest-concur: one per item, one per higher-scoped async fixture.

An item's loop is created the first time an async fixture or an async body of that item
needs it and is closed after the item's teardown, so function-scoped async fixtures and the
body share one loop and the next test never sees it. The loop is driven through
``asyncio.Runner`` (3.11+), which never touches the deprecated event-loop policy because we
always pass a ``loop_factory``: ``_loop_deadlocks.new_loop``, a selector loop that fails at once
when every task waits on something nothing can complete. Python 3.10 has no ``Runner``: :class:`_Runner310` does the
same steps by hand (contextvars set by one call are not seen by the next there).

Closing cancels the tasks left and runs the loop until they end, for at most a grace
period (``concur_leak_grace``): a task that catches ``CancelledError`` and goes on would
otherwise hold the close (``asyncio.Runner.close`` waits for every task) until the test's
deadline, and past it. Such tasks are given up on: their coroutines are closed (so their
``finally`` blocks run and nothing of theirs is left to the garbage collector of a later
test), the loop is closed, and :meth:`LoopRunner.close` returns a report naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any, final

import pytest

from pytest_concur._checks._allow import DEFAULT_GRACE, GRACE_INI, grace
from pytest_concur._errors import DeadlockError
from pytest_concur._loop_deadlocks import new_loop

_ITEM_LOOP = pytest.StashKey["LoopRunner"]()
# How long the loop runs after the given-up tasks' coroutines were closed, for them to end.
_CLOSED_STEP = 0.1
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

    def close(self, grace: float = DEFAULT_GRACE) -> str | None:
        """Cancel what is left, shut down async generators and the default executor, close.

        Tasks still running ``grace`` seconds after they were cancelled are given up on;
        the report returned names them (None when every task ended).
        """
        # The runner's loop if it made one (asyncio.Runner's private attribute, as ours:
        # get_loop() would make one just to close it).
        loop = self._runner._loop
        stubborn: list[asyncio.Task[Any]] = []
        if loop is not None and not loop.is_closed() and not loop.is_running():
            stubborn = _end_tasks(loop, grace)
            if any(not task.done() for task in stubborn):
                loop.close()  # still not done: the runner must not wait for them either
        with contextlib.suppress(RuntimeError):  # a loop we had to close ourselves
            self._runner.close()
        return _stubborn_report(stubborn, grace) if stubborn else None


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


def _end_tasks(loop: asyncio.AbstractEventLoop, grace: float) -> list[asyncio.Task[Any]]:
    """Cancel the loop's tasks and let them end, for ``grace`` seconds: those that did not."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return []
    for task in tasks:
        task.cancel()
    _run_until_done(loop, tasks, grace)
    stubborn = [task for task in tasks if not task.done()]
    for task in stubborn:
        task._log_destroy_pending = False  # type: ignore[attr-defined]  # reported here
        # GeneratorExit where it awaits: its finally blocks run, and the next step the
        # cancellation wakes finds the coroutine closed, which ends the task cancelled.
        with contextlib.suppress(RuntimeError):  # it caught GeneratorExit as well
            task.get_coro().close()
        task.cancel()
    if stubborn:
        _run_until_done(loop, stubborn, _CLOSED_STEP)
        for task in stubborn:
            if task.done() and not task.cancelled():
                task.exception()  # the closed coroutine's error: retrieved, not logged
    return stubborn


def _run_until_done(
    loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task[Any]], seconds: float
) -> None:
    """Run the loop until every task is done, for at most ``seconds``.

    Waits on a plain future, not a task of ours (``asyncio.wait`` would be one): after a
    deadline the loop may still hold a cancellation meant for the task that was running
    when it struck, which would end our wait instead.
    """
    waiter = loop.create_future()
    left = set(tasks)

    def done(task: asyncio.Task[Any]) -> None:
        left.discard(task)
        if not left and not waiter.done():
            waiter.set_result(None)

    for task in tasks:
        task.add_done_callback(done)

    def give_up() -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, give_up)
    try:
        loop.run_until_complete(waiter)
    except asyncio.CancelledError:
        pass  # someone cancelled our wait: what ended meanwhile is all we know
    finally:
        timer.cancel()
        for task in tasks:
            task.remove_done_callback(done)


def _stubborn_report(tasks: list[asyncio.Task[Any]], grace: float) -> str:
    from pytest_concur._checks._where import from_origin, plural

    lines = [
        f"pytest-concur: {plural(len(tasks), 'task')} did not end when cancelled, so the event "
        "loop could not be closed cleanly"
    ]
    for task in tasks:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or repr(coro)
        created = from_origin(getattr(coro, "cr_origin", None))
        where = f" created at {created}" if created.frames else ""
        lines.append(f"  Task {task.get_name()!r} (coroutine={name}){where}")
    them = "it" if len(tasks) == 1 else "them"
    lines.append(
        f"  Still running {grace:g} s after the cancellation ({GRACE_INI}), {them} caught "
        f"CancelledError and went on. pytest-concur gave up on {them}: closed "
        f"{'its coroutine' if len(tasks) == 1 else 'their coroutines'} and the loop. Let "
        "CancelledError propagate: re-raise it after cleaning up (or use "
        "asyncio.timeout() / TaskGroup, which rely on it)."
    )
    return "\n".join(lines)


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
    """Close the item's loop if it was ever created; fail its teardown over stuck tasks."""
    runner = item.stash.get(_ITEM_LOOP, None)
    if runner is not None:
        del item.stash[_ITEM_LOOP]
        problem = runner.close(grace(item.config))
        if problem is not None:
            pytest.fail(problem, pytrace=False)
