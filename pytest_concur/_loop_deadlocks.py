"""Deadlock detection inside the event loops pytest-concur runs.

An event loop is deadlocked when every task waits and nothing can ever wake one: no
callback is ready, no timer is due, no file descriptor but the loop's own wake-up pipe is
watched, no executor job is pending, and no other thread is at work that could call
``call_soon_threadsafe`` (trio's criterion, applied to asyncio). The loop tells us the first
three itself: it calls ``select(None)`` exactly when it has no ready callback and no timer.
So our loops get a selector that, asked to block forever, probes in short slices instead and
checks the rest; when the loop is provably stuck it raises :class:`DeadlockError` out of
the loop, with every task and what it awaits. Threads are judged with the lock tracker's
knowledge (``_locks``): a thread blocked in a tracked wait without timeout wakes nobody.

Loops made by others. Under ``--concur-check-all`` the async tests of pytest-asyncio and
anyio run on loops their fixtures made, before the test's watch. :class:`ThreadLoops`
watches those too, for as long as the test's watch lasts: the first time a task is created
on one in the test's thread (their runners create the test's task, or the task they run
until complete, right before running the loop there), the loop's selector is wrapped in a
:class:`WatchingSelector` with the same rules, and put back when the watch ends. A loop
whose selector we cannot reach the way CPython's selector loops keep it stays unwatched.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import CodeType
from typing import Any, final

from pytest_concur import _locks, _patches
from pytest_concur._errors import DeadlockError

_PROBE = 0.01
_MAX_PROBE = 0.1


@final
class WatchingSelector(selectors.BaseSelector):
    """A selector (the default one, or the loop's own it wraps) that blocks forever only in
    watched slices."""

    def __init__(self, inner: selectors.BaseSelector | None = None) -> None:
        self._inner = inner if inner is not None else selectors.DefaultSelector()
        # The loop watched; None: none (yet, or any more), select() only passes through.
        self.loop: asyncio.AbstractEventLoop | None = None
        # For a loop made by others, what watches it (where its body is, which signal
        # handlers are its runner's); None for a WatchedLoop.
        self.owner: ThreadLoops | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # What a selector loop of a later CPython might ask of its selector beyond the
        # BaseSelector API: the wrapped selector answers (a loop we watch must not break).
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        loop = self.loop
        if timeout is not None or loop is None:
            return self._inner.select(timeout)
        owner = self.owner
        if owner is not None and threading.get_ident() != owner.thread:
            return self._inner.select(timeout)
        probe = _PROBE
        suspect = False
        while True:
            events = self._inner.select(probe)
            if events:
                return events
            if self.loop is not loop:
                return []  # no longer watched: the loop's next select() is its own
            if self._stuck():
                if suspect:  # stuck on two looks in a row
                    self._fail(loop)
                    return []
                suspect = True
                continue
            suspect = False
            probe = min(probe * 2, _MAX_PROBE)

    def _body(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        if isinstance(loop, WatchedLoop):
            return loop.body_task
        owner = self.owner
        return owner.body(loop) if owner is not None else None

    def _fail(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the test body where it awaits; failing that, fail the loop itself."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        body = self._body(loop)
        report = _report(loop, body)
        error = DeadlockError(report)
        tracker = _locks.TRACKER
        if tracker is not None:
            # Threads blocked in tracked waits for this loop (an executor job waiting on an
            # Event) unwind too, so the loop's executor can shut down.
            tracker.set_verdict(report)
        # The future the body's task is parked on (Task._fut_waiter, private: the only way
        # to wake the body with the error where the user's code awaits), through any tasks
        # it awaits, down to a plain future.
        waiter = getattr(body, "_fut_waiter", None) if body is not None else None
        seen = 0
        while isinstance(waiter, asyncio.Task) and seen < 100:
            waiter = getattr(waiter, "_fut_waiter", None)
            seen += 1
        if (
            isinstance(waiter, asyncio.Future)
            and not isinstance(waiter, asyncio.Task)
            and not waiter.done()
        ):
            waiter.set_exception(error)
            return
        error.from_loop = True  # type: ignore[attr-defined]
        raise error

    def _stuck(self) -> bool:
        loop = self.loop
        if loop is None or len(self._inner.get_map()) > 1:
            return False
        if getattr(loop, "_signal_handlers", None):
            return False  # loop.add_signal_handler: a signal may wake it
        tracker = _locks.TRACKER
        passive = tracker.passive_threads if tracker is not None else frozenset()
        waits = tracker.snapshot() if tracker is not None else {}
        if tracker is not None and not tracker.handlers_unchanged():
            owner = self.owner
            if owner is None or not owner.only_runner_handlers():
                return False  # a signal handler the test installed may wake it
        me = threading.get_ident()
        frames = sys._current_frames()
        for thread in threading.enumerate():
            ident = thread.ident
            if ident == me or ident in passive or not thread.is_alive():
                continue
            wait = waits.get(ident) if ident is not None else None
            if wait is not None and wait.timeout is None:
                continue  # blocked in a tracked wait: it wakes nobody
            if _locks.can_wake(thread, frames):
                return False  # a thread at work could still wake the loop
        return any(not task.done() for task in asyncio.all_tasks(loop))


@final
class WatchedLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose select() notices when it would block forever."""

    def __init__(self) -> None:
        selector = WatchingSelector()
        super().__init__(selector)
        selector.loop = self
        # The task running the test body, set while it runs (see BodyCall.call_async).
        self.body_task: asyncio.Task[Any] | None = None


def new_loop() -> asyncio.AbstractEventLoop:
    """A loop for pytest-concur's runners: watched where selectors allow, plain elsewhere."""
    if not hasattr(asyncio, "SelectorEventLoop") or not hasattr(selectors, "DefaultSelector"):
        return asyncio.new_event_loop()  # pragma: no cover - not POSIX
    return WatchedLoop()


def _report(loop: asyncio.AbstractEventLoop, body: asyncio.Task[Any] | None) -> str:
    lines = [
        "pytest-concur: deadlock: every task of the event loop waits, and nothing can wake "
        "one (no ready callback, no timer, no I/O, no executor job, no thread at work)"
    ]
    lines.extend(task_lines(loop, indent="  ", body=body))
    return "\n".join(lines)


def task_lines(
    loop: asyncio.AbstractEventLoop, indent: str = "", body: asyncio.Task[Any] | None = None
) -> list[str]:
    """Each pending task of ``loop``: what it awaits and where, then its await chain.

    The body's task first: ``body``, else the one a :class:`WatchedLoop` runs.
    """
    if body is None:
        body = getattr(loop, "body_task", None)
    tasks = sorted(
        (task for task in asyncio.all_tasks(loop) if not task.done()),
        key=lambda task: (task is not body, _coro_name(task), _task_name(task)),
    )
    running = asyncio.current_task(loop)
    lines = []
    for task in tasks:
        if task is running:  # only when asked from a signal handler, or another thread
            lines.append(f"{indent}task {_task_name(task)!r} is running (see its thread's stack)")
            continue
        site, awaited = _await_point(task)
        lines.append(f"{indent}task {_task_name(task)!r} ({_coro_name(task)}) awaits {awaited}")
        lines.append(f"{indent}  at {site}")
    for task in tasks:
        frames = _await_frames(task.get_coro())
        if not frames:
            continue
        lines.append("")
        lines.append(f"Await chain of task {_task_name(task)!r}:")
        for frame in frames:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
    return lines


def _task_name(task: asyncio.Task[Any]) -> str:
    # 3.13 may leave a task unnamed (get_name() is None) until someone names it.
    return task.get_name() or f"Task at 0x{id(task):x}"


def _coro_name(task: asyncio.Task[Any]) -> str:
    """The outermost user coroutine the task runs (past pytest-concur's own wrappers)."""
    obj: Any = task.get_coro()
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None and not frame.f_code.co_filename.startswith(_locks._PACKAGE):
            return str(getattr(obj, "__qualname__", None) or frame.f_code.co_name)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    coro = task.get_coro()
    return str(getattr(coro, "__qualname__", None) or type(coro).__name__)


def _await_frames(coro: Any) -> list[Any]:
    """The frames of a coroutine's await chain, outermost first, pytest-concur's left out."""
    frames = []
    obj = coro
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None and not frame.f_code.co_filename.startswith(_locks._PACKAGE):
            frames.append(frame)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return frames


def _await_point(task: asyncio.Task[Any]) -> tuple[str, str]:
    """Where the task's user code awaits, and a description of what it awaits."""
    frames = _await_frames(task.get_coro())
    user = [f for f in frames if not _locks._is_machinery(f)]
    site = _locks.user_site(user[-1]) if user else "<unknown>"
    innermost = frames[-1] if frames else None
    if innermost is not None and _locks._is_machinery(innermost):
        owner = innermost.f_locals.get("self")
        kind = type(owner).__name__ if owner is not None else ""
        call = f"{kind}.{innermost.f_code.co_name}" if kind else innermost.f_code.co_name
        return site, f"asyncio {call}()"
    # What the task's step is parked on. Task._fut_waiter is private, but it is the only
    # way to see it; without it we say less, nothing breaks.
    waiter = getattr(task, "_fut_waiter", None)
    if isinstance(waiter, asyncio.Task):
        return site, f"task {_task_name(waiter)!r}"
    children = getattr(waiter, "_children", None)
    if children:
        names = ", ".join(
            repr(_task_name(child)) for child in children if isinstance(child, asyncio.Task)
        )
        return site, f"gather() of tasks {names}" if names else "gather()"
    if isinstance(waiter, (asyncio.Future, Future)):
        return site, "a future that nothing completes"
    return site, "something pytest-concur cannot see"


def note_body_task() -> Callable[[], None]:
    """Mark the running task as the test body's; returns the function that unmarks it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another event loop's (a third-party backend's: trio, say)
        return lambda: None
    if not isinstance(loop, WatchedLoop):
        return lambda: None
    loop.body_task = asyncio.current_task()

    def forget() -> None:
        loop.body_task = None

    return forget


@final
class ThreadLoops:
    """Watch the loops that run in this thread from now until :meth:`close`, made by others.

    For a test that runs plainly under ``--concur-check-all``: pytest-asyncio's and anyio's
    loops, made by their fixtures (or by anyio inside the call) before anything of ours
    could give them a selector. A loop is taken on the first task created on it in this
    thread (``BaseEventLoop.create_task``, listened to through ``_patches``): their runners
    create the test's task, or the one they run until complete, right before running the
    loop here. ``body_code`` is the test function's code: the task whose await chain runs
    it is the one woken with the error (anyio runs the test inside its runner task).
    """

    def __init__(self, body_code: CodeType | None) -> None:
        self.thread = threading.get_ident()
        self._body_code = body_code
        self._handlers = _handlers()
        # Each loop taken: its own selector, and ours. And per loop, the last task created
        # on it in this thread before it ran: what run_until_complete() runs, the body's
        # task when no task runs the test function (asyncio.run in a sync test).
        self._taken: dict[asyncio.AbstractEventLoop, tuple[Any, WatchingSelector]] = {}
        # (an asyncio.Task, or the backport's pure-Python one, not an asyncio.Task to mypy)
        self._roots: dict[asyncio.AbstractEventLoop, Any] = {}
        self._stop = _patches.listen(_patches.LOOP_CREATE_TASK, self._on_create_task)

    def _on_create_task(self, loop: Any, task: Any) -> None:
        if (
            threading.get_ident() != self.thread
            # isfuture, not isinstance(task, asyncio.Task): the Runner backport that
            # pytest-asyncio uses before 3.11 makes its task a pure-Python Task.
            or not asyncio.isfuture(task)
            or isinstance(loop, WatchedLoop)  # ours: watched already
        ):
            return
        if not loop.is_running():
            self._roots[loop] = task
        elif asyncio._get_running_loop() is not loop:
            return  # it runs in another thread: not the test's loop
        if loop not in self._taken:
            self._take(loop)

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:
        # BaseSelectorEventLoop._selector is private: the one place a selector loop keeps
        # its selector, and what _run_once() asks for on each pass (so a swap between two
        # passes holds). Read from the instance's dict and checked for what it must be, so
        # that a CPython that keeps it otherwise leaves the loop unwatched, not broken.
        if not isinstance(loop, asyncio.SelectorEventLoop) or loop.is_closed():
            return
        inner = vars(loop).get("_selector")
        if not isinstance(inner, selectors.BaseSelector) or isinstance(inner, WatchingSelector):
            return
        selector = WatchingSelector(inner)
        selector.loop = loop
        selector.owner = self
        loop._selector = selector  # type: ignore[attr-defined]
        self._taken[loop] = (inner, selector)

    def only_runner_handlers(self) -> bool:
        """Whether the signal handlers that differ from the watch's start are only the
        SIGINT handler of an ``asyncio.Runner`` (pytest-asyncio's, ``asyncio.run``'s), which
        ``Runner.run`` installs inside the watch: only ^C calls it, as it would interrupt
        any test."""
        for signum, handler in self._handlers.items():
            now = _getsignal(signum)
            if now != handler and not (signum == signal.SIGINT and _runner_sigint(now)):
                return False
        return True

    def body(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        """The task that runs the test function on ``loop``, else the one the loop runs."""
        code = self._body_code
        if code is not None:
            for task in asyncio.all_tasks(loop):
                if any(frame.f_code is code for frame in _await_frames(task.get_coro())):
                    return task
        root = self._roots.get(loop)
        return root if root is not None and not root.done() else None

    def close(self) -> None:
        """Stop taking loops, and give each loop taken its own selector back."""
        self._stop()
        taken, self._taken = self._taken, {}
        self._roots.clear()
        for loop, (inner, selector) in taken.items():
            selector.loop = selector.owner = None  # a select() under way passes through
            if vars(loop).get("_selector") is selector:  # else closed (None), or not ours now
                loop._selector = inner  # type: ignore[attr-defined]


def _getsignal(signum: int) -> Any:
    try:
        return signal.getsignal(signum)
    except (OSError, ValueError):  # pragma: no cover - a number the platform refuses
        return None


def _handlers() -> dict[int, Any]:
    """Every signal's handler, now."""
    return {signum: _getsignal(signum) for signum in signal.valid_signals()}


def _runner_sigint(handler: Any) -> bool:
    # Runner.run installs functools.partial(self._on_sigint, main_task=task) (asyncio's,
    # and the backport pytest-asyncio uses before 3.11). Known by name: a private method.
    func = getattr(handler, "func", None)
    return getattr(func, "__qualname__", "") == "Runner._on_sigint"
