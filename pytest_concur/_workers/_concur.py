"""``Concur``, the ``concur`` fixture's object: workers of the test's backend, and their judgement.

Design. ``concur.start(fn, *args, **kwargs)`` runs ``fn`` in a worker of the test's own
backend, so one test body exercises the code under each concurrency model:

- ``thread`` backend, no backend, any other backend: a thread (a coroutine function
  runs on a fresh event loop in that thread);
- ``asyncio``: a task on the running loop when ``fn`` is a coroutine function started from
  async code (plain code could only wait for a task by blocking the loop that runs it);
  otherwise a thread as above (not the loop's default executor, which would hide it among
  the loop's own workers, unnamed);
- ``process``: a ``multiprocessing`` child started like the backend's own (same start
  method; ``auto`` resolved at each start). The function and arguments travel by pickle
  unless the child is forked; the result or the exception comes back by pickle through a
  pipe, the child's formatted traceback with it.

Each kind has its module (``_thread``, ``_task``, ``_process``); ``start`` picks one and
claims what it starts (``_claims``).

Judgement. A worker nobody joined, and a worker whose exception nobody retrieved, fail the
test; what is still running is then stopped where possible (tasks cancelled, processes
terminated; threads get the grace period and are left running). ``end_body`` judges what a
body started and ``close`` the rest; ``_check`` says where each is called.

A ``Concur`` pickles to a fresh one with the same settings and no workers (the ``process``
backend sends it to its child). Its state is only touched under its own lock (see the
package's docstring).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar, final, overload

from pytest_concur._checks import _allow
from pytest_concur._checks._where import callable_name, here, plural, settle
from pytest_concur._primitives import allocate_lock as _real_lock
from pytest_concur._workers._claims import claim
from pytest_concur._workers._clean import CleanBlock
from pytest_concur._workers._process import _ProcessRun
from pytest_concur._workers._run import _running_loop
from pytest_concur._workers._task import _TaskRun
from pytest_concur._workers._thread import _ThreadRun
from pytest_concur._workers._worker import _CURRENT, Worker

_T = TypeVar("_T")


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
