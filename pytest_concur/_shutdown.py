"""Threads a test left stuck must not hold the interpreter open after the session.

Python cannot stop a thread. A non-daemon thread that a hung or leaking test left blocked
in a wait nobody will end (a lock made before the test, C code) would make the interpreter
wait for it forever at exit, after the session has reported everything: CI then hangs
with a green-looking log. Such threads are handed to :func:`guard`. At exit, before the
interpreter joins its non-daemon threads (``threading._register_atexit`` callbacks run
just before that), the guarded threads still alive get a short grace; if any still runs,
the process says which, runs the ``atexit`` callbacks (coverage saves its data there),
flushes its streams and exits with the session's exit status.

Nothing is registered until a thread is guarded, so a clean session exits as it always
did. ``threading._register_atexit`` is private; without it, nothing is done.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Iterable

from pytest_concur import _locks

_GRACE = 1.0
_LOCK = _locks._real_rlock()  # reentrant: guard() may run in a signal handler
_GUARDED: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_registered = False
_exit_status = 0


def guard(threads: Iterable[threading.Thread]) -> None:
    """Keep these threads, if still alive and not daemons at exit, from blocking it."""
    global _registered
    with _LOCK:
        for thread in threads:
            if not thread.daemon:
                _GUARDED.add(thread)
        if _registered or not _GUARDED:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is None:  # pragma: no cover - not CPython's threading
            return
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(_at_exit)
            _registered = True


def note_exit_status(status: int) -> None:
    global _exit_status
    _exit_status = int(status)


def _at_exit() -> None:
    with _LOCK:
        threads = [t for t in _GUARDED if t.is_alive() and not t.daemon]
    for thread in threads:
        thread.join(_GRACE / max(len(threads), 1))
    stuck = [t for t in threads if t.is_alive()]
    if not stuck:
        return
    names = ", ".join(repr(t.name) for t in stuck)
    with contextlib.suppress(Exception):
        sys.stderr.write(
            f"pytest-concur: {len(stuck)} thread(s) left by the tests are still blocked "
            f"({names}) and would keep the interpreter from exiting; exiting without "
            "waiting for them.\n"
        )
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(_exit_status)
