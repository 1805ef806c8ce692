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
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur._backends.base import _report, check_result
from pytest_concur._locks import DeadlockError

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
SECTION = "pytest-concur: copies"

_SECTION_TEXT = pytest.StashKey[str]()
# Items that asked for several copies but ran one, by reason.
_SERIAL = pytest.StashKey[dict[str, int]]()


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


# -- running the copies -----------------------------------------------------------------


def run_threads(call: BodyCall) -> None:
    """Run ``call.workers`` copies of a sync body in threads; the caller's thread waits."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    count = call.workers
    # Made before the watches begin: the barrier is our machinery, not the test's locks.
    barrier = threading.Barrier(count)
    results: list[BaseException | None] = [None] * count
    nodeid = call.item.nodeid

    def copy(index: int) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        with contextlib.suppress(threading.BrokenBarrierError):  # a copy never came: go
            barrier.wait(BARRIER_TIMEOUT)
        try:
            check_result(nodeid, call.function(**copy_kwargs(call.kwargs, index, count)))
        except BaseException as exc:  # every outcome goes back, skip and exit included
            results[index] = exc

    for watch in call.watches:
        watch.begin()
    name = threading.current_thread().name
    threads = [
        # Each copy runs in a copy of this thread's context (one context cannot be entered
        # by two threads at once), so context variables set by fixtures are seen by all.
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(copy, index),
            name=f"{name}-copy{index}",
            daemon=True,
        )
        for index in range(count)
    ]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        for thread in threads:
            thread.start()
        _join_all(threads)
    finally:
        sys.setswitchinterval(previous)
    _finish(call, combine(call.item, results))


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
    from pytest_concur._loopwatch import note_body_task

    count = call.workers
    forget = note_body_task()
    for watch in call.watches:
        watch.begin()
    deadlock: DeadlockError | None = None
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_task_copy(call, index, count)) for index in range(count)]
    try:
        try:
            await asyncio.wait(tasks)
        except DeadlockError as exc:
            # The loop watch woke us (the body's task) with its diagnosis: the copies that
            # still wait are stuck for good. Cancel them and give them this error.
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
        if task.cancelled():
            outcome: BaseException | None = deadlock or asyncio.CancelledError()
        else:
            # A copy returns its exception; only ^C and SystemExit come out of result().
            outcome = task.result()
            if deadlock is not None and isinstance(outcome, asyncio.CancelledError):
                outcome = deadlock
        results.append(outcome)
    _finish(call, combine(call.item, results))


async def _task_copy(call: BodyCall, index: int, count: int) -> BaseException | None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    try:
        kwargs = copy_kwargs(call.kwargs, index, count)
        if call.is_async:
            await call.function(**kwargs)
        else:
            check_result(call.item.nodeid, call.function(**kwargs))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # every outcome goes back, skip and cancellation included
        return exc
    return None


def _finish(call: BodyCall, error: BaseException | None) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    _report(call.watches, error)
    if error is not None:
        raise error


# -- one verdict from N outcomes ----------------------------------------------------------


def combine(
    item: pytest.Item,
    errors: Sequence[BaseException | None],
    *,
    key: Callable[[int], Hashable] | None = None,
    render: Callable[[int], str] | None = None,
) -> BaseException | None:
    """The exception the item ends with, given each copy's (``None`` for a pass).

    ``key(i)`` tells failures apart (default: type, message and the line it was raised
    at); ``render(i)`` is copy ``i``'s failure as text (default: pytest's rendering). The
    summary of all copies goes in a section of the report (see :func:`add_section`).
    """
    __tracebackhide__ = True  # the plugin's frames are not the user's
    count = len(errors)
    key = key or (lambda i: failure_key(errors[i]))
    render = render or (lambda i: _render(item, errors[i]))
    for error in errors:
        if isinstance(error, (pytest.exit.Exception, KeyboardInterrupt, SystemExit)):
            return error
    failed = [i for i, e in enumerate(errors) if e is not None and not _is_outcome(e)]
    outcomes = [i for i, e in enumerate(errors) if e is not None and _is_outcome(e)]
    passed = [i for i, e in enumerate(errors) if e is None]
    if not failed and not outcomes:
        return None
    lines: list[str] = []
    if failed:
        groups: dict[Hashable, list[int]] = {}
        for i in failed:
            groups.setdefault(key(i), []).append(i)
        first, *others = groups.values()
        lines.append(f"{_copies(first, count)} failed with the error above")
        for group in others:
            lines.append(f"{_copies(group, count)} failed with another error:")
            lines.extend("    " + line for line in render(group[0]).splitlines())
        primary: BaseException | None = errors[first[0]]
    else:
        primary = errors[outcomes[0]]
    kinds: dict[str, list[int]] = {}
    for i in outcomes:
        kinds.setdefault(_outcome_text(errors[i]), []).append(i)
    for text, group in kinds.items():
        lines.append(f"{_copies(group, count)} {text}")
    if passed:
        lines.append(f"{_copies(passed, count)} passed")
    assert primary is not None
    if not failed:
        # Skipped or xfailed: the reason says which copies (no section is shown for those).
        if len(kinds) > 1 or passed:
            reason = getattr(primary, "msg", None) or str(primary)
            primary.msg = f"{reason} ({'; '.join(lines)})"  # type: ignore[attr-defined]
        return primary
    item.stash[_SECTION_TEXT] = "\n".join(lines)
    return primary


def add_section(item: pytest.Item, report: pytest.TestReport) -> None:
    """Put the summary of the copies under the failure in ``report``, if there is one."""
    text = item.stash.get(_SECTION_TEXT, None)
    if text is None:
        return
    del item.stash[_SECTION_TEXT]
    if not report.failed:
        return
    longrepr: Any = report.longrepr
    if hasattr(longrepr, "addsection"):
        longrepr.addsection(SECTION, text)
    elif isinstance(longrepr, str):
        report.longrepr = f"{longrepr}\n\n{SECTION}:\n{text}"


def failure_key(error: BaseException | None) -> Hashable:
    """What makes two failures the same: type, message, and the line that raised."""
    if error is None:
        return None
    tb = error.__traceback__
    site = ""
    while tb is not None:
        site = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return (type(error).__qualname__, str(error), site)


def _render(item: pytest.Item, error: BaseException | None) -> str:
    assert error is not None
    excinfo = pytest.ExceptionInfo.from_exception(error)
    try:
        return str(item.repr_failure(excinfo))
    except Exception:  # pragma: no cover - never lose a failure to its rendering
        return excinfo.exconly()


def _is_outcome(error: BaseException) -> bool:
    return isinstance(error, (pytest.skip.Exception, pytest.xfail.Exception))


def _outcome_text(error: BaseException | None) -> str:
    kind = "xfailed" if isinstance(error, pytest.xfail.Exception) else "skipped"
    return f"{kind}: {getattr(error, 'msg', None) or error}"


def _copies(indexes: Sequence[int], count: int) -> str:
    word = "copy" if len(indexes) == 1 else "copies"
    return f"{word} {', '.join(map(str, indexes))} of {count}"
