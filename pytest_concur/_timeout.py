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
are let go where possible; the session goes on. A deadline that passed gives the test's
teardown the same time again (what the test left stuck often stalls its fixtures' cleanup
too). As pytest-timeout does, the deadline does not fire under a debugger (in any thread of
the test), nor after pytest's debugger was entered. Where there is no ``SIGALRM``
(Windows), or the test protocol does not run in the main thread, we arm nothing and
pytest-timeout's own timer acts.

Where the deadline strikes. The failure it raises must end up as the failure of a step of
the test (setup, call, teardown) and must not cut pytest-concur's own cleanup in half
(checks putting back what they patched, children being stopped). A deadline that comes
between steps, or while the main thread is in such cleanup, is put off by a few
milliseconds at a time until it is in a step and out of the cleanup, or until the step
ends (it is then raised there); after :data:`_DEFER_LIMIT` seconds it strikes anyway. In
the teardown it strikes only inside a finalizer, never in pytest's bookkeeping around them.

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
from collections.abc import Generator
from types import CodeType, FrameType
from typing import Any, final

import pytest

from pytest_concur._state import BACKEND_NAME

INI = "concur_timeout"
OPTION = "--concur-timeout"
DEFAULT = 120.0
# Tools whose trace function means a person is stepping through the code: a module whose
# dotted name has a part starting with one of these (PyCharm's is _pydevd_bundle...).
_DEBUGGERS = ("pdb", "bdb", "pydev", "debugpy", "pudb", "ipdb", "wdb")
# A deadline that strikes at a bad moment (see the module's docstring) is tried again this
# much later, for at most _DEFER_LIMIT seconds past it.
_DEFER_STEP = 0.02
_DEFER_LIMIT = 10.0


@final
@dataclasses.dataclass
class _Deadline:
    item: pytest.Item
    seconds: float
    source: str
    previous_handler: Any
    # Armed through pytest-timeout's hook: its cancel call ends it. pytest-timeout also
    # cancels at every failure (pytest_exception_interact, for pdb's post-mortem); our own
    # deadlines outlive that, and pdb is told by pytest_enter_pdb instead.
    cancellable: bool = False
    # pytest-timeout's disable_debugger_detection turns this off.
    detect_debugger: bool = True
    due: float = 0.0


_ARMED: _Deadline | None = None
# The step of the test the main thread is in: (item, "setup" | "call" | "teardown").
_STEP: tuple[pytest.Item, str] | None = None
# Set once pytest's debugger was entered (from any thread): no deadline fires any more in
# this session, as pytest-timeout does.
_DEBUGGER_ENTERED = threading.Event()
# A deadline that passed: (seconds, source, detect_debugger), for the teardown's own.
_PASSED = pytest.StashKey[tuple[float, str, bool]]()


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
        # In the words of where it was written: the command line's, or the ini file's.
        given, example = (
            (f"{OPTION}={raw}", f"{OPTION}=60")
            if where == OPTION
            else (f"{INI} = {raw}", f"{INI} = 60")
        )
        raise pytest.UsageError(
            f"pytest-concur: {given}: expected a number of seconds, 0 or more (0 for no "
            f"deadline), e.g. {example}"
        )
    return seconds


def usable() -> bool:
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


def arm(
    item: pytest.Item,
    seconds: float,
    source: str,
    *,
    cancellable: bool = False,
    detect_debugger: bool = True,
) -> bool:
    """Arm the deadline of ``item`` in ``seconds``, replacing any armed one."""
    global _ARMED
    if seconds <= 0 or not usable():
        return False
    disarm()
    _install_parent_handler(item.config)
    # A handler set through signal's own API and put back at disarm, not an attribute
    # replaced: not _patches' (which owns the replacements), and it must stay this cheap.
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _ARMED = _Deadline(
        item,
        seconds,
        source,
        previous,
        cancellable=cancellable,
        detect_debugger=detect_debugger,
        due=time.monotonic() + seconds,
    )
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
    if armed is None or _DEBUGGER_ENTERED.is_set():
        return
    if not _may_strike(armed, frame) and time.monotonic() < armed.due + _DEFER_LIMIT:
        signal.setitimer(signal.ITIMER_REAL, _DEFER_STEP)
        return
    disarm()  # spent, whatever follows
    if armed.detect_debugger and _debugging():
        return  # as pytest-timeout: not for this test, not later either
    _fire(armed, frame)


def _may_strike(armed: _Deadline, frame: FrameType | None) -> bool:
    """Whether the main thread, stopped at ``frame``, is where a deadline may strike."""
    step = _STEP
    if step is None or step[0] is not armed.item or _in_cleanup(frame):
        return False
    # In the teardown, only inside a finalizer: raised in pytest's own bookkeeping around
    # them, the failure would leave its stack of set-up nodes half unwound, and every
    # later test would error with "previous item was not torn down properly". Elsewhere
    # in the teardown the deadline is put off to the step's end (_strike_if_due).
    return step[1] != "teardown" or _in_finalizer(frame)


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a finalizer that pytest's teardown called."""
    while frame is not None:
        caller = frame.f_back
        if (
            caller is not None
            and caller.f_code.co_name == "teardown_exact"
            and frame.f_code.co_name != "listchain"
        ):
            return True
        frame = caller
    return False


def _in_cleanup(frame: FrameType | None) -> bool:
    """Whether the main thread runs pytest-concur's cleanup, which must not be cut in half.

    That is: a check's watch beginning or ending (whoever wrote the check: its ``begin``
    and ``end`` are called from our code), the lock tracking being put in place or back,
    a runner closing, a child process being stopped, our own deadline's bookkeeping.
    """
    from pytest_concur import _locks  # (not at the top: pytest --help needs no lock tracker)

    codes = _cleanup_codes()
    while frame is not None:
        code = frame.f_code
        if code in codes:
            return True
        caller = frame.f_back
        if (
            code.co_name in ("begin", "end")
            and caller is not None
            and caller.f_code.co_filename.startswith(_locks._PACKAGE)
        ):
            return True
        frame = caller
    return False


_CLEANUP = {
    "pytest_concur._locks": ("tracking.__enter__", "tracking.__exit__", "tracking._restore"),
    "pytest_concur._watching": ("_report", "end_watches"),
    "pytest_concur._backends.process": (
        "_ProcessRunner.close",
        "_stop",
        "_end_orphans",
        "_dump_stacks",
    ),
    "pytest_concur._items": ("_close",),
    __name__: ("arm", "disarm", "_strike_if_due"),
}


def _cleanup_codes() -> set[CodeType]:
    # Looked up in sys.modules: a module not imported yet has no frame on the stack.
    codes = set()
    for module_name, names in _CLEANUP.items():
        for dotted in names:
            obj: Any = sys.modules.get(module_name)
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
            code = getattr(obj, "__code__", None)
            if isinstance(code, CodeType):
                codes.add(code)
    return codes


def _debugging() -> bool:
    """Whether a debugger steps through the code, in the main thread or another one."""
    if _is_debugger(sys.gettrace()):
        return True
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None:
        return True
    # A debugger may trace only the thread it stopped in (the body's, under the thread
    # backend): the frames it traces carry its trace function.
    for frame in sys._current_frames().values():
        current: FrameType | None = frame
        while current is not None:
            if current.f_trace is not None and _is_debugger(current.f_trace):
                return True
            current = current.f_back
    return False


def _is_debugger(trace: object) -> bool:
    if trace is None:
        return False
    module = inspect.getmodule(trace) or inspect.getmodule(type(trace))
    if module is None:
        return False
    return any(
        part.lstrip("_").startswith(name)
        for part in module.__name__.split(".")
        for name in _DEBUGGERS
    )


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
        "see (C code, I/O, a lock made before pytest-concur loaded). Where everything "
        "stood:\n\n"
        f"{text}\n\n(report made in {time.monotonic() - started:.2f}s)"
    )
    if _PASSED not in item.stash:
        item.stash[_PASSED] = (armed.seconds, armed.source, armed.detect_debugger)
    step = _STEP
    if step is not None and step[0] is item and step[1] == "teardown":
        _arm_for_teardown(item)  # the rest of the teardown: its other finalizers
    failure = pytest.fail.Exception(message, pytrace=False)
    failure.concur_hang_report = True  # type: ignore[attr-defined]  # see the backends
    raise failure


def _arm_for_teardown(item: pytest.Item) -> None:
    """After its deadline, a test's teardown gets the same time again, once it starts."""
    passed = item.stash.get(_PASSED, None)
    if passed is None or armed_for(item):
        return
    seconds, source, detect_debugger = passed
    arm(
        item,
        seconds,
        f"{source}, given again to the teardown after the deadline passed",
        detect_debugger=detect_debugger,
    )


def _strike_if_due(item: pytest.Item) -> None:
    """At the end of a step: strike with a deadline that was put off past the step's code."""
    armed = _ARMED
    if armed is None or armed.item is not item or time.monotonic() < armed.due:
        return
    disarm()
    if _DEBUGGER_ENTERED.is_set() or (armed.detect_debugger and _debugging()):
        return
    _fire(armed, sys._getframe())


# -- hooks -------------------------------------------------------------------------------


def is_backend_item(item: pytest.Item) -> bool:
    from pytest_concur._state import parametrized_backend as _backend_name

    return _backend_name(item) is not None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout wants a timer for ``item``: for a backend test, ours is the one."""
    if not is_backend_item(item) or not usable():
        return None
    seconds = float(getattr(settings, "timeout", 0) or 0)
    detect = not getattr(settings, "disable_debugger_detection", False)
    armed = arm(
        item,
        seconds,
        "the pytest-timeout setting",
        cancellable=True,
        detect_debugger=detect,
    )
    return True if armed else None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    armed = _ARMED
    if armed is None or armed.item is not item or not armed.cancellable:
        return None  # not ours to cancel (see _Deadline.cancellable)
    return True if disarm(item) else None


def pytest_enter_pdb(config: pytest.Config, pdb: Any) -> None:
    """A person is at pytest's debugger prompt (breakpoint(), --pdb): no deadline fires.

    This may run in the body's thread: the armed timer stays (only the main thread may
    touch signal handlers), and the handler does nothing.
    """
    _DEBUGGER_ENTERED.set()


def pytest_unconfigure(config: pytest.Config) -> None:
    _DEBUGGER_ENTERED.clear()  # for this session only (pytester runs several in a process)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    global _STEP
    if is_backend_item(item) and not armed_for(item):
        seconds = default(item.config)
        arm(item, seconds, f"{INI} = {seconds:g}")
    try:
        return (yield)
    finally:
        _STEP = None
        disarm(item)  # whoever armed it: nothing of this test outlives it


def _step(item: pytest.Item, when: str) -> Generator[None, object, object]:
    """Around one step of a test: where its deadline may strike (see the module)."""
    global _STEP
    outer = _STEP
    _STEP = (item, when)
    try:
        if when == "teardown":
            _arm_for_teardown(item)
        result = yield
        _strike_if_due(item)
        return result
    finally:
        _STEP = outer


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _step(item, "setup"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _step(item, "call"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _step(item, "teardown"))
