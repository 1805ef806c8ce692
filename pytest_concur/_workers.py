"""Workers a test starts itself: the ``concur`` fixture, its ``Worker`` and ``expect_clean()``.

Design. ``concur.start(fn, *args, **kwargs)`` runs ``fn`` in a worker of the test's own
backend, so one test body exercises the code under each concurrency model:

- ``thread`` backend, no backend, any other backend: a daemon thread (a coroutine function
  runs on a fresh event loop in that thread);
- ``asyncio``: a task on the running loop when ``fn`` is a coroutine function started from
  async code (plain code could only wait for a task by blocking the loop that runs it);
  otherwise a thread as above (not the loop's default executor, which would hide it among
  the loop's own workers, unnamed);
- ``process``: a ``multiprocessing`` child started like the backend's own (same start
  method; ``auto`` resolved at each start). The function and arguments travel by pickle
  unless the child is forked; the result or the exception comes back by pickle through a
  pipe, the child's formatted traceback with it.

A :class:`Worker` is joined with ``join()``, ``result()``, ``exception()`` or, in async
code, ``await worker.wait()`` / ``await worker``; these wait, and ``join()``, ``result()``
and ``wait()`` raise the worker's exception. ``cancel()`` cancels a task, terminates a
process (then kills it) and, for a thread, which nothing can stop, sets a flag the
worker's code polls with ``concur.cancelled()``.

Judgement. A worker nobody joined, and a worker whose exception nobody retrieved, fail the
test; what is still running is then stopped where possible (tasks cancelled, processes
terminated; threads get the grace period and are left running). Where that happens:

- workers started by the body of a test that runs under a backend are judged where the
  body runs, right after it, by a check's watch (``WorkersCheck``): under the ``process``
  backend the body, and its workers, live in a child that pytest's fixture teardown never
  sees. The watch ends before the leak checks' (it is registered after them), so the test
  fails once, with the fixture's words;
- workers started anywhere else (plain tests, fixtures that use ``concur``) are judged at
  the fixture's teardown, which fails with an error at teardown.

No double reports. The thread, task or process of each worker is *claimed* when it starts
(:func:`claimed`): the leak checks (per test, per fixture, and ``expect_clean()``) leave
claimed things to this module. ``expect_clean()`` claims what it judged, so the per-test
checks do not report it again.

``expect_clean()`` records, with the leak checks' own recordings (threads, tasks,
processes), what the code in its block starts, and judges it with their own verdicts when
the block ends, after the grace period (``concur_leak_grace``); ``async with`` waits for
that period without blocking the loop. It honours the test's allow-list, not
``checks_off`` (the block asked to be checked).

Invariants: the state of a ``Concur`` and of each ``Worker`` is only touched under its own
lock, a real one (the deadlock check swaps ``threading.Lock`` during bodies, and our
bookkeeping must not be tracked); no user code runs while one is held. Waits that can be
tracked are: joining a thread worker is ``Thread.join``, so a worker stuck on a lock its
joiner holds is a diagnosed deadlock, not a hang. A ``Concur`` pickles to a fresh one with
the same settings and no workers (the ``process`` backend sends it to its child).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import pickle
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final, overload

import pytest

from pytest_concur import _locks
from pytest_concur._checks import _allow
from pytest_concur._checks._where import Site, callable_name, here, plural, settle
from pytest_concur._errors import WorkerProcessTraceback, WorkerTimeoutError
from pytest_concur._locks import _real_allocate_lock as _real_lock

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import CancelledError
    from multiprocessing.process import BaseProcess

    from pytest_concur._checks._leak import LeakWatch, Recording

FIXTURE = "concur"
_T = TypeVar("_T")

_RUNNING, _OK, _ERROR, _CANCELLED = "running", "ok", "error", "cancelled"
# How long a process worker gets between SIGTERM and SIGKILL when it is cancelled.
_TERMINATE_GRACE = 1.0

# The worker whose code is running (its thread's or task's context).
_CURRENT: contextvars.ContextVar[Worker[Any] | None] = contextvars.ContextVar(
    "pytest_concur_worker", default=None
)


# -- claims: what this module reports itself ------------------------------------------------

_claims_lock = _real_lock()
_claims: weakref.WeakSet[Any] = weakref.WeakSet()


def claim(things: Iterable[object]) -> None:
    """Take over reporting ``things``: the leak checks leave them alone."""
    with _claims_lock:
        for thing in things:
            # Not weakly referenceable: never claimed, the leak checks keep it.
            with contextlib.suppress(TypeError):
                _claims.add(thing)


def claimed(thing: object) -> bool:
    """Whether this module reports ``thing`` (a worker's thread, task or process) itself."""
    with _claims_lock:
        try:
            return thing in _claims
        except TypeError:
            return False


# -- workers ----------------------------------------------------------------------------------


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
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_locks._PACKAGE):
        tb = tb.tb_next
    return tb


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call the worker's function; a coroutine runs to completion on a fresh event loop."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    result = fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        from pytest_concur._loop import LoopRunner

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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    if "asyncio" not in sys.modules:
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@final
class _ProcessRun(_Run):
    def __init__(
        self,
        worker: Worker[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        start_method: str,
    ) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import multiprocessing

        from pytest_concur._backends.process import resolve_auto

        self.worker = worker
        method, why = start_method, ""
        if method == "auto":
            method, why = resolve_auto()
        # auto forks only while no thread of the test runs: the harness's own are no news.
        self._quiet_fork = method == "fork" and start_method == "auto"
        if method != "fork":
            _check_picklable(worker, fn, args, kwargs, method, why)
        context: Any = multiprocessing.get_context(method)
        self._reader, writer = context.Pipe(duplex=False)
        self.process: BaseProcess = context.Process(
            target=_ProcessBody(worker.name, worker._target, fn, args, kwargs, writer),
            name=worker.name,
            # Not a daemon: a worker may start processes of its own.
            daemon=False,
        )
        self._writer = writer
        self._io = _real_lock()  # one reader of the pipe at a time
        self._received = False
        self._payload: bytes | None = None
        self._over = False
        self._terminated = False

    def start(self) -> None:
        try:
            with warnings.catch_warnings():
                if self._quiet_fork:
                    # Python 3.12+ warns when forking a process that has threads; auto only
                    # forks with the harness's own threads around (see resolve_auto).
                    warnings.filterwarnings(
                        "ignore", "This process .* is multi-threaded", DeprecationWarning
                    )
                self.process.start()
        except BaseException:
            self._reader.close()
            raise
        finally:
            self._writer.close()

    def extra(self) -> str:
        pid = self.process.pid
        return f", pid {pid}" if pid is not None else ""

    def poll(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import multiprocessing.connection

        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._io.acquire(True, -1 if timeout is None else timeout):
            return False
        try:
            while not self._over:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._received:
                    ready = multiprocessing.connection.wait(
                        [self._reader, self.process.sentinel], remaining
                    )
                    if not ready:
                        return False
                    # Read before joining: a child blocked writing a large result into a
                    # full pipe would never exit.
                    if self._reader.poll():
                        try:
                            self._payload = self._reader.recv_bytes()
                        except EOFError:
                            self._payload = None
                    self._received = True
                    continue
                self.process.join(remaining)
                if self.process.is_alive():
                    return False
                self._over = True
                self._reader.close()
                self._decode()
            return True
        finally:
            self._io.release()

    async def wait_async(self, timeout: float | None) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        return await _poll_async(self.poll, timeout)

    def cancel(self) -> bool:
        if self.poll(0):
            return False
        self._terminated = True
        self.process.terminate()
        self.process.join(_TERMINATE_GRACE)
        if self.process.is_alive():
            self.process.kill()
        self.poll(None)
        # Terminated and reaped: nothing is left to wait for.
        self.worker._mark_joined()
        return True

    def stop(self) -> str:
        self.cancel()
        return "still running; pytest-concur terminated it"

    def things(self) -> list[object]:
        return [self.process]

    def _decode(self) -> None:
        worker = self.worker
        if self._payload is None:
            code = self.process.exitcode
            if self._terminated:
                worker._finish(_CANCELLED)
                return
            worker._finish(_ERROR, error=RuntimeError(_crash_message(worker, self.process, code)))
            return
        try:
            payload = pickle.loads(self._payload)
        except Exception as exc:
            worker._finish(
                _ERROR,
                error=TypeError(
                    f"pytest-concur: the outcome of worker {worker.name!r} could not be "
                    f"unpickled in the test's process: {type(exc).__name__}: {exc}"
                ),
            )
            return
        if payload[0] == _OK:
            worker._finish(_OK, value=payload[1])
            return
        _, blob, type_name, message, text, outcome = payload
        error = _rebuild_error(blob, type_name, message, outcome)
        if text:
            error.__cause__ = WorkerProcessTraceback(text)
            with worker._lock:
                worker._error_text = text
        worker._finish(_ERROR, error=error)


def _crash_message(worker: Worker[Any], process: BaseProcess, code: int | None) -> str:
    from pytest_concur._checks._where import how_it_ended

    how = how_it_ended(code)
    return (
        f"pytest-concur: worker process {worker.name!r} (pid {process.pid}) {how} before it "
        "returned: its function crashed the interpreter, called os._exit(), or it was killed. "
        "Its output, if any, is in the captured sections."
    )


def _rebuild_error(
    blob: bytes | None,
    type_name: str,
    message: str,
    outcome: tuple[str, str, bool, int | None] | None,
) -> BaseException:
    """The exception a worker process raised, in this process."""
    if outcome is not None:
        # pytest's outcome exceptions (skip, fail ...) do not pickle: raised anew here.
        from pytest_concur._backends._child import raise_pytest_outcome

        try:
            raise_pytest_outcome(*outcome)
        except BaseException as exc:
            # Raised again where the test waits for the worker, from there: not from here.
            return exc.with_traceback(None)
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception:
            error = None
        if isinstance(error, BaseException):
            return error
    return RuntimeError(f"{type_name}: {message}")


@final
class _ProcessBody:
    """A process worker's target, run in the child: sends the outcome back through a pipe.

    Named as the worker's function, for reports. Pickled to the child under spawn and
    forkserver: a module-level class with plain data.
    """

    def __init__(
        self,
        name: str,
        target: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        writer: Any,
    ) -> None:
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.writer = writer
        self.__qualname__ = target

    def __call__(self) -> None:
        try:
            value = _call(self.fn, self.args, self.kwargs)
        except BaseException as exc:  # every outcome goes back, SystemExit included
            payload = _error_payload(exc)
        else:
            try:
                payload = pickle.dumps((_OK, value))
            except Exception as exc:
                payload = _error_payload(
                    TypeError(
                        f"pytest-concur: the result of worker {self.name!r}, "
                        f"{_short_repr(value)}, cannot be sent back to the test's process: "
                        f"pickling it failed with {type(exc).__name__}: {exc}. Return "
                        "something that pickles."
                    )
                )
        try:
            self.writer.send_bytes(payload)
        finally:
            self.writer.close()


def _error_payload(exc: BaseException) -> bytes:
    from pytest_concur._backends._child import _pytest_outcome

    tb = _user_tb(exc.__traceback__)
    # An exception that was never raised (ours, about the result) has no traceback to show.
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
    outcome = _pytest_outcome(exc)
    blob: bytes | None = None
    if outcome is None:
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)  # a pickle that cannot be loaded back is no better than none
        except Exception:
            blob = None
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((_ERROR, blob, type_name, str(exc), text, outcome))


def _check_picklable(
    worker: Worker[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    method: str,
    why: str,
) -> None:
    """Name the first of the function and its arguments that cannot reach the child."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    values: list[tuple[str, object]] = [("the function", fn)]
    values += [(f"argument {index}", value) for index, value in enumerate(args, 1)]
    values += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for what, value in values:
        try:
            pickle.dumps(value)
        except Exception as exc:
            reason = f" ({why})" if why else ""
            raise TypeError(
                f"pytest-concur: concur.start() cannot send {what}, {_short_repr(value)}, to "
                f"worker process {worker.name!r} (start method {method}{reason}): pickling it "
                f"failed with {type(exc).__name__}: {exc}.\n"
                "Under spawn and forkserver the child gets the function and its arguments "
                "by pickle: define the function at module level (not a lambda, a nested "
                "function or a method of a local class) and pass arguments that pickle; or "
                "use --concur-start-method=fork, or run this test under the thread or "
                "asyncio backend."
            ) from None


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


# -- the fixture's object -----------------------------------------------------------------------


@final
class Concur:
    """What the ``concur`` fixture gives a test: workers of its backend, and ``expect_clean()``.

    See docs/workers.md. ``backend`` is the name of the backend the test runs under
    (``None`` outside pytest-concur's backends).
    """

    def __init__(
        self,
        backend: str | None,
        start_method: str | None,
        grace: float,
        allow: _allow.Allow,
    ) -> None:
        self._backend = backend
        self._start_method = start_method
        self._grace = grace
        self._allow = allow
        self._init_state()

    def _init_state(self) -> None:
        self._lock = _real_lock()
        self._workers: list[Worker[Any]] = []
        self._names: dict[str, int] = {}
        self._in_body = False
        self._closed = False

    def __getstate__(self) -> dict[str, Any]:
        # The workers stay with the process that started them, and are judged there.
        return {
            "backend": self._backend,
            "start_method": self._start_method,
            "grace": self._grace,
            "allow": self._allow,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._backend = state["backend"]
        self._start_method = state["start_method"]
        self._grace = state["grace"]
        self._allow = state["allow"]
        self._init_state()

    @property
    def backend(self) -> str | None:
        """The backend the test runs under, or ``None``."""
        return self._backend

    def __repr__(self) -> str:
        with self._lock:
            count = len(self._workers)
        return f"<concur backend={self._backend!r}, {plural(count, 'worker')} started>"

    @overload
    def start(
        self,
        fn: Callable[..., Coroutine[Any, Any, _T]],
        /,
        *args: Any,
        name: str | None = None,
        **kwargs: Any,
    ) -> Worker[_T]: ...

    @overload
    def start(
        self, fn: Callable[..., _T], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> Worker[_T]: ...

    def start(
        self, fn: Callable[..., Any], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> Worker[Any]:
        """Run ``fn(*args, **kwargs)`` in a new worker of the test's backend; return it.

        A thread (``thread`` backend, no backend), a child process (``process``); under
        ``asyncio`` a task on the running loop for a coroutine function started from async
        code, a thread otherwise. ``name`` names the worker (default: the function's name);
        a keyword argument ``name`` meant for ``fn`` goes through ``functools.partial``.
        Join the worker before the test ends.
        """
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if not callable(fn):
            raise TypeError(f"concur.start() needs a function to run, got {fn!r}")
        site = here()
        target = callable_name(fn)
        kind = self._kind(fn, sys._getframe(1))
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    f"pytest-concur: concur.start({target}) at {site}: the test that owns this "
                    "concur fixture is over; start workers from the test or its fixtures."
                )
            base = name or target
            count = self._names[base] = self._names.get(base, 0) + 1
            in_body = self._in_body
        worker: Worker[Any] = Worker(
            base if count == 1 else f"{base}-{count}", kind, target, site, in_body
        )
        run: _ThreadRun | _TaskRun | _ProcessRun
        if kind == "task":
            loop = _running_loop()
            assert loop is not None
            run = _TaskRun(worker, fn, args, kwargs, loop)
        elif kind == "process":
            assert self._start_method is not None
            run = _ProcessRun(worker, fn, args, kwargs, self._start_method)
        else:
            run = _ThreadRun(worker, fn, args, kwargs)
        worker._run = run
        if not isinstance(run, _TaskRun):
            run.start()
        claim(run.things())
        with self._lock:
            self._workers.append(worker)
        return worker

    def cancelled(self) -> bool:
        """Inside a worker: whether ``cancel()`` was called on it. ``False`` elsewhere.

        The way to stop a thread worker: its code polls this and returns.
        """
        worker = _CURRENT.get()
        if worker is None:
            return False
        with worker._lock:
            return worker._cancel_requested

    def expect_clean(self, grace: float | None = None) -> CleanBlock:
        """A ``with`` (or ``async with``) block that fails if its code leaves anything running.

        Threads, tasks and child processes started in the block (and pools, event loops)
        must be over when it ends, within ``grace`` seconds (default: the
        ``concur_leak_grace`` ini key); their exceptions must have been seen. Fails the
        test naming each thing and where it was started; cleans up as the leak checks do.
        """
        if grace is not None and not grace >= 0:
            raise ValueError(f"grace must be None or a number of seconds >= 0, got {grace!r}")
        return CleanBlock(self._allow, self._grace if grace is None else grace)

    def _kind(self, fn: Callable[..., Any], caller: FrameType) -> str:
        if self._backend == "process":
            return "process"
        # A task only for async code, which can await it: plain code (a def body runs inside
        # the loop under asyncio) could never wait for a task without blocking its loop.
        if (
            self._backend == "asyncio"
            and inspect.iscoroutinefunction(fn)
            and caller.f_code.co_flags & (inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR)
            and _running_loop() is not None
        ):
            return "task"
        return "thread"

    # -- judgement ------------------------------------------------------------------------

    def begin_body(self) -> None:
        """The test's body starts (where it runs): what it starts is judged when it ends."""
        with self._lock:
            self._in_body = True

    def end_body(self) -> str | None:
        """The body ended: a report of the workers it did not join, or None."""
        with self._lock:
            self._in_body = False
            workers = [w for w in self._workers if w._in_body]
        return self._judge(workers)

    def close(self) -> str | None:
        """The fixture's teardown: a report of the workers nobody judged yet, or None."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        return self._judge(workers)

    def _judge(self, candidates: list[Worker[Any]]) -> str | None:
        workers: list[Worker[Any]] = []
        unjoined: set[int] = set()
        for worker in candidates:
            with worker._lock:
                if worker._judged:
                    continue
                worker._judged = True
                if not worker._joined:
                    unjoined.add(id(worker))
            workers.append(worker)
        stopped: dict[int, str] = {}
        threads = []
        processes = []
        for worker in workers:
            if id(worker) not in unjoined or worker.done():
                continue
            if worker.kind == "thread":
                with worker._lock:
                    worker._cancel_requested = True  # its code may poll concur.cancelled()
                threads.append(worker)
            elif worker.kind == "process":
                processes.append(worker)
            else:  # a task: nothing runs on its loop while we would wait here
                stopped[id(worker)] = worker._runner().stop()
        # A thread or a child may be on its last lines (a child sending back its outcome),
        # or a thread honouring the cancellation: the grace period, for all at once.
        settle(lambda: any(not w.done() for w in threads + processes), self._grace)
        for worker in processes:
            if not worker.done():
                stopped[id(worker)] = worker._runner().stop()
        for worker in threads:
            if worker.done():
                stopped[id(worker)] = "still running; pytest-concur cancelled it and it ended"
            else:
                stopped[id(worker)] = (
                    "still running; pytest-concur cancelled it and waited "
                    f"{self._grace:g} s, but a thread cannot be stopped from outside: it is "
                    "left running"
                )
                from pytest_concur import _shutdown

                # Reported; if it never ends, it must not hold the interpreter at exit.
                _shutdown.guard(worker._runner().things())  # type: ignore[arg-type]
        errors: list[str] = []
        lines: list[str] = []
        for worker in workers:
            with worker._lock:
                error = worker._error
                unseen = error is not None and not worker._retrieved
                worker._retrieved = True
            if _is_deadlock_error(error):
                continue
            if unseen:
                errors.append(
                    f"pytest-concur: worker {worker.name!r} {worker.describe()} started at "
                    f"{worker._site} raised an exception that nobody retrieved\n"
                    f"{worker._error_report()}"
                )
            elif id(worker) in unjoined:
                how = stopped.get(id(worker))
                if how is None:
                    ended = "cancelled" if worker.cancelled() else "finished"
                    how = f"{ended}, never joined"
                lines.append(
                    f"  Worker {worker.name!r} {worker.describe()} started at {worker._site}: {how}"
                )
        if lines:
            were = "was" if len(lines) == 1 else "were"
            lines.insert(0, f"pytest-concur: {plural(len(lines), 'worker')} {were} never joined")
            lines.append(
                "  Wait for every worker before the test (or the fixture that started it) "
                "ends: worker.join() or worker.result() (await worker.wait() or await worker "
                "in async code); worker.cancel() first to stop one early."
            )
        problems = ["\n".join(lines)] if lines else []
        problems.extend(errors)
        return "\n\n".join(problems) or None


def _is_deadlock_error(error: BaseException | None) -> bool:
    # The deadlock check raised it to unblock the worker, and reports the deadlock itself.
    from pytest_concur._errors import DeadlockError

    return isinstance(error, DeadlockError)


# -- expect_clean() -------------------------------------------------------------------------------


@final
class CleanBlock:
    """The block of ``concur.expect_clean()``: ``with`` in sync code, ``async with`` in async."""

    def __init__(self, allow: _allow.Allow, grace: float) -> None:
        self._allow = allow
        self._grace = grace
        self._site: Site | None = None
        self._watches: list[tuple[Any, LeakWatch, Recording]] = []

    def __enter__(self) -> None:
        self._begin()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self._end(exc)

    async def __aenter__(self) -> None:
        self._begin()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import asyncio

        # Give what the block started the grace period to end, without blocking the loop
        # (the verdicts would wait with time.sleep): then they judge at once.
        deadline = time.monotonic() + self._grace
        delay = 0.001
        while any(module.busy(state) for module, _, state in self._watches):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        for _, watch, _ in self._watches:
            watch.grace = 0.0
        self._end(exc)

    def _begin(self) -> None:
        from pytest_concur._checks import processes, tasks, threads
        from pytest_concur._checks._leak import Owner

        if self._site is not None:
            raise RuntimeError("an expect_clean() block cannot be entered twice")
        self._site = here()
        owner = Owner(
            subject="the block", who="the code in the block", until="before the block ends"
        )
        for module, watch_type in (
            (threads, threads.ThreadsWatch),
            (tasks, tasks.TasksWatch),
            (processes, processes.ProcessesWatch),
        ):
            watch = watch_type(self._allow, self._grace, owner)
            try:
                state = watch.record()
            except BaseException:
                self._close_recordings()
                raise
            self._watches.append((module, watch, state))

    def _close_recordings(self) -> None:
        watches, self._watches = self._watches, []
        for _, _, state in reversed(watches):
            state.close()

    def _end(self, exc: BaseException | None) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        problems: list[str] = []
        watches = list(self._watches)
        try:
            for module, watch, state in reversed(watches):
                try:
                    problem = watch.verdict(state)
                except Exception as error:  # a broken verdict must not hide the block's outcome
                    problem = f"check {module.NAME} failed: {error!r}"
                if problem:
                    problems.append(problem)
        finally:
            self._close_recordings()
            # Judged here: the test's own checks do not report the same things again.
            for module, _, state in watches:
                claim(module.recorded(state))
        if not problems:
            return
        text = (
            f"pytest-concur: expect_clean() at {self._site}: the code in the block left "
            "something behind\n\n" + "\n\n".join(reversed(problems))
        )
        if exc is None:
            pytest.fail(text, pytrace=False)
        if sys.version_info >= (3, 11):
            exc.add_note(f"\n{text}")
        else:  # pragma: no cover - exercised by the py310 tox env
            raise pytest.fail.Exception(f"{exc!r}\n\n{text}") from exc


# -- the fixture and the check ------------------------------------------------------------------


def fixture(request: pytest.FixtureRequest) -> Generator[Concur, None, None]:
    """The ``concur`` fixture's body (declared in ``plugin.py``)."""
    from pytest_concur._state import backend_of

    item = request.node
    backend = backend_of(item) if isinstance(item, pytest.Item) else None
    start_method = None
    if backend == "process":
        from pytest_concur._backends.process import start_method as configured

        start_method = configured(request.config)
    allow = (
        _allow.for_item(item) if isinstance(item, pytest.Item) else _allow.from_ini(request.config)
    )
    concur = Concur(backend, start_method, _allow.grace(request.config), allow)
    yield concur
    problem = concur.close()
    if problem:
        pytest.fail(problem, pytrace=False)


@final
class WorkersCheck:
    """Judges the workers a body started with the ``concur`` fixture, where the body runs."""

    name = "concur"
    description = (
        "workers started with the concur fixture are joined, and their exceptions seen, "
        "when the body ends"
    )

    def watch(self, item: pytest.Item) -> BodyWatch | None:
        concur = getattr(item, "funcargs", {}).get(FIXTURE)
        return BodyWatch(concur) if isinstance(concur, Concur) else None


@final
class BodyWatch:
    """One body's watch: pickles with the test's arguments, so it holds the same ``Concur``."""

    def __init__(self, concur: Concur) -> None:
        self._concur = concur

    def begin(self) -> None:
        self._concur.begin_body()

    def end(self, failed: bool) -> str | None:
        return self._concur.end_body()
