"""Thread workers: a thread of its own for each worker, the kind most backends get.

Under the ``thread`` backend, with no backend, under any other backend but ``process``, and
under ``asyncio`` for what cannot be a task: not the loop's default executor, which would
hide the worker among the loop's own workers, unnamed. A coroutine function runs on a fresh
event loop in that thread. The worker's code sees the starter's context variables.

Waits that can be tracked are: joining a thread worker is ``Thread.join``, so a worker stuck
on a lock its joiner holds is a diagnosed deadlock, not a hang. Nothing stops a thread from
outside: ``cancel()`` only sets the flag that ``concur.cancelled()`` reports.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from pytest_concur._workers._run import _call, _Run
from pytest_concur._workers._worker import _CURRENT, _ERROR, _OK, _RUNNING, Worker

if TYPE_CHECKING:
    import asyncio


@final
class _ThreadRun(_Run):
    def __init__(
        self,
        worker: Worker[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.worker = worker
        # The worker sees the starter's context variables, as the thread backend's body sees
        # its fixtures', plus which worker it is.
        context = contextvars.copy_context()
        context.run(_CURRENT.set, worker)
        self.thread = threading.Thread(
            target=_ThreadBody(worker, context, fn, args, kwargs),
            name=worker.name,
            # Not a daemon, as the threads of a plain run are not, so that the threads it
            # starts are not either; one left running is guarded at exit (see _judge).
            daemon=False,
        )

    def start(self) -> None:
        self.thread.start()

    def poll(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if timeout == 0:
            with self.worker._lock:
                finished = self.worker._state != _RUNNING
            return finished and not self.thread.is_alive()
        # Thread.join: the deadlock check sees who joins whom (without a timeout).
        self.thread.join(timeout)
        return not self.thread.is_alive()

    async def wait_async(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import asyncio

        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_resolve, woken)

        if self.worker._on_finish(wake):
            try:
                if timeout is None:
                    await woken
                else:
                    await asyncio.wait_for(woken, timeout)
            except asyncio.TimeoutError:
                return False
            finally:
                self.worker._forget_callback(wake)
        # The outcome is in; the thread is on its last lines.
        self.thread.join()
        return True

    def cancel(self) -> bool:
        return True  # the flag is set; the worker's code decides

    def stop(self) -> str:
        return "still running"  # the fixture says how long it waited

    def things(self) -> list[object]:
        return [self.thread]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@final
class _ThreadBody:
    """A thread worker's target; named as the worker's function, for reports."""

    def __init__(
        self,
        worker: Worker[Any],
        context: contextvars.Context,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.worker = worker
        self.context = context
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.__qualname__ = worker._target

    def __call__(self) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self.context.run(self._run)

    def _run(self) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        try:
            value = _call(self.fn, self.args, self.kwargs)
        except BaseException as exc:  # every outcome is the worker's, SystemExit included
            self.worker._finish(_ERROR, error=exc)
        else:
            self.worker._finish(_OK, value=value)
        finally:
            # Not kept alive by the thread object for as long as someone holds it.
            self.fn = self.args = self.kwargs = None  # type: ignore[assignment]
