"""A baton-passing scheduler: the threads of an explored ``thread``-backend body, one at a time.

While a sync body under the ``thread`` backend is explored, its thread (each copy's, in
stress mode) and the threads it starts (``Thread.start`` during the body, transitively)
are *controlled*: only the one holding the baton runs. At every switch point the holder
asks the seeded schedule which runnable controlled thread runs next, hands it the baton
(a real lock the chosen one waits on, its *gate*) and waits on its own gate.

Switch points: every line of user code (files outside the standard library, site-packages
and pytest-concur: ``sys.monitoring`` LINE events on 3.12+, ``sys.settrace`` in each
controlled thread before), the acquire and release of a tracked lock (``_locks``), the start
of a thread (once the new thread is waiting for the baton) and a join.

- A thread that would block on a tracked lock (a ``Condition``'s or ``Event``'s waiter, a
  ``Queue``'s mutex included) is not runnable until the lock is free; one that joins is not
  runnable until the joined thread is done. Chosen, it takes the lock without blocking.
- Nothing runnable: the holder waits for the lock for ``STALL``; then every controlled
  thread goes into the real, tracked wait, where the deadlock check judges them (an ABBA
  deadlock fails with ``DeadlockError``). A thread back from a real wait asks for the
  baton again at its next switch point.
- A holder that reaches no switch point for ``STALL`` while others are runnable (blocked in
  ``time.sleep``, a socket, C code, an untracked lock) loses the baton: the schedule picks
  another, and the run is *partly controlled* (:attr:`ThreadScheduler.partly`).
- When the last copy of the body returns, control ends: threads it left running run freely.

Invariant: the scheduler's state is only changed under its own, real (untracked) mutex; a
gate is released at most once per wait (by the holder that picks its thread, by the release
into real waits, or by the end of control), which ``_Thread.waiting`` records.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, final

from pytest_concur import _locks, _patches
from pytest_concur._explore._schedule import Schedule
from pytest_concur._stacks import PACKAGE, short_path

# How long a holder may go without a switch point while others could run, and the slice a
# waiting thread sleeps between looks at the holder.
STALL = 0.05
_real_lock = _locks._real_allocate_lock
_get_ident = threading.get_ident

_NEW, _RUN, _LOCK, _JOIN, _FREE, _DONE = range(6)


@final
class _Thread:
    """One controlled thread."""

    __slots__ = (
        "arrived",
        "function",
        "gate",
        "go_real",
        "ident",
        "index",
        "joins",
        "lock",
        "name",
        "seen",
        "starting",
        "state",
        "thread",
        "waiting",
        "where",
    )

    def __init__(self, index: int, thread: threading.Thread | None, name: str) -> None:
        self.index = index
        self.thread = thread
        self.name = name
        self.ident = 0
        self.state = _NEW
        self.gate = _real_lock()
        self.gate.acquire()
        self.arrived = _real_lock()
        self.arrived.acquire()
        self.waiting = False
        self.go_real = False
        self.starting = False
        self.lock: Any = None
        self.joins: _Thread | None = None
        self.seen = 0
        self.function = ""
        self.where: tuple[str, int] = ("", 0)

    def describe_step(self, name: str) -> str:
        return f"thread {self.name!r} ({name})" if name else f"thread {self.name!r}"


@final
class ThreadScheduler:
    """The baton of one run of an explored thread body (see the module docstring)."""

    def __init__(self, schedule: Schedule, copies: int = 1) -> None:
        self._schedule = schedule
        schedule.noun = "threads"
        self._copies = copies
        self._mutex = _real_lock()
        self._threads: list[_Thread] = []
        self._by_ident: dict[int, _Thread] = {}
        self._by_thread: dict[int, _Thread] = {}
        self._holder: _Thread | None = None
        self._progress = 0
        self._bodies: list[_Thread | None] = [None] * copies
        self._running_bodies = 0
        self._arrived = 0
        self._started = False
        self._stopped = False
        self._stop_listening: Callable[[], None] | None = None
        # Why the run was only partly controlled, for the report; None if it was not.
        self.partly: str | None = None
        # Whether a body ran under this scheduler.
        self.ran = False

    # -- the body ------------------------------------------------------------------------

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` (a body, or one copy of it) run under this scheduler."""

        def controlled(**kwargs: Any) -> Any:
            __tracebackhide__ = True  # the plugin's frames are not the user's
            index = _copy_index()
            me = self._enter_body(index, getattr(function, "__qualname__", ""))
            try:
                return function(**kwargs)
            finally:
                self._leave(me, body=True)

        return controlled

    def _enter_body(self, index: int, function: str) -> _Thread:
        with self._mutex:
            me = _Thread(index, threading.current_thread(), threading.current_thread().name)
            me.function = function
            me.ident = _get_ident()
            me.state = _RUN
            self._threads.append(me)
            self._threads.sort(key=lambda entry: entry.index)
            self._by_ident[me.ident] = me
            if 0 <= index < self._copies:
                self._bodies[index] = me
            self._running_bodies += 1
            self._arrived += 1
            self.ran = True
            if not self._started:
                self._start()
            everyone = self._arrived >= self._copies
        _trace_on(self)
        if self._copies == 1:
            with self._mutex:
                self._holder = me
            return me
        # Copies: all of them arrive before the first runs; copy 0 holds the baton first.
        # (One that never comes, its setup hook stuck say, is not waited for past a second.)
        deadline = time.monotonic() + 1.0
        while not everyone and time.monotonic() < deadline:
            time.sleep(0.001)
            with self._mutex:
                everyone = self._arrived >= self._copies
        with self._mutex:
            if self._holder is None:
                first = self._threads[0] if everyone else me
                self._holder = first
                if first is not me:
                    self._hand(first)
            if self._holder is me:
                return me
            me.waiting = True
        self._wait_gate(me)
        return me

    def _start(self) -> None:
        self._started = True
        self._stop_listening = _patches.listen(_patches.THREAD_START, self._on_start)
        _locks.SCHEDULER = self
        _monitoring_on(self)

    def stop(self) -> None:
        """End control: every waiting thread goes on as the operating system schedules it."""
        with self._mutex:
            if self._stopped:
                return
            self._stopped = True
            self._holder = None
            for entry in self._threads:
                if entry.waiting:
                    entry.waiting = False
                    entry.gate.release()
        if _locks.SCHEDULER is self:
            _locks.SCHEDULER = None
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        _monitoring_off(self)

    # -- threads the body starts -----------------------------------------------------------

    def _on_start(self, thread: threading.Thread) -> Callable[[], None] | None:
        me = self._by_ident.get(_get_ident())
        if me is None or self._stopped or me.state == _DONE:
            return None
        with self._mutex:
            entry = _Thread(len(self._threads) + self._copies, thread, thread.name)
            self._threads.append(entry)
            self._by_thread[id(thread)] = entry
        target = getattr(thread, "_target", None)
        entry.function = getattr(target, "__qualname__", "") or type(thread).__qualname__
        run = thread.run

        def controlled_run() -> None:
            self._arrive(entry)
            try:
                run()
            finally:
                self._leave(entry, body=False)

        thread.run = controlled_run  # type: ignore[method-assign]
        me.starting = True  # its wait for the new thread to start is not ours to schedule

        def started() -> None:
            me.starting = False
            if thread.ident is None:  # it could not start
                with self._mutex:
                    entry.state = _DONE
                return
            # Wait until the new thread waits for the baton: its start is then a decision.
            while not entry.arrived.acquire(True, 0.001):
                self._progress += 1
                if self._stopped:
                    return
            self.point()

        return started

    def _arrive(self, entry: _Thread) -> None:
        with self._mutex:
            entry.ident = _get_ident()
            self._by_ident[entry.ident] = entry
            entry.state = _RUN
            entry.arrived.release()
            if self._stopped:
                return
            if self._holder is None:
                self._holder = entry
                go = True
            else:
                entry.waiting = True
                go = False
        _trace_on(self)
        if not go:
            self._wait_gate(entry)

    def _leave(self, me: _Thread, *, body: bool) -> None:
        _trace_off()
        with self._mutex:
            me.state = _DONE
            if body:
                self._running_bodies -= 1
            last = body and self._running_bodies <= 0
            if not last and self._holder is me and not self._stopped:
                self._holder = None
                self._next(me)
        if last:
            self.stop()

    # -- switch points ------------------------------------------------------------------

    def point(self, where: tuple[str, int] | None = None) -> None:
        """A switch point of the calling thread: another may run first."""
        me = self._by_ident.get(_get_ident())
        if me is None or me.starting or me.state in (_DONE, _NEW):
            return
        if where is not None:
            me.where = where
        with self._mutex:
            if self._stopped:
                return
            self._progress += 1
            if me.state == _FREE or self._holder is not me:
                self._rejoin(me)
                if self._holder is me:
                    return
            else:
                chosen = self._pick(me)
                if chosen is me or chosen is None:
                    return
                self._holder = chosen
                self._hand(chosen)
            me.waiting = True
        self._wait_gate(me)

    def wait_lock(self, lock: Any, timeout: float) -> bool:
        """Before the calling thread blocks on ``lock``: True if it took the real lock."""
        me = self._by_ident.get(_get_ident())
        if me is None or self._stopped or me.starting or me.state in (_DONE, _NEW, _FREE):
            return False
        while True:
            with self._mutex:
                if self._stopped or self._holder is not me:
                    return False
                self._progress += 1
                me.state, me.lock = _LOCK, lock
                chosen = self._pick(me)
                if chosen is None:
                    me.state, me.lock = _RUN, None
                    if timeout >= 0:
                        return False  # a timed wait, with the baton: the others are blocked
                elif chosen is not me:
                    self._holder = chosen
                    self._hand(chosen)
                    me.waiting = True
            if chosen is None:
                # Nobody else can run: the lock may be let go by a thread we do not control.
                if lock._lock.acquire(True, STALL):
                    return True
                self._release_all(me)
                return False
            if chosen is not me and not self._wait_gate(me):
                return False
            # Chosen: the lock was free a moment ago.
            got = bool(lock._lock.acquire(False))
            with self._mutex:
                if got:
                    me.state, me.lock = _RUN, None
                    return True

    def joining(self, thread: threading.Thread) -> None:
        """Before the calling thread joins ``thread``: others run until it is done."""
        me = self._by_ident.get(_get_ident())
        target = self._by_thread.get(id(thread))
        if me is None or target is None or self._stopped or me.state != _RUN:
            return
        with self._mutex:
            if self._stopped or self._holder is not me or target.state in (_DONE, _NEW):
                return
            self._progress += 1
            me.state, me.joins = _JOIN, target
            chosen = self._pick(me)
            if chosen is None:
                me.state, me.joins = _RUN, None
            else:
                self._holder = chosen
                self._hand(chosen)
                me.waiting = True
        if chosen is None:
            self._release_all(me)
            return
        self._wait_gate(me)
        with self._mutex:
            if me.state == _JOIN:
                me.state, me.joins = _RUN, None

    # -- the baton (under the mutex unless said) ----------------------------------------

    def _runnable(self, entry: _Thread) -> bool:
        state = entry.state
        if state == _RUN:
            return True
        if state == _LOCK:
            return not entry.lock.locked()
        if state == _JOIN:
            joins = entry.joins
            return joins is None or joins.state == _DONE
        return False

    def _pick(self, me: _Thread | None) -> _Thread | None:
        candidates = [entry for entry in self._threads if self._runnable(entry)]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        keys = [entry.index for entry in candidates]
        chosen = candidates[self._schedule.pick(keys, None if me is None else me.index)]
        filename, lineno = chosen.where
        current = None
        if me is not None and me is not chosen:
            current = (me, me.function, *me.where)
        self._schedule.record((chosen, chosen.function, filename, lineno), current)
        return chosen

    def _next(self, me: _Thread | None) -> None:
        """The holder is gone: hand the baton to the one the schedule picks, if any."""
        chosen = self._pick(me)
        if chosen is None:
            if any(entry.state in (_LOCK, _JOIN) for entry in self._threads):
                self._release_all_locked()
            return
        self._holder = chosen
        self._hand(chosen)

    def _hand(self, entry: _Thread) -> None:
        if entry.waiting:
            entry.waiting = False
            entry.gate.release()

    def _rejoin(self, me: _Thread) -> None:
        """A thread back from a wait we did not schedule asks for the baton."""
        if me.state == _FREE and self.partly is None:
            tracker = _locks.TRACKER
            if tracker is None or tracker.verdict is None:
                filename, lineno = me.where
                at = f" (after {short_path(filename)}:{lineno})" if filename else ""
                self.partly = (
                    f"thread {me.name!r} waited on something pytest-concur does not schedule{at}"
                )
        me.state = _RUN
        if self._holder is None:
            self._holder = me

    def _release_all(self, me: _Thread) -> None:
        with self._mutex:
            me.state = _FREE
            self._release_all_locked()

    def _release_all_locked(self) -> None:
        """Nobody can run: every controlled thread waits as usual, where deadlocks are seen."""
        self._holder = None
        for entry in self._threads:
            if entry.state in (_LOCK, _JOIN, _RUN):
                entry.state = _FREE
                if entry.waiting:
                    entry.waiting = False
                    entry.go_real = True
                    entry.gate.release()

    def _wait_gate(self, me: _Thread) -> bool:
        """Wait (no mutex held) for the baton; False if sent to wait as usual, or stopped."""
        me.seen = self._progress
        while True:
            if me.gate.acquire(True, STALL):
                if me.go_real or self._stopped:
                    me.go_real = False
                    return False
                return True
            if self._stopped:
                return False
            with self._mutex:
                self._look(me)

    def _look(self, me: _Thread) -> None:
        """A waiting thread's look at the holder: gone, or stuck where we cannot see."""
        holder = self._holder
        if not me.waiting:
            return  # handed the baton a moment ago
        if holder is None:
            self._next(None)
        elif self._progress == me.seen and holder is not me:
            others = [e for e in self._threads if e is not holder and self._runnable(e)]
            if others:
                if self.partly is None:
                    filename, lineno = holder.where
                    at = f" after {short_path(filename)}:{lineno}" if filename else ""
                    self.partly = (
                        f"thread {holder.name!r} reached no switch point for "
                        f"{STALL * 1000:.0f} ms{at} (a wait pytest-concur cannot see: "
                        "time.sleep, a socket, C code, an untracked lock)"
                    )
                holder.state = _FREE
                self._holder = None
                self._next(None)
        me.seen = self._progress


def _copy_index() -> int:
    """Which copy of the body this thread runs (stress mode), 0 for a lone body."""
    from pytest_concur import _stress

    index = getattr(_stress, "_COPY_INDEX", None)  # the copy's context holds it
    return int(index.get(0)) if index is not None else 0


# -- what is user code ------------------------------------------------------------------

_LIBRARY = tuple(
    {
        os.path.join(path, "")
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        for path in (sysconfig.get_paths().get(key),)
        if path
    }
    | {os.path.join(os.path.dirname(os.__file__), ""), PACKAGE}
)
_USER: dict[str, bool] = {}


def is_user_file(filename: str) -> bool:
    """Whether lines of this file are switch points: not the stdlib's, a library's, ours."""
    known = _USER.get(filename)
    if known is None:
        known = _USER[filename] = not (
            filename.startswith("<")
            or filename.startswith(_LIBRARY)
            or "site-packages" in filename
            or "dist-packages" in filename
        )
    return known


# -- line events ------------------------------------------------------------------------

_CURRENT: ThreadScheduler | None = None
# sys.monitoring (3.12+), looked up so that older Pythons (and mypy's target) need not know it.
_SYS_MONITORING: Any = getattr(sys, "monitoring", None)
_MONITORING = _SYS_MONITORING is not None
_TOOL: int | None = None
_saved_traces: dict[int, Any] = {}


def _local_trace(frame: FrameType, event: str, arg: object) -> Any:
    scheduler = _CURRENT
    if scheduler is None:
        return None
    if event == "line":
        scheduler.point((frame.f_code.co_filename, frame.f_lineno))
    return _local_trace


def _global_trace(frame: FrameType, event: str, arg: object) -> Any:
    if _CURRENT is None or not is_user_file(frame.f_code.co_filename):
        return None
    return _local_trace


def _trace_on(scheduler: ThreadScheduler) -> None:
    global _CURRENT
    _CURRENT = scheduler
    if _MONITORING:
        return
    _saved_traces[_get_ident()] = sys.gettrace()
    sys.settrace(_global_trace)


def _trace_off() -> None:
    if _MONITORING:
        return
    sys.settrace(_saved_traces.pop(_get_ident(), None))


def _line(code: CodeType, line: int) -> Any:
    if not is_user_file(code.co_filename):
        return _SYS_MONITORING.DISABLE  # never user code: no more events from this line
    scheduler = _CURRENT
    if scheduler is not None:
        scheduler.point((code.co_filename, line))
    return None


def _monitoring_on(scheduler: ThreadScheduler) -> None:
    global _CURRENT, _TOOL
    _CURRENT = scheduler
    if not _MONITORING:
        return
    monitoring = _SYS_MONITORING
    if _TOOL is None:
        for tool in (4, 3):
            if monitoring.get_tool(tool) is None:
                monitoring.use_tool_id(tool, "pytest-concur explore")
                monitoring.register_callback(tool, monitoring.events.LINE, _line)
                _TOOL = tool
                break
        else:
            return
    monitoring.set_events(_TOOL, monitoring.events.LINE)


def _monitoring_off(scheduler: ThreadScheduler) -> None:
    global _CURRENT
    if _CURRENT is scheduler:
        _CURRENT = None
    if _MONITORING and _TOOL is not None:
        _SYS_MONITORING.set_events(_TOOL, 0)
