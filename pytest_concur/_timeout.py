"""Deadlines of the tests that run under a backend: one timer, whoever set the timeout.

Who acts. Users set timeouts through pytest-timeout (its marker, ``--timeout``, the
``timeout`` ini key, ``PYTEST_TIMEOUT``). pytest-timeout arms a timer by calling the
``pytest_timeout_set_timer`` hook, whose first answer wins; for an item that runs under a
backend, ours answers and arms pytest-concur's timer instead of pytest-timeout's, and
``pytest_timeout_cancel_timer`` disarms it: exactly one of the two acts at the deadline.
When pytest-timeout sets no timeout for such an item (none configured, or ``-p
no:timeout``), the ``concur_timeout`` ini key (``--concur-timeout``; default
:data:`DEFAULT` seconds, 0 for none) is its deadline over its whole protocol: setup, call
and teardown.

At the deadline (``SIGALRM`` in the main thread, as pytest-timeout's signal method) the
test fails with the report of :mod:`pytest_concur._hang`: every thread with its stack and
the locks it holds, every task with its await chain, every child's stacks. Stuck threads
are let go where possible; the session goes on. As pytest-timeout does, the deadline does
not fire under a debugger. Where there is no ``SIGALRM`` (Windows), or the test protocol
does not run in the main thread, we arm nothing and pytest-timeout's own timer acts.

Invariant: at most one deadline is armed at a time (pytest runs one item at a time per
process); its state is read by the signal handler, which runs in the main thread.
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, final

import pytest

from pytest_concur._state import BACKEND_NAME

INI = "concur_timeout"
OPTION = "--concur-timeout"
DEFAULT = 120.0
# Tools whose trace function means a person is stepping through the code.
_DEBUGGERS = ("pdb", "bdb", "pydevd", "_pydevd", "debugpy", "pudb", "ipdb", "wdb", "pydev")


@final
@dataclasses.dataclass
class _Deadline:
    item: pytest.Item
    seconds: float
    source: str
    previous_handler: Any


_ARMED: _Deadline | None = None


def default(config: pytest.Config) -> float:
    """The deadline of backend tests for which pytest-timeout sets none (0: none)."""
    raw = config.getoption("concur_timeout", None)
    where = OPTION
    if raw is None:
        raw = config.getini(INI)
        where = INI
    if raw in (None, ""):
        return DEFAULT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise pytest.UsageError(
            f"{where} = {raw!r}: expected a number of seconds (0 for no deadline), e.g. {INI} = 60"
        )
    return seconds


def usable() -> bool:
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


def arm(item: pytest.Item, seconds: float, source: str) -> bool:
    """Arm the deadline of ``item`` in ``seconds``, replacing any armed one."""
    global _ARMED
    if seconds <= 0 or not usable():
        return False
    disarm()
    _install_parent_handler(item.config)
    from pytest_concur import _hang

    _hang.settle()  # threads a past hang let go of may be gone by now
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _ARMED = _Deadline(item, seconds, source, previous)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return True


_PARENT_HANDLER = pytest.StashKey[bool]()


def _install_parent_handler(config: pytest.Config) -> None:
    """Once per session: children forked by tests can then be asked for their stacks."""
    if config.stash.get(_PARENT_HANDLER, False):
        return
    config.stash[_PARENT_HANDLER] = True
    from pytest_concur import _hang

    undo = _hang.install_parent_handler()
    if undo is not None:
        config.add_cleanup(undo)


def disarm(item: pytest.Item | None = None) -> bool:
    """Disarm the armed deadline (of ``item``, if given); whether one was."""
    global _ARMED
    armed = _ARMED
    if armed is None or (item is not None and armed.item is not item):
        return False
    _ARMED = None
    signal.setitimer(signal.ITIMER_REAL, 0)
    if signal.getsignal(signal.SIGALRM) is _on_alarm:
        signal.signal(signal.SIGALRM, armed.previous_handler)
    return True


def armed_for(item: pytest.Item) -> bool:
    return _ARMED is not None and _ARMED.item is item


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    armed = _ARMED
    if armed is None:
        return
    if _debugging():
        return
    disarm()
    _fire(armed, frame)


def _debugging() -> bool:
    trace = sys.gettrace()
    module = inspect.getmodule(trace) if trace is not None else None
    if module is not None and module.__name__.split(".")[0].lstrip("_") in {
        name.lstrip("_") for name in _DEBUGGERS
    }:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None


def _fire(armed: _Deadline, frame: FrameType | None) -> None:
    """Fail the test with the report of everything it left standing."""
    # Not hidden from tracebacks: pytest notes it when every entry is hidden, even for a
    # failure whose traceback it does not show (pytrace=False).
    from pytest_concur import _hang, _locks, _shutdown

    item = armed.item
    started = time.monotonic()
    tracker = _locks.TRACKER
    body_thread = tracker.body_thread if tracker is not None else None
    passive = frozenset(tracker.passive_threads) if tracker is not None else frozenset()
    backend = item.stash.get(BACKEND_NAME, None)
    text = _hang.report(body_thread, passive, frame)
    alive = _hang.release(passive)
    _shutdown.guard(alive)
    seconds = f"{armed.seconds:g}"
    where = f" under the {backend} backend" if backend else ""
    message = (
        f"Timeout (>{seconds}s, {armed.source}): pytest-concur found no deadlock, but "
        f"{item.name}{where} did not finish: a busy loop, a livelock, or a wait it cannot "
        "see (C code, a lock made before the test, I/O). Where everything stood:\n\n"
        f"{text}\n\n(report made in {time.monotonic() - started:.2f}s)"
    )
    failure = pytest.fail.Exception(message, pytrace=False)
    failure.concur_hang_report = True  # type: ignore[attr-defined]  # see the backends
    raise failure


# -- hooks -------------------------------------------------------------------------------


def is_backend_item(item: pytest.Item) -> bool:
    from pytest_concur.plugin import _backend_name

    return _backend_name(item) is not None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout wants a timer for ``item``: for a backend test, ours is the one."""
    if not is_backend_item(item) or not usable():
        return None
    seconds = float(getattr(settings, "timeout", 0) or 0)
    return True if arm(item, seconds, "the pytest-timeout setting") else None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    return True if disarm(item) else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    own = False
    if is_backend_item(item) and not armed_for(item):
        seconds = default(item.config)
        own = arm(item, seconds, f"{INI} = {seconds:g}")
    try:
        return (yield)
    finally:
        if own:
            disarm(item)
