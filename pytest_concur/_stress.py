"""Stress mode: several copies of one test body at once (``workers=N``).

The design, and what it keeps true:

- **One item, N copies.** ``test_x[thread]`` stays one item. Its fixtures are set up once,
  in pytest's thread, and every copy gets the same values; only the test function's own
  ``worker_index`` and ``worker_count`` arguments differ from copy to copy (each copy calls
  the function with a kwargs dict of its own).
- **Checks watch the group.** The item's watches begin once, where the copies are started,
  before the first copy runs, and end once, after the last copy finished. The copy threads
  are started while lock tracking is active, so the deadlock tracker counts them as
  threads of the test; the starting thread then waits for them in a tracked ``join``, so
  "every thread is blocked" still covers the whole group.
- **Copies start together.** Threads meet at a ``threading.Barrier`` (waited on with a
  timeout: a tracked wait with a timeout is never taken for a deadlock); tasks are created
  in one go and first run in the same loop iteration; the process backend's children wait
  on one event (see ``_backends/process.py``). For threads, the interpreter's switch
  interval is lowered while the copies run and restored after.
- **One verdict from N outcomes** (:func:`combine`): ``pytest.exit`` and ^C win; then a
  failure of any copy fails the item (a skip elsewhere never hides it); only when no copy
  failed does a skip or an xfail decide. Identical failures (same type, message and line)
  are shown once, with the indexes of the copies that hit them; each different failure is
  shown once too, in a section under the first.
- **Each copy its own temporary directory.** When the test function takes ``tmp_path`` (or
  ``tmpdir``), copy ``i`` gets ``<the item's tmp_path>/copy<i>``, made before any copy
  starts. Subdirectories rather than new directories from ``tmp_path_factory``: every copy
  is treated alike (copy 0 is not the one that happens to see what fixtures wrote), what
  fixtures wrote is one ``.parent`` away for all of them, and pytest's retention policy
  for the item's directory covers the copies' too.
- **The copy hooks run in the copy** (:func:`with_copy_hooks`): ``pytest_concur_copy_setup``
  before the copies are let go together, the body, then ``pytest_concur_copy_teardown``,
  all in the copy's thread, task or child, inside the checks' watch.
- **Problems of the group are pinned on copies where they can be.** While the copies run,
  ``Thread.start`` notes which copy started each thread (a context variable holds the
  copy's index; threads started by those threads inherit it). A check's report that names
  a thread still running that a copy started becomes that copy's failure, and goes through
  the grouping like any other; the rest is reported for the item.

Where the parts live: this module says how many copies an item runs and runs them (threads
or tasks, and who started what while they ran); the copy hooks are ``_stress_hooks``'s, the
verdict from the copies' outcomes and its section ``_stress_verdict``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _locks, _patches
from pytest_concur._errors import DeadlockError

# Handed on: the backends and the plugin import these from here.
from pytest_concur._stress_hooks import warn_hooks_not_called as warn_hooks_not_called
from pytest_concur._stress_hooks import with_copy_hooks as with_copy_hooks
from pytest_concur._stress_verdict import _copies, _with_problem
from pytest_concur._stress_verdict import add_section as add_section
from pytest_concur._stress_verdict import combine as combine
from pytest_concur._watching import check_result, end_watches

if TYPE_CHECKING:
    from pytest_concur._backends.base import BodyCall

INDEX = "worker_index"
COUNT = "worker_count"
SERIAL_MARKER = "concur_serial"
SERIAL_FIXTURES_INI = "concur_serial_fixtures"
# The switch interval while copy threads run: small enough that threads switch inside
# read-modify-write sequences, large enough that the interpreter still gets work done.
SWITCH_INTERVAL = 1e-6
# How long a copy waits at the start barrier for the others before it starts anyway.
BARRIER_TIMEOUT = 10.0
# Items that asked for several copies but ran one, by reason.
_SERIAL = pytest.StashKey[dict[str, int]]()
# The index of the copy whose code is running: set in each copy's own context (its thread's
# or its task's), so that what a copy starts can be traced back to it.
_COPY_INDEX: contextvars.ContextVar[int] = contextvars.ContextVar("concur_copy_index")

# -- how many copies --------------------------------------------------------------------


def copies(item: pytest.Item, *, count_serial: bool = True) -> int:
    """How many copies of ``item``'s body run: its worker count, or 1 for a serial test.

    With ``count_serial``, a serial test that asked for several copies is counted for the
    terminal summary (once per item: call it so once, when the body runs).
    """
    from pytest_concur._marker import workers

    count = workers(item)
    if count > 1:
        reason = serial_reason(item)
        if reason is not None:
            if count_serial:
                counts = item.config.stash.setdefault(_SERIAL, {})
                counts[reason] = counts.get(reason, 0) + 1
            return 1
    return count


def serial_reason(item: pytest.Item) -> str | None:
    """Why ``item`` must run as a single copy, or ``None``."""
    if item.get_closest_marker(SERIAL_MARKER) is not None:
        return f"@pytest.mark.{SERIAL_MARKER}"
    serial = set(item.config.getini(SERIAL_FIXTURES_INI) or ())
    used = sorted(serial.intersection(getattr(item, "fixturenames", ())))
    if used:
        return f"fixture {', '.join(used)} ({SERIAL_FIXTURES_INI})"
    return None


def serial_summary(config: pytest.Config) -> list[str]:
    """Lines for the terminal summary: how many tests ran as one copy, and why."""
    counts = config.stash.get(_SERIAL, None)
    if not counts:
        return []
    total = sum(counts.values())
    reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
    return [
        f"pytest-concur: {total} test(s) ran as a single copy instead of several, "
        f"being serial ({reasons})"
    ]


def copy_kwargs(kwargs: Mapping[str, Any], index: int, count: int) -> dict[str, Any]:
    """The arguments of one copy: the shared ones, with its own index and the count."""
    own = dict(kwargs)
    if INDEX in own:
        own[INDEX] = index
    if COUNT in own:
        own[COUNT] = count
    return own


def copies_kwargs(kwargs: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """Each copy's arguments: its own index, and its own ``tmp_path`` / ``tmpdir``.

    The directories are made here, before any copy starts: ``copy<i>`` in the item's own
    temporary directory (see the module's docstring for why there).
    """
    own = [copy_kwargs(kwargs, index, count) for index in range(count)]
    if count == 1:
        return own
    tmp_path = kwargs.get("tmp_path")
    tmpdir = kwargs.get("tmpdir")
    # Only pytest's own fixtures: a conftest.py may have replaced them with anything.
    if not isinstance(tmp_path, Path):
        tmp_path = None
    if type(tmpdir).__name__ != "LocalPath":
        tmpdir = None
    base = tmp_path if tmp_path is not None else Path(tmpdir) if tmpdir is not None else None
    if base is None:
        return own
    for index, arguments in enumerate(own):
        path = _copy_dir(base, index)
        if tmp_path is not None:
            arguments["tmp_path"] = path
        if tmpdir is not None:
            arguments["tmpdir"] = type(tmpdir)(path)
    return own


def _copy_dir(base: Path, index: int) -> Path:
    path = base / f"copy{index}"
    try:
        path.mkdir()
    except FileExistsError:
        # A fixture put something of that name there: a fresh name next to it instead.
        path = Path(tempfile.mkdtemp(prefix=f"copy{index}-", dir=base))
    return path


# -- running the copies -----------------------------------------------------------------


def run_threads(call: BodyCall) -> None:
    """Run ``call.workers`` copies of a sync body in threads; the caller's thread waits."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    count = call.workers
    item = call.item
    # Made before the watches begin: the barrier is our machinery, not the test's locks.
    barrier = threading.Barrier(count)
    results: list[BaseException | None] = [None] * count
    nodeid = item.nodeid
    arguments = copies_kwargs(call.kwargs, count)

    def ready() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):  # a copy never came: go
            barrier.wait(BARRIER_TIMEOUT)

    bodies = [with_copy_hooks(item, i, count, call.function, ready) for i in range(count)]

    def copy(index: int) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        _COPY_INDEX.set(index)  # in this copy's own context (see the threads below)
        try:
            check_result(nodeid, bodies[index](**arguments[index]))
        except BaseException as exc:  # every outcome goes back, skip and exit included
            results[index] = exc

    for watch in call.watches:
        watch.begin()
    # Notes who started what until the watches ended (see _Starts).
    starts = _Starts()
    name = threading.current_thread().name
    threads = [
        # Each copy runs in a copy of this thread's context (one context cannot be entered
        # by two threads at once), so context variables set by fixtures are seen by all.
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(copy, index),
            name=f"{name}-copy{index}",
            # As the body's thread: what a copy starts is non-daemon by default, as in a
            # plain run; copies given up on are guarded at exit (see _backends/thread.py).
            daemon=False,
        )
        for index in range(count)
    ]
    try:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            for thread in threads:
                thread.start()
            _join_all(threads)
        finally:
            sys.setswitchinterval(previous)
        _finish(call, results, starts)
    finally:
        starts.close()


def _join_all(threads: Sequence[threading.Thread]) -> None:
    for thread in threads:
        try:
            thread.join()
        except DeadlockError:
            # The copies are unwinding with the same error: wait for them untracked (a join
            # with a timeout is a plain join), so each copy's outcome is in.
            while thread.is_alive():
                thread.join(0.05)


async def run_tasks(call: BodyCall) -> None:
    """Run ``call.workers`` copies as tasks on the running loop, and wait for them all."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._loop_deadlocks import note_body_task

    count = call.workers
    item = call.item
    arguments = copies_kwargs(call.kwargs, count)
    bodies = [with_copy_hooks(item, i, count, call.function) for i in range(count)]
    tasks: list[asyncio.Task[BaseException | None]] = []
    # The copy the test's deadline ended, if one did. Only touched on the loop's thread.
    stopped: list[int] = []

    def stop(index: int) -> None:
        # Nothing would end the other copies now: sync ones, which run one after another,
        # would each start with no deadline left; async ones may wait forever.
        stopped.append(index)
        for task in tasks:
            if task is not asyncio.current_task() and not task.done():
                task.cancel()

    forget = note_body_task()
    for watch in call.watches:
        watch.begin()
    starts = _Starts()
    try:
        deadlock: DeadlockError | None = None
        loop = asyncio.get_running_loop()
        tasks.extend(
            # Named for the copy, so that a deadlock's or a hang's report says which is which.
            loop.create_task(
                _task_copy(call, bodies[index], arguments[index], index, stop),
                name=f"concur-{item.name}-copy{index}",
            )
            for index in range(count)
        )
        try:
            try:
                await asyncio.wait(tasks)
            except DeadlockError as exc:
                # The loop watch woke us (the body's task) with its diagnosis: the copies
                # that still wait are stuck for good. Cancel them and give them this error.
                deadlock = exc
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        finally:
            forget()
            for task in tasks:
                if not task.done():
                    task.cancel()
        results: list[BaseException | None] = []
        for task in tasks:
            # A copy returns its exception; only ^C and SystemExit come out of result().
            outcome = asyncio.CancelledError() if task.cancelled() else task.result()
            if isinstance(outcome, asyncio.CancelledError):
                if deadlock is not None:
                    outcome = deadlock
                elif stopped:
                    outcome = pytest.skip.Exception(
                        f"stopped: the test reached its deadline in copy {stopped[0]}"
                    )
            results.append(outcome)
        _finish(call, results, starts)
    finally:
        starts.close()


async def _task_copy(
    call: BodyCall,
    body: Callable[..., Any],
    kwargs: dict[str, Any],
    index: int,
    stop: Callable[[int], None],
) -> BaseException | None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    _COPY_INDEX.set(index)  # in this task's own context
    try:
        if call.is_async:
            await body(**kwargs)
        else:
            check_result(call.item.nodeid, body(**kwargs))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # every outcome goes back, skip and cancellation included
        if _is_deadline(exc):
            stop(index)
        return exc
    return None


def _is_deadline(error: BaseException) -> bool:
    """Whether ``error`` is a timeout's: pytest-concur's deadline or pytest-timeout's."""
    if getattr(error, "concur_hang_report", False):
        return True
    return isinstance(error, pytest.fail.Exception) and str(error).startswith("Timeout (>")


def note_unfinished(
    error: BaseException, running: Sequence[tuple[int, int | None]], count: int
) -> None:
    """Tell, on the ``error`` that ended the wait for the copies, which were still running.

    ``running`` holds the index and the process id of each copy still running.
    """
    if not running:
        return
    indexes = [index for index, _ in running]
    finished = [index for index in range(count) if index not in indexes]
    pids = ", ".join(str(pid) for _, pid in running)
    verb = "was" if len(running) == 1 else "were"
    note = (
        f"pytest-concur: {_copies(indexes, count)} {verb} still running when the wait for "
        f"the copies ended (pid {pids})"
    )
    if finished:
        note += f"; {_copies(finished, count)} had finished"
    note += ". Every copy's process was stopped."
    if isinstance(error, pytest.fail.Exception):
        # pytest shows such a failure by its message alone (notes included only with a
        # traceback): the note goes in the message.
        error.msg = f"{error.msg}\n{note}" if error.msg else note
    elif sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # pragma: no cover - exercised by the py310 tox env
        print(note, file=sys.stderr)  # shown with the failure, as captured stderr


def _finish(call: BodyCall, results: list[BaseException | None], starts: _Starts) -> None:
    """End the group's watches and raise the item's outcome from the copies' and theirs."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    shared: list[str] = []
    failure = next((r for r in results if r is not None), None)
    for problem in end_watches(call.watches, failure):
        owners = starts.owners(problem)
        for index in owners:
            results[index] = _with_problem(results[index], problem)
        if not owners:
            shared.append(problem)
    error = combine(call.item, results)
    if shared:
        error = _with_problem(error, "\n\n".join(shared))
    if error is not None:
        raise error


class _Starts:
    """Which copy started each thread, task and child process started while the copies run.

    ``Thread.start``, ``BaseEventLoop.create_task``, ``BaseProcess.start`` and
    ``Popen.__init__`` are listened to from creation to :meth:`close`: what is started where
    the copy index is set (a copy's thread or task, and the tasks they create, which run in
    a copy of its context), or by a thread noted before, is noted with that copy's index.
    Made after the watches began, it is closed only after they ended: a thread a copy
    started may start another after the last copy returned, while the threads check waits
    for stragglers. Our state is only touched under our own lock.
    """

    def __init__(self) -> None:
        self._lock = _locks._real_allocate_lock()  # never a tracked lock: our bookkeeping
        self._active = True
        self._copy_of: dict[threading.Thread, int] = {}
        # How a report names each thing noted (see owners), with the copy that started it.
        self._named: list[tuple[str, int]] = []
        self._tasks: list[tuple[Any, int]] = []
        self._stop_listening = _patches.listen_many(
            (
                (_patches.THREAD_START, self._note_thread),
                (_patches.LOOP_CREATE_TASK, self._note_task),
                (_patches.PROCESS_START, self._note_process),
                (_patches.POPEN_INIT, self._note_popen),
            )
        )

    def _copy(self) -> int | None:
        """The copy the calling code runs for, if any (under our lock)."""
        index = _COPY_INDEX.get(None)
        if index is None:
            index = self._copy_of.get(threading.current_thread())
        return index

    def _note_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            index = self._copy() if self._active else None
            if index is not None:
                self._copy_of[thread] = index
                self._named.append((repr(thread.name), index))

    def _note_task(self, loop: object, task: object) -> None:
        if not callable(getattr(task, "get_name", None)):
            return
        with self._lock:
            index = self._copy() if self._active else None
            if index is not None:
                # Named when the report is read: asyncio.create_task names it only after.
                self._tasks.append((task, index))

    def _note_process(self, process: object) -> Callable[[], None]:
        # Before the start: the pid is known after it.
        def started() -> None:
            self._note_pid(getattr(process, "pid", None))

        return started

    def _note_popen(self, popen: object, result: None) -> None:
        self._note_pid(getattr(popen, "pid", None))

    def _note_pid(self, pid: int | None) -> None:
        if pid is None:
            return
        with self._lock:
            index = self._copy() if self._active else None
            if index is not None:
                self._named.append((f"(pid {pid},", index))
                self._named.append((f"(pid {pid})", index))

    def close(self) -> None:
        """Stop noting."""
        with self._lock:
            self._active = False
        self._stop_listening()

    def owners(self, report: str) -> list[int]:
        """The copies that started a thread, task or process that ``report`` names."""
        with self._lock:
            named = list(self._named)
            named.extend((repr(task.get_name()), index) for task, index in self._tasks)
        return sorted({index for name, index in named if name in report})
