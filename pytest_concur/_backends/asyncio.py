"""The ``asyncio`` backend: the body runs as a task on a fresh event loop.

An ``async def`` body is awaited by that task. A plain ``def`` body is called from inside
the task, as a coroutine would call it, so code that looks for a running loop takes its
async-context path. The loop is the item's own (see ``pytest_concur._item_loops``): the same one
its function-scoped async fixtures ran on, closed after the item's teardown.
"""

from __future__ import annotations

import sys
from typing import final

import pytest

from pytest_concur._backends.base import BodyCall


@final
class AsyncioBackend:
    """Run each test body as a task on the item's own event loop, in the main thread."""

    name = "asyncio"
    description = "the test body runs as a task on a fresh asyncio event loop"

    def start(self, item: pytest.Item) -> _AsyncioRunner:
        return _AsyncioRunner()


@final
class _AsyncioRunner:
    def run(self, call: BodyCall) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        try:
            call.run_coroutine(call.call_async())
        except RuntimeError as exc:
            # A sync body's StopIteration cannot leave a coroutine as itself (PEP 479);
            # give it back as the plain run would have raised it.
            cause = exc.__cause__
            if not call.is_async and isinstance(cause, StopIteration):
                raise cause from None
            if not call.is_async and _meets_running_loop(str(exc)):
                _explain_running_loop(exc)
            raise

    def close(self) -> None:
        pass


def _meets_running_loop(message: str) -> bool:
    # asyncio.run() and asyncio.Runner say the first; loop.run_until_complete() and
    # run_forever() on a loop of the body's own say the second.
    return "running event loop" in message or "another loop is running" in message


def _explain_running_loop(exc: RuntimeError) -> None:
    """Say why a sync body met a running loop, and what to do (asyncio.run() in the body)."""
    note = (
        "pytest-concur: under the asyncio backend a plain def test body runs inside the "
        "running event loop, as code called from a coroutine would; asyncio.run() and "
        "loop.run_until_complete() cannot be called there. If this test needs no running "
        'loop, run it under the other backends: @pytest.mark.backend("thread", "process").'
    )
    if sys.version_info >= (3, 11):
        exc.add_note(note)
