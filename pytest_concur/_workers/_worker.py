"""The ``Worker`` handle: what ``concur.start()`` returns, whatever kind of worker runs.

A :class:`Worker` is joined with ``join()``, ``result()``, ``exception()`` or, in async
code, ``await worker.wait()`` / ``await worker``; these wait, and ``join()``, ``result()``
and ``wait()`` raise the worker's exception. ``cancel()`` cancels a task, terminates a
process (then kills it) and, for a thread, which nothing can stop, sets a flag the
worker's code polls with ``concur.cancelled()``.

The worker holds the outcome and who waits for it; how it runs, is waited for and is
stopped is its run's business (``_run``, and a module per kind: ``_thread``, ``_task``,
``_process``), which records the outcome with ``_finish``. Its state is only touched under
its own lock (see the package's docstring).
"""

from __future__ import annotations

import contextvars
import traceback
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from pytest_concur._checks._where import Site
from pytest_concur._errors import WorkerTimeoutError
from pytest_concur._primitives import allocate_lock as _real_lock
from pytest_concur._stacks import PACKAGE

if TYPE_CHECKING:
    from concurrent.futures import CancelledError

    from pytest_concur._workers._run import _Run

_T = TypeVar("_T")

_RUNNING, _OK, _ERROR, _CANCELLED = "running", "ok", "error", "cancelled"

# The worker whose code is running (its thread's or task's context).
_CURRENT: contextvars.ContextVar[Worker[Any] | None] = contextvars.ContextVar(
    "pytest_concur_worker", default=None
)


@final
class Worker(Generic[_T]):
    """A thread, task or process started by ``concur.start()``, to join before the test ends.

    ``kind`` is ``"thread"``, ``"task"`` or ``"process"``; ``name`` names it in reports (and
    is its thread's, task's or process's name); ``site`` is where it was started.
    """

    def __init__(self, name: str, kind: str, target: str, site: Site, in_body: bool) -> None:
        self.name = name
        self.kind = kind
        self._target = target
        self._site = site
        self._lock = _real_lock()
        self._state = _RUNNING
        self._value: Any = None
        self._error: BaseException | None = None
        self._error_tb: Any = None
        self._error_text = ""  # a process worker's traceback, as the child formatted it
        self._callbacks: list[Callable[[], None]] = []
        self._joined = False
        self._retrieved = False
        self._cancel_requested = False
        self._judged = False
        self._in_body = in_body
        self._run: _Run | None = None

    # -- the public API -------------------------------------------------------------------

    @property
    def site(self) -> str:
        """Where the worker was started: ``file:line in function``."""
        return str(self._site)

    def done(self) -> bool:
        """Whether the worker has finished (returned, raised or been cancelled)."""
        return self._runner().poll(0)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to finish; raise its exception if it raised one.

        A cancelled worker joins without error. ``timeout`` (seconds): raise
        :class:`WorkerTimeoutError` if the worker is still running by then.
        """
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self._wait(timeout)
        self._raise_error()

    def result(self, timeout: float | None = None) -> _T:
        """Wait for the worker and return its result; raise its exception, with its traceback.

        A cancelled worker raises ``concurrent.futures.CancelledError``.
        """
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self._wait(timeout)
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the worker and return its exception, or ``None`` if it returned.

        A cancelled worker raises ``concurrent.futures.CancelledError``.
        """
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self._wait(timeout)
        with self._lock:
            state, error = self._state, self._error
            self._retrieved = True
        if state == _CANCELLED:
            raise _cancelled_error(self)
        return error

    def cancel(self) -> bool:
        """Ask the worker to stop; ``False`` if it had already finished.

        A task is cancelled (it may still run its ``finally`` blocks: join it). A process is
        sent SIGTERM, then SIGKILL after a second, and reaped: that counts as joining it. A
        thread cannot be stopped from outside: its code sees the request through
        ``concur.cancelled()`` and should return soon after; join it.
        """
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._cancel_requested = True
        return self._runner().cancel()

    def cancelled(self) -> bool:
        """Whether the worker ended cancelled (a task cancelled, a process terminated)."""
        with self._lock:
            return self._state == _CANCELLED

    async def wait(self, timeout: float | None = None) -> None:
        """``join()`` for async code: wait without blocking the event loop; raise its error."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        _check_timeout(timeout)
        if not await self._runner().wait_async(timeout):
            raise self._timeout_error(timeout)
        self._mark_joined()
        self._raise_error()

    def __await__(self) -> Generator[Any, None, _T]:
        """``await worker``: ``result()`` for async code, without blocking the event loop."""
        return self._result_async().__await__()

    def __repr__(self) -> str:
        with self._lock:
            state = self._state
        return f"<Worker {self.name!r} {self.describe()} started at {self._site}: {state}>"

    # -- for the fixture ------------------------------------------------------------------

    def describe(self) -> str:
        """What it is, for reports: ``(thread, target=fetch)``."""
        extra = self._run.extra() if self._run is not None else ""
        return f"({self.kind}{extra}, target={self._target})"

    async def _result_async(self) -> _T:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        await self._runner().wait_async(None)
        self._mark_joined()
        return self._outcome()

    def _runner(self) -> _Run:
        run = self._run
        assert run is not None, "a worker is started before it is handed out"
        return run

    def _wait(self, timeout: float | None) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        _check_timeout(timeout)
        if not self._runner().poll(timeout):
            raise self._timeout_error(timeout)
        self._mark_joined()

    def _mark_joined(self) -> None:
        with self._lock:
            self._joined = True

    def _timeout_error(self, timeout: float | None) -> WorkerTimeoutError:
        return WorkerTimeoutError(
            f"pytest-concur: worker {self.name!r} {self.describe()} started at {self._site} "
            f"did not finish within {timeout:g} s; it is still running. Wait longer, or "
            "cancel() it and join it."
        )

    def _raise_error(self) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        with self._lock:
            error, tb = self._error, self._error_tb
            self._retrieved = True
        if error is not None:
            raise error.with_traceback(tb)

    def _outcome(self) -> _T:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        with self._lock:
            state, value = self._state, self._value
        if state == _CANCELLED:
            raise _cancelled_error(self)
        self._raise_error()
        return value  # type: ignore[no-any-return]

    def _finish(self, state: str, value: Any = None, error: BaseException | None = None) -> None:
        """Record how the worker ended (once), then wake who waits for it."""
        with self._lock:
            if self._state != _RUNNING:
                return
            self._state, self._value, self._error = state, value, error
            self._error_tb = error.__traceback__ if error is not None else None
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _on_finish(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` when the worker finishes; ``False`` (not added) if it has."""
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._callbacks.append(callback)
            return True

    def _forget_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def _error_report(self) -> str:
        """The worker's exception and its traceback, for a report."""
        with self._lock:
            error, tb, text = self._error, self._error_tb, self._error_text
        if text:
            return text.rstrip()
        assert error is not None
        return "".join(traceback.format_exception(type(error), error, _user_tb(tb))).rstrip()


def _cancelled_error(worker: Worker[Any]) -> CancelledError:
    from concurrent.futures import CancelledError

    return CancelledError(f"pytest-concur: worker {worker.name!r} was cancelled")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:  # also rejects nan
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


def _user_tb(tb: Any) -> Any:
    """The traceback from the first frame outside pytest-concur (the worker's own code)."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(PACKAGE):
        tb = tb.tb_next
    return tb
