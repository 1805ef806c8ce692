"""The report of a test that hung without a deadlock pytest-concur could prove.

When a backend test reaches its deadline (see ``_timeout``), :func:`report` describes where
everything of the test stands, for a person to act on:

- every thread, with its stack, the tracked locks it holds and the tracked wait it is in;
- every pending asyncio task, with its await chain and what it awaits;
- every child process, with its Python stacks when they can be had (see ``_children``).

:func:`report_in_child` is the same report made inside a child of the process backend, for
its parent's.

Invariant: this code runs in a signal handler in the main thread, which may hold any of
the plugin's locks at that moment; it never blocks on a lock (it reads the tracker's
tables without its mutex, retrying on a concurrent change, see :func:`_copy`) and bounds
every wait. A part of the report that fails says so instead of losing the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pytest_concur import _locks
from pytest_concur._checks._where import callable_name
from pytest_concur._hang._children import children_report
from pytest_concur._loop_deadlocks import task_lines
from pytest_concur._stacks import stack_lines

# The running version, typed so that mypy (set to the oldest one) keeps every branch.
_PYTHON: tuple[int, ...] = tuple(sys.version_info[:2])


def report(body_thread: int | None, passive: frozenset[int], main_frame: FrameType | None) -> str:
    """Every thread, task and child of the test, as text.

    ``body_thread`` runs the test body (``None`` when it runs in a child process);
    ``passive`` threads only wait for the body and are left out; ``main_frame`` is the
    frame the main thread was interrupted in, when this runs in a signal handler.
    """
    sections = [
        _section("threads", lambda: _threads(body_thread, passive, main_frame)),
        _section("tasks", _tasks),
        _section("child processes", children_report),
    ]
    text = "\n\n".join(section for section in sections if section)
    return text or "(no thread, task or child process of the test was found)"


def _section(what: str, make: Callable[[], str]) -> str:
    """One part of a report; a part that fails says so instead of losing the rest.

    The report runs in a signal handler, at whatever moment the deadline struck: a thread
    or task in an odd state must not turn the test's failure into a crash of ours.
    """
    try:
        return make()
    except Exception as exc:
        return f"(pytest-concur could not list the {what}: {type(exc).__name__}: {exc})"


def report_in_child(main_frame: FrameType | None, *, runs_the_body: bool = True) -> str:
    """The threads and tasks of this process (a child), for its parent's report.

    ``runs_the_body`` is false in a process the body's process forked: its thread that
    has the body thread's ident (a fork keeps it) is not the body.
    """
    tracker = _locks.TRACKER
    body: int | None = tracker.body_thread if tracker is not None else threading.get_ident()
    if not runs_the_body:
        body = None
    sections = [
        _section("threads", lambda: _threads(body, frozenset(), main_frame, in_child=True)),
        _section("tasks", _tasks),
    ]
    return "\n\n".join(section for section in sections if section)


# -- threads ---------------------------------------------------------------------------


def _threads(
    body_thread: int | None,
    passive: frozenset[int],
    main_frame: FrameType | None,
    *,
    in_child: bool = False,
) -> str:
    frames = sys._current_frames()
    me = threading.get_ident()
    if main_frame is not None:
        frames[me] = main_frame
    tracker = _locks.TRACKER
    started = set() if tracker is None else {t.ident for t in list(tracker.started)}
    names = {t.ident: t for t in threading.enumerate()}
    order = sorted(
        (ident for ident in frames if ident not in passive),
        key=lambda ident: (ident != body_thread, ident not in started, _name(names, ident)),
    )
    waits = _locks.waits_now(tracker, frames)
    waited_on = [w.lock for w in waits.values() if w.holder() is not None and w.lock is not None]
    # Threads alike (a pool's idle workers, copies of one loop) are shown once, as one
    # block: (roles, lines) -> the names of the threads it stands for.
    blocks: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for ident in order:
        # (A forked child's stack starts with its parent's frames, waiting included.)
        if ident == me and not in_child and main_frame is not None and waits_for_body(main_frame):
            continue  # pytest's thread, waiting for the body's thread or process
        thread = names.get(ident)
        role = []
        if ident == body_thread:
            role.append("the test body")
        elif ident in started:
            role.append("started by the test")
        elif thread is not None and _locks.left_behind(thread):
            role.append("left running by an earlier test")
        elif tracker is not None and ident in tracker.foreign_at_start:
            role.append("running before the test began")
        elif thread is None:
            role.append("not a threading.Thread: started by C code or _thread")
        if thread is not None and thread.daemon:
            role.append("daemon")
        body = stack_lines(frames[ident])
        state: list[str] = []
        held: list[_locks.TrackedLock] = []
        if tracker is not None:
            held = _copy(lambda ident=ident: list(tracker.held.get(ident, ()))) or []
        # And the locks someone waits on that this thread holds, however it took them
        # (before the test, say): the holder of every lock a stuck thread waits on is named.
        held += [lock for lock in waited_on if lock.owner == ident and lock not in held]
        for lock in held:
            kind = "RLock" if lock._reentrant else "Lock"
            state.append(f"holds {kind} created at {lock.site}")
        wait = waits.get(ident)
        if wait is not None:
            state.append(f"{wait.describe()} (at {wait.site})")
        if not body:
            target = getattr(thread, "_target", None)  # private, but the only clue left
            if target is not None:
                body = [f"(no Python frames of its own: it runs {callable_name(target)})"]
            elif ident in (me, body_thread) or ident in started or state:
                body = ["(only pytest's and pytest-concur's own frames: between steps of the test)"]
            else:
                continue  # the harness's (an xdist or pytest thread): nothing of the test's
        body += state
        roles = f" ({', '.join(role)})" if role else ""
        blocks.setdefault((roles, tuple(body)), []).append(_name(names, ident))
    lines = ["Threads (most recent call last):"]
    for shown, ((roles, block), members) in enumerate(blocks.items()):
        if shown == _MAX_THREAD_BLOCKS:
            rest = [name for group in list(blocks.values())[shown:] for name in group]
            lines.append(f"  ... and {len(rest)} more threads, not shown: {_some(rest)}")
            break
        if len(members) == 1:
            lines.append(f"  Thread {members[0]}{roles}:")
        else:
            lines.append(f"  {len(members)} threads alike, {_some(members)}{roles}:")
        lines.extend("    " + line for line in block)
    return "\n".join(lines) if len(lines) > 1 else ""


# A report stays readable, however many threads a test left: alike threads share a block,
# and past this many blocks only names are given.
_MAX_THREAD_BLOCKS = 40


def _some(names: list[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 7 more``."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _name(names: dict[int | None, threading.Thread], ident: int) -> str:
    thread = names.get(ident)
    return repr(thread.name) if thread is not None else f"<thread {ident}>"


def _copy(read: Any) -> Any:
    """Read a table another thread may be changing, without its lock (see the invariant)."""
    for _ in range(10):
        with contextlib.suppress(RuntimeError):
            return read()
    return None


def waits_for_body(frame: FrameType | None) -> bool:
    """Whether a thread stopped at ``frame`` is a backend waiting for the body to end."""
    waiting = {
        os.path.join(_locks._PACKAGE, "_backends", name) for name in ("thread.py", "process.py")
    }
    while frame is not None:
        code = frame.f_code
        if code.co_filename in waiting and code.co_name == "run":
            return True
        frame = frame.f_back
    return False


# -- tasks -----------------------------------------------------------------------------


def _pending_tasks() -> dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]]:
    """Pending tasks of every event loop of the process.

    A loop running in another thread cannot be asked for from here, and asyncio keeps no
    public list of loops; it keeps a registry of every task, though (see :func:`_all_tasks`).
    """
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]] = {}
    for task in _all_tasks():
        with contextlib.suppress(Exception):
            if not task.done():
                loops.setdefault(task.get_loop(), []).append(task)
    return loops


# asyncio's own registries of every task, all threads' (what asyncio.all_tasks filters).
_TASK_REGISTRIES = ("_all_tasks", "_scheduled_tasks", "_eager_tasks")


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Every task of the process.

    Up to Python 3.13 asyncio registers every task in module-level sets, which are cheap to
    read. From 3.14 its C tasks live in per-thread lists that can only be asked for one
    loop at a time, and the loops are not listed anywhere: the collector's list of live
    objects is walked instead, which costs a few tenths of a second in a process of
    millions of objects.
    """
    if _PYTHON < (3, 14):
        found: list[asyncio.Task[Any]] = []
        for name in _TASK_REGISTRIES:
            registry = getattr(asyncio.tasks, name, None)
            if registry is not None:
                found.extend(_copy(lambda registry=registry: list(registry)) or ())
        return found
    return [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task)]


def _tasks() -> str:
    lines = []
    for loop in _pending_tasks():
        if loop.is_closed():
            continue
        lines.append(f"Tasks of event loop {type(loop).__name__} at 0x{id(loop):x}:")
        lines.extend("  " + line if line else "" for line in task_lines(loop))
    return "\n".join(lines)
