"""The ``tasks`` check: asyncio tasks, coroutines and event loops the body leaves behind.

Design. ``begin`` and ``end`` run where the body runs: inside the event loop for an async
body and for every body under the ``asyncio`` backend, in a plain thread otherwise. From
``begin`` to ``end``, and taken off in ``end`` whatever happens:

- the running loop, if any, gets a task factory that records each task created on it (and
  where), chaining to the factory it had;
- ``asyncio.BaseEventLoop.__init__`` is listened to (``pytest_concur._patches``) to record
  each loop the body creates, which gets the same recording task factory (so tasks of
  ``asyncio.run`` inside a sync body are seen too);
- ``warnings._warn_unawaited_coroutine``, which CPython calls when a coroutine that never
  ran is destroyed, records it instead of warning (the warning would otherwise surface in
  whichever test happens to be running, or be lost); coroutine origin tracking is turned
  on in the body's thread so the report can say where the coroutine was created.

At ``end``: a recorded task still pending is a leak (``end`` runs inside the loop, so
nothing could finish while we waited: there is no grace period for tasks); it is
cancelled. A task that ended with an exception nobody retrieved is reported with its
traceback, and marked retrieved so asyncio does not log it again at garbage collection. A
loop the body created and did not close is reported and closed (if it no longer runs).

Invariant: the recording state is only touched under its own lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from pytest_concur import _patches
from pytest_concur._checks._leak import TEST, LeakCheck, LeakWatch, Owner, Recording
from pytest_concur._checks._where import Site, format_exception, from_origin, here, plural, settle
from pytest_concur._primitives import allocate_lock as _real_lock

if TYPE_CHECKING:
    import asyncio
    from types import FrameType

NAME = "tasks"
# CPython looks this function up in the warnings module when a coroutine is destroyed
# unawaited (Python/_warnings.c, _PyErr_WarnUnawaitedCoroutine).
_UNAWAITED_HOOK = "_warn_unawaited_coroutine"
# Frames kept of a coroutine's creation; only in the body's thread, only during the body.
_ORIGIN_DEPTH = 16


@final
class TasksCheck(LeakCheck):
    """Tasks are done when the body returns, and none of their exceptions is lost."""

    name = NAME
    description = (
        "asyncio tasks are done when the body returns, their exceptions seen, coroutines "
        "awaited, event loops closed"
    )


@final
class TasksWatch(LeakWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def record(self) -> _Recording:
        return _Recording()

    def verdict(self, state: Recording) -> str | None:
        assert isinstance(state, _Recording)
        with state.lock:
            tasks = list(state.tasks)
            coroutines = list(state.coroutines)
            loops = list(state.loops)
        if not tasks and not coroutines and not loops:
            return None  # the common case: the body started nothing
        # A concur worker's tasks, and those of the loop a worker runs on, are the worker's.
        tasks = [(t, site) for t, site in tasks if not _claimed(t) and not _claimed(t.get_loop())]
        loops = [(ref, site) for ref, site in loops if not _claimed(ref())]
        problems: list[str] = []
        pending = [
            (task, site)
            for task, site in tasks
            if not task.done()
            and not self.allow.allows(NAME, (task.get_name(), _coroutine_name(task)), site)
        ]
        if pending and _stuck_by_the_failure():
            for task, _ in pending:  # named in the deadlock's or the hang's report
                _cancel(task)
        elif pending:
            problems.append(_pending_report(pending, self.owner))
        for task, site in tasks:
            if task.done() and not task.cancelled() and getattr(task, "_log_traceback", False):
                exc = task.exception()  # marks it retrieved: asyncio will not log it again
                assert exc is not None
                text = format_exception(exc)
                problems.append(
                    f"pytest-concur: task {task.get_name()!r} "
                    f"(coroutine={_coroutine_name(task)}) created at {site} raised an "
                    f"exception that nobody retrieved\n{text.rstrip()}"
                )
        for name, site in coroutines:
            created = f", created at {site}" if site.frames else ""
            problems.append(
                f"pytest-concur: coroutine {name!r} was never awaited{created}\n"
                "  Await it, or hand it to asyncio.create_task() and await the task."
            )
        open_loops = self._open_loops(loops)
        if open_loops:
            problems.append(open_loops)
        return "\n\n".join(problems) or None

    def _open_loops(self, recorded: list[tuple[weakref.ref[Any], Site]]) -> str | None:
        loops = [(loop, site) for ref, site in recorded if (loop := ref()) is not None]
        settle(lambda: any(loop.is_running() for loop, _ in loops), self.grace)
        left = [(loop, site) for loop, site in loops if not loop.is_closed()]
        if not left:
            return None
        lines = [f"pytest-concur: {self.owner.subject} left {plural(len(left), 'event loop')} open"]
        for loop, site in left:
            running = loop.is_running()
            lines.append(
                f"  {type(loop).__name__} created at {site}"
                + (" (still running in another thread, left alone)" if running else "")
            )
            if not running:
                _close_loop(loop)
        lines.append(
            "  pytest-concur closed what no longer ran. Close every loop you create, or let "
            "asyncio.run() or asyncio.Runner do it."
        )
        return "\n".join(lines)


class _Recording:
    """The hooks of one watch, and what they saw."""

    def __init__(self) -> None:
        import asyncio

        self.lock = _real_lock()
        self.active = True
        self.tasks: list[tuple[asyncio.Task[Any], Site]] = []
        self.coroutines: list[tuple[str, Site]] = []
        self.loops: list[tuple[weakref.ref[Any], Site]] = []
        self._restore: list[Any] = []
        self._thread: int | None = None

        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            previous_factory = loop.get_task_factory()
            factory = self._factory(previous_factory)
            loop.set_task_factory(factory)

            def restore_factory() -> None:
                if loop.get_task_factory() is factory and not loop.is_closed():
                    loop.set_task_factory(previous_factory)

            self._restore.append(restore_factory)
        else:
            # No loop runs where the body begins: a plain test under --concur-check-all
            # that pytest-asyncio or anyio calls, whose loop their fixtures made before
            # the watch (and which gets no task factory of ours). Tasks created on a loop
            # that runs in this thread are the body's (see _on_create_task).
            self._thread = threading.get_ident()
            self._restore.append(_patches.listen(_patches.LOOP_CREATE_TASK, self._on_create_task))

        self._restore.append(_patches.listen(_patches.LOOP_INIT, self._record_loop))

        original_warn = getattr(warnings, _UNAWAITED_HOOK, None)
        if original_warn is not None:

            def warn(coro: Any) -> None:
                with self.lock:
                    if self.active:
                        name = getattr(coro, "__qualname__", None) or repr(coro)
                        self.coroutines.append(
                            (name, from_origin(getattr(coro, "cr_origin", None)))
                        )
                        return
                original_warn(coro)

            setattr(warnings, _UNAWAITED_HOOK, warn)

            def restore_warn() -> None:
                if getattr(warnings, _UNAWAITED_HOOK, None) is warn:
                    setattr(warnings, _UNAWAITED_HOOK, original_warn)

            self._restore.append(restore_warn)

        depth = sys.get_coroutine_origin_tracking_depth()
        if depth < _ORIGIN_DEPTH:
            sys.set_coroutine_origin_tracking_depth(_ORIGIN_DEPTH)
            # Per thread: end runs in the same thread as begin.
            self._restore.append(lambda: sys.set_coroutine_origin_tracking_depth(depth))

    def _factory(self, previous: Any) -> Any:
        import asyncio

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            if previous is not None:
                task = previous(loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=loop, **kwargs)
            with self.lock:
                active = self.active
            if active and isinstance(task, asyncio.Task):
                site = here()
                with self.lock:
                    self.tasks.append((task, site))
            return task

        factory.concur_recording = self  # type: ignore[attr-defined]
        return factory

    def _on_create_task(self, loop: Any, task: Any) -> None:
        """A task created on a loop made before the watch began (pytest-asyncio's, anyio's).

        Recorded when its loop runs in the body's thread and is already running: the
        plugin's runner creates the test's own task (and anyio its runner task, which
        outlives the test) before it runs the loop, and those are not the body's. Loops
        the body made have our task factory, which records their tasks already.
        """
        import asyncio

        if (
            not isinstance(task, asyncio.Task)
            or threading.get_ident() != self._thread
            or not loop.is_running()
            or getattr(loop.get_task_factory(), "concur_recording", None) is self
        ):
            return
        with self.lock:
            if not self.active:
                return
        site = here()
        with self.lock:
            self.tasks.append((task, site))

    def _record_loop(self, loop: Any, result: None = None) -> None:
        with self.lock:
            if not self.active:
                return
        site = here()
        with self.lock:
            self.loops.append((weakref.ref(loop), site))
        loop.set_task_factory(self._factory(None))

    def close(self) -> None:
        """Restore every hook; one that someone wrapped after us just passes through."""
        with self.lock:
            self.active = False
        # Dropped once run: they hold the loop and closures that hold us, a cycle that
        # would keep the loop for the garbage collector to find, a test later.
        restores, self._restore = self._restore, []
        for restore in reversed(restores):
            restore()


def _coroutine_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return str(getattr(coro, "__qualname__", None) or coro)


def _pending_report(pending: list[tuple[asyncio.Task[Any], Site]], owner: Owner = TEST) -> str:
    lines = [f"pytest-concur: {owner.subject} left {plural(len(pending), 'task')} pending"]
    for task, site in pending:
        lines.append(
            f"  Task {task.get_name()!r} (coroutine={_coroutine_name(task)}) created at "
            f"{site.with_test_line()}"
        )
        _cancel(task)
    lines.append(
        "  pytest-concur cancelled "
        + ("it" if len(pending) == 1 else "them")
        + f". Await every task {owner.who} creates (asyncio.TaskGroup does it for you), or "
        f"cancel it and await it {owner.until}."
    )
    return "\n".join(lines)


def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task from wherever we are; one whose loop is closed is only forgotten."""
    loop = task.get_loop()
    try:
        if loop.is_closed():
            with contextlib.suppress(AttributeError):
                task._log_destroy_pending = False  # type: ignore[attr-defined]
        elif loop.is_running() and _running_loop() is not loop:
            loop.call_soon_threadsafe(task.cancel)
        else:
            task.cancel()
    except RuntimeError:  # pragma: no cover - the loop closed meanwhile
        pass


def _stuck_by_the_failure() -> bool:
    """Whether the body failed with a deadlock or at its deadline: its tasks are in that
    report already (what each awaits), and leaving them pending is no separate fault."""
    from pytest_concur._errors import DeadlockError, HangError
    from pytest_concur._watching import body_error

    return isinstance(body_error(), (DeadlockError, HangError))


def _running_loop() -> Any:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _close_loop(loop: Any) -> None:
    import asyncio

    for task in asyncio.all_tasks(loop):
        # Cancelled, but the closed loop will never run them: no log of their destruction.
        task.cancel()
        with contextlib.suppress(AttributeError):
            task._log_destroy_pending = False  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        loop.close()


class _OwnerRecording(_Recording):
    """Tasks and loops that threads acting for an owner (a fixture's lineage) create.

    A fixture is set up and torn down outside any running loop, and its async code runs on
    loops that exist before it or that it makes (pytest-concur's own, pytest-asyncio's):
    instead of a task factory on one loop, ``BaseEventLoop.create_task`` is listened to, and
    ``BaseEventLoop.__init__`` records the loops it creates, except pytest-concur's own,
    which their runner closes. Both stay until ``close`` (the fixture's teardown); only
    what acting threads do is recorded. Unawaited coroutines are the body check's concern.
    """

    def __init__(self, acting: Callable[[], bool]) -> None:  # not the body's hooks
        self.lock = _real_lock()
        self.active = True
        self.tasks = []
        self.coroutines = []
        self.loops = []
        self._acting = acting
        self._restore = [
            _patches.listen_many(
                (
                    (_patches.LOOP_CREATE_TASK, self._on_create_task),
                    (_patches.LOOP_INIT, self._on_loop),
                )
            )
        ]

    def _recording(self) -> bool:
        with self.lock:
            active = self.active
        return active and self._acting()

    def _on_create_task(self, loop: Any, task: Any) -> None:
        import asyncio

        if isinstance(task, asyncio.Task) and self._recording():
            site = here()
            with self.lock:
                self.tasks.append((task, site))

    def _on_loop(self, loop: Any, result: None) -> None:
        from pytest_concur._loop_deadlocks import WatchedLoop

        if not isinstance(loop, WatchedLoop) and not _made_by_runner() and self._recording():
            site = here()
            with self.lock:
                self.loops.append((weakref.ref(loop), site))


def _made_by_runner() -> bool:
    """Whether the loop being created is an ``asyncio.Runner``'s (or its backport's).

    A runner makes its loop on first use, for whoever uses it first (pytest-asyncio's and
    anyio's runner fixtures serve several fixtures): the loop is the runner's, and closed
    with it, not the fixture's that happened to run first.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(10):  # BaseEventLoop.__init__ is a few calls below Runner._lazy_init
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_lazy_init" and "runner" in os.path.basename(code.co_filename):
            return True
        frame = frame.f_back
    return False


def record_for(acting: Callable[[], bool]) -> Recording:
    """Record the tasks and loops that threads acting for an owner create (a fixture's)."""
    return _OwnerRecording(acting)


# -- for the concur fixture (pytest_concur/_workers/) -----------------------------------------


def _claimed(thing: object) -> bool:
    # The concur fixture reports its workers' tasks itself, and expect_clean() what its
    # block left: one report each. Not imported when it never ran: nothing is claimed then.
    claims = sys.modules.get("pytest_concur._workers._claims")
    return claims is not None and bool(claims.claimed(thing))


def recorded(state: Recording) -> list[asyncio.Task[Any]]:
    """The tasks a recording saw created."""
    assert isinstance(state, _Recording)
    with state.lock:
        return [task for task, _ in state.tasks]


def busy(state: Recording) -> bool:
    """Whether a task the recording saw created is still pending."""
    return any(not task.done() for task in recorded(state))


TasksCheck.watch_type = TasksWatch
