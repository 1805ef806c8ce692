"""Process workers: a ``multiprocessing`` child for each worker, under the ``process`` backend.

The child is started like the backend's own (same start method; ``auto`` resolved at each
start). The function and arguments travel by pickle unless the child is forked
(``_check_picklable`` names the first that cannot); the result or the exception comes back
by pickle through a pipe, the child's formatted traceback with it (``_ProcessBody`` runs in
the child; ``_ProcessRun`` reads the pipe before it joins). pytest's outcome exceptions do
not pickle: they travel as a description and are raised anew. ``cancel()`` terminates the
child, kills it after ``_TERMINATE_GRACE``, and reaps it.
"""

from __future__ import annotations

import pickle
import time
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from pytest_concur._errors import WorkerProcessTraceback
from pytest_concur._primitives import allocate_lock as _real_lock
from pytest_concur._workers._run import _call, _poll_async, _Run
from pytest_concur._workers._worker import _CANCELLED, _ERROR, _OK, Worker, _user_tb

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

# How long a process worker gets between SIGTERM and SIGKILL when it is cancelled.
_TERMINATE_GRACE = 1.0


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
