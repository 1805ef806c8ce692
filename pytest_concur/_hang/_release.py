"""Letting go of a hung test's threads, so that the session goes on.

After the report, :func:`release` unblocks what can be unblocked: tracked waits raise
:class:`HangError` (the tracker abandons them), and threads the test started that run
Python code are sent ``HangError`` asynchronously (an event loop such a thread runs is
woken, so that it runs Python code again; where sending is unsafe, the loop is stopped
instead). A thread blocked in C code keeps waiting; ``_shutdown`` then keeps it from
holding the interpreter open at exit. The HangError a thread dies of is kept from the
thread-exception hooks, however late it lands (:func:`_quiet`).

Invariant: like the report, this runs in a signal handler in the main thread and bounds
its wait for the threads (half a second in all). Abandoning the tracker's waits takes no
lock; the one lock it takes is ``_locks``' own short table lock of the threads left behind
(:func:`pytest_concur._locks.note_left_behind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time

from pytest_concur import _locks
from pytest_concur._errors import HangError

# The running version, typed so that mypy (set to the oldest one) keeps every branch.
_PYTHON: tuple[int, ...] = tuple(sys.version_info[:2])


def release(passive: frozenset[int]) -> list[threading.Thread]:
    """Unblock what can be unblocked; the threads of the test still alive (to be reported)."""
    tracker = _locks.TRACKER
    if tracker is not None:
        tracker.abandon("pytest-concur gave up on this test at its deadline")
    me = threading.get_ident()
    started = [] if tracker is None else [t for t in list(tracker.started) if t.is_alive()]
    body = [] if tracker is None else [tracker.body_thread]
    targets = [
        ident
        for ident in {t.ident for t in started} | set(body)
        if ident is not None and ident != me and ident not in passive
    ]
    if not targets:
        return started
    loops = _running_loops(targets)
    # Waited for: the threads the test started, and a thread whose loop we end (the
    # body's, under the thread backend), so that the teardown finds the loop stopped.
    waited = {t.ident for t in started} | set(loops)
    joined = [t for t in threading.enumerate() if t.ident in targets and t.ident in waited]
    # The threads die of HangError; that is our doing, not news for the thread-exception
    # hooks (pytest's would blame whatever test runs when it lands, maybe much later).
    for thread in joined:
        _quiet(thread)
    if _async_exceptions_safe():
        for ident in targets:
            _raise_in(ident)
        for loop in loops.values():
            # A loop waiting in select() runs no Python code that HangError could land in.
            with contextlib.suppress(Exception):
                loop.call_soon_threadsafe(_wake)
    else:
        for loop in loops.values():
            # No HangError to end the loop's run: stop it, so its thread returns and the
            # item's teardown can close it.
            with contextlib.suppress(Exception):
                loop.call_soon_threadsafe(loop.stop)
    deadline = time.monotonic() + 0.5
    for thread in joined:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            _locks._real_join(thread, remaining)
    # What is still alive was reported with this test: to every later test it is a thread
    # an earlier test left running (labelled so; no wait of theirs counts on it).
    _locks.note_left_behind(t for t in threading.enumerate() if t.ident in targets)
    return [thread for thread in started if thread.is_alive()]


def _quiet(thread: threading.Thread) -> None:
    """Keep the thread's HangError from the thread-exception hooks; others pass on.

    ``Thread`` hands an exception that ends its ``run`` to its own ``_invoke_excepthook``,
    which calls ``threading.excepthook``. That global hook is replaced and put back by
    others (pytest, the checks, the lock tracking) as tests come and go, and HangError may
    land long after this test; the thread's own attribute stays ours.
    """
    invoke = getattr(thread, "_invoke_excepthook", None)  # private; CPython 3.8+
    if invoke is None or getattr(invoke, "concur_quiet", False):
        return

    def quiet(thread: threading.Thread) -> None:
        if isinstance(sys.exc_info()[1], HangError):
            return
        invoke(thread)

    quiet.concur_quiet = True  # type: ignore[attr-defined]
    # One thread object's attribute, for its life: not process-wide, so not _patches'.
    with contextlib.suppress(Exception):
        setattr(thread, "_invoke_excepthook", quiet)  # noqa: B010 - typeshed lacks it


def _running_loops(idents: list[int]) -> dict[int, asyncio.AbstractEventLoop]:
    """The event loop running in each of these threads that runs one, from its stack."""
    frames = sys._current_frames()
    loops: dict[int, asyncio.AbstractEventLoop] = {}
    for ident in idents:
        frame = frames.get(ident)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "run_forever" and code.co_filename.endswith(_LOOP_FILE):
                loop = frame.f_locals.get("self")
                if isinstance(loop, asyncio.AbstractEventLoop):
                    loops[ident] = loop
                break
            frame = frame.f_back
    return loops


_LOOP_FILE = os.path.join("asyncio", "base_events.py")


def _wake() -> None:
    """A callback that does nothing: the loop's thread runs Python code again."""


def _async_exceptions_safe() -> bool:
    """Whether HangError may be sent to threads that are maybe blocked in C code.

    On Python 3.11, while an exception sent to a thread is pending (its thread blocked in
    C code, perhaps for ever), every thread that is traced (coverage, a debugger) spins
    on the first Python call it makes: the interpreter would hang. Other versions are not
    affected.
    """
    if _PYTHON != (3, 11):
        return True
    return sys.gettrace() is None and threading.gettrace() is None


def _raise_in(ident: int) -> None:
    """Ask a thread to raise HangError when it next runs Python code (CPython only)."""
    if sys.implementation.name != "cpython":  # pragma: no cover - other interpreters
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(HangError)
        )
