"""An exception in a fixture's thread, raised while a test runs, fails that test.

A fixture's thread (a server, a poller) that raises while the test runs is the test's
business: what the test asked of it failed. Left to pytest, it is only a
``PytestUnhandledThreadExceptionWarning``, easy to miss. The ``threads`` check already
fails a test for the threads its body started; this plugin does the same for the threads
that the fixtures' lineages started (``threads.Lineage``: the fixtures of tests that run
under a backend, every fixture with ``--concur-check-all``).

Design. Around pytest's call phase of such a test, in pytest's process (the fixtures live
there whatever the backend: the ``process`` backend's body runs in a child, its fixtures
do not), ``threading.excepthook`` is wrapped (``pytest_concur._patches.replace``, once per
session; it does something only while a call phase is watched): the exception of a
thread that a live fixture's lineage started is recorded, formatted where it happens,
instead of handed on; every other goes to the hook that was there. The threads check's own
hook, put on top of ours while a body's threads run, hands us the threads it does not own.
Exceptions raised in the setup or teardown of the test stay pytest's, as before.
``checks_off=["threads"]`` turns it off with the threads check; ``started_by`` patterns
match where the fixture started the thread.

Invariant: the recording state is only touched under its own lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _primitives
from pytest_concur._state import backend_of

if TYPE_CHECKING:
    from pytest_concur._checks._allow import Allow
    from pytest_concur._checks._where import Site

# Taken at import, before any check runs: the deadlock check swaps threading.Lock for a
# tracked one during the body, and our own bookkeeping must not be tracked.
_real_lock = _primitives.allocate_lock
_lock = _real_lock()
# What the watched call phase recorded: (thread name, where it was started, traceback),
# or None while no call phase is watched. Read by the hook without the lock first.
_RECORDED: list[tuple[str, Site, str]] | None = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    if not _watched(item):
        return (yield)
    # Imported here: --help registers this module and must not pay for the checks.
    from pytest_concur._checks import _allow

    allow = _allow.for_item(item)
    if "threads" in allow.checks_off:
        return (yield)
    global _RECORDED
    from pytest_concur import _patches  # not imported by a run of --help

    _patches.replace(threading, "excepthook", _hook)
    with _lock:
        _RECORDED = []
    try:
        yield
    except BaseException as exc:
        text = _report(_take(), allow)
        if text is not None:
            _add_note(exc, text)
        raise
    text = _report(_take(), allow)
    if text is not None:
        pytest.fail(text, pytrace=False)


def _watched(item: pytest.Item) -> bool:
    if backend_of(item) is not None:
        return True
    from pytest_concur._checks.fixtures import check_all

    return check_all(item.config)


def _take() -> list[tuple[str, Site, str]]:
    global _RECORDED
    with _lock:
        recorded, _RECORDED = _RECORDED or [], None
    return recorded


def _hook(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``threading.excepthook``, keeping the exceptions of fixtures' threads (installed once)."""

    def excepthook(args: Any) -> None:
        thread = args.thread
        if _RECORDED is not None and thread is not None and args.exc_value is not None:
            from pytest_concur._checks.threads import started_for_a_fixture

            site = started_for_a_fixture(thread)
            if site is not None and not _is_deadlock_error(args.exc_value):
                from pytest_concur._checks._where import format_exception

                text = format_exception(args.exc_value)
                with _lock:
                    if _RECORDED is not None:
                        _RECORDED.append((thread.name, site, text))
                        return
        original(args)

    return excepthook


def _is_deadlock_error(exc: BaseException) -> bool:
    locks = sys.modules.get("pytest_concur._locks")
    return locks is not None and isinstance(exc, locks.DeadlockError)


def _report(recorded: list[tuple[str, Site, str]], allow: Allow) -> str | None:
    problems = [
        f"pytest-concur: an exception was raised in thread {name!r}, which a fixture started "
        f"at {site}, while the test ran\n{text.rstrip()}"
        for name, site, text in recorded
        if not allow.allows("started_by", (), site)
    ]
    return "\n\n".join(problems) or None


def _add_note(exc: BaseException, text: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(f"\npytest-concur also found:\n{text}")
