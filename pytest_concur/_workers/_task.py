"""Task workers: a task on the running event loop, under the ``asyncio`` backend.

Only for a coroutine function started from async code (``Concur`` decides): plain code could
only wait for a task by blocking the loop that runs it, and ``poll`` says so instead of
hanging. ``cancel()`` cancels the task, from any thread; a task nobody joined is cancelled,
or reported pending when its loop has closed already.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from pytest_concur._workers._run import _poll_async, _Run, _running_loop
from pytest_concur._workers._worker import _CANCELLED, _CURRENT, _ERROR, _OK, Worker

if TYPE_CHECKING:
    import asyncio


@final
class _TaskRun(_Run):
    def __init__(
        self,
        worker: Worker[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.worker = worker
        self.loop = loop
        self.event = threading.Event()  # for a thread that joins the task
        context = contextvars.copy_context()
        context.run(_CURRENT.set, worker)
        coro = fn(*args, **kwargs)
        # The task copies the context it is created in: this one, which names the worker.
        self.task: asyncio.Task[Any] = context.run(loop.create_task, coro, name=worker.name)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.worker._finish(_CANCELLED)
        else:
            error = task.exception()  # retrieved: asyncio will not log it; the fixture reports it
            if error is not None:
                self.worker._finish(_ERROR, error=error)
            else:
                self.worker._finish(_OK, value=task.result())
        self.event.set()

    def poll(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.task.done():
            self._done(self.task)  # its done callback may not have run yet
            return True
        if timeout == 0:
            return False
        if _running_loop() is self.loop or not self.loop.is_running():
            raise RuntimeError(
                f"pytest-concur: worker {self.worker.name!r} is a task on an event loop that "
                + (
                    "runs in this thread: waiting for it here would block that loop forever."
                    if self.loop.is_running()
                    else "is not running: nothing can finish it."
                )
                + " Wait for it from async code: await worker.wait() or await worker. (A "
                "plain def body under the asyncio backend runs inside the loop and cannot "
                "wait for a task: make the test async def.)"
            )
        self.event.wait(timeout)
        return self.task.done()

    async def wait_async(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import asyncio

        if _running_loop() is not self.loop:
            return await _poll_async(self.poll, timeout)
        if not self.task.done():
            await asyncio.wait({self.task}, timeout=timeout)
        return self.poll(0)

    def cancel(self) -> bool:
        if _running_loop() is self.loop:
            self.task.cancel()
        else:
            try:
                self.loop.call_soon_threadsafe(self.task.cancel)
            except RuntimeError:  # the loop is closed: the task will never run again
                return False
        return True

    def stop(self) -> str:
        loop = self.loop
        if loop.is_closed():
            _quiet_destroy(self.task)
            return "still pending, on an event loop already closed"
        self.cancel()
        return "still running; pytest-concur cancelled it"

    def things(self) -> list[object]:
        return [self.task]


def _quiet_destroy(task: asyncio.Task[Any]) -> None:
    # Reported by us; asyncio need not log its destruction as well.
    with contextlib.suppress(AttributeError):  # another Task implementation
        task._log_destroy_pending = False  # type: ignore[attr-defined]
