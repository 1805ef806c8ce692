"""Threads a test left stuck must not hold the interpreter open after the session.

Python cannot stop a thread. A non-daemon thread (or a worker of a ``concurrent.futures``
thread pool, which that module joins at exit) that a hung or leaking test left blocked in
a wait nobody will end (a lock made before pytest-concur loaded, C code) would make the
interpreter wait for it forever at exit, after the session has reported everything: CI then hangs
with a green-looking log. Such threads are handed to :func:`guard`. At exit, before the
interpreter joins its non-daemon threads (``threading._register_atexit`` callbacks run
just before that), the guarded threads still alive get a short grace; if any still runs,
the process says which, runs the ``atexit`` callbacks (coverage saves its data there),
flushes its streams and exits with the session's exit status.

Nothing is registered until a thread is guarded, so a clean session exits as it always
did. The callback is kept the last registered (it runs first): ``concurrent.futures`` may
register one later that joins its pools' workers, a stuck one among them.
``threading._register_atexit`` is private; without it, nothing is done.
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
    """Keep these threads, if still alive at exit and waited for there, from blocking it."""
    with _LOCK:
        for thread in threads:
            if _blocks_exit(thread):
                _GUARDED.add(thread)
        if _GUARDED:
            _register_last()


def _blocks_exit(thread: threading.Thread) -> bool:
    """Whether the interpreter waits for this thread at exit.

    It waits for non-daemon threads; and ``concurrent.futures`` waits for every worker of
    its thread pools, daemon or not (a thread started by a daemon thread, such as the body
    of the ``thread`` backend, is a daemon itself).
    """
    if not thread.daemon:
        return True
    pools = sys.modules.get("concurrent.futures.thread")
    workers = getattr(pools, "_threads_queues", None)  # private: the workers it joins
    try:
        return workers is not None and thread in workers
    except TypeError:  # pragma: no cover - not the weak dictionary it has always been
        return False


def note_exit_status(status: int) -> None:
    global _exit_status
    with _LOCK:
        _exit_status = int(status)
        if _registered:
            _register_last()  # the session is over: later registrations are the tests'


def _register_last() -> None:
    """Register :func:`_at_exit` again if something registered after it: it runs first.

    ``threading`` runs its exit callbacks last registered first. ``concurrent.futures``
    registers one that joins every worker of its thread pools, a stuck one included, when
    it is first imported, which may be after a thread was guarded here: it must not run
    before us. (An earlier registration of ours, run later, does nothing.)
    """
    global _registered, _last_entry
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - not CPython's threading
        return
    # Private, as register is: how it stores a callback varies between versions, so ours
    # is known by being what register appended.
    callbacks = getattr(threading, "_threading_atexits", None)
    if not isinstance(callbacks, list):  # pragma: no cover - not CPython's threading
        callbacks = None
    if _registered and callbacks is not None and callbacks and callbacks[-1] is _last_entry:
        return
    with contextlib.suppress(RuntimeError):  # already shutting down: too late to change
        register(_at_exit)
        _registered = True
        _last_entry = callbacks[-1] if callbacks else None


_last_entry: object = None
_exited = False


def _at_exit() -> None:
    global _exited
    with _LOCK:
        if _exited:
            return  # an earlier registration of ours
        _exited = True
        threads = [t for t in _GUARDED if t.is_alive() and _blocks_exit(t)]
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
