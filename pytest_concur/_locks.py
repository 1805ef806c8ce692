"""Tracked locks and waits: the eyes of deadlock detection.

``threading.Lock`` cannot be subclassed, so the *factories* are replaced
(``threading.Lock``, ``threading.RLock``, ``_thread.allocate_lock``, ``_thread.RLock``, and
``threading._allocate_lock``, which ``Condition.wait`` uses for its waiters) for the whole
session, from before the first ``conftest.py`` is imported (:func:`install`, paired with
:func:`uninstall` in the config's cleanup; ``_patches`` records and undoes the swaps): locks made by fixtures of every scope, at the
import of test modules and of the libraries they import, by threads a fixture started, are
all tracked locks. Locks made before the plugin was loaded (pytest's own, the standard
library's at its import), or inside C code, are plain locks and invisible to us.
``Condition``, ``Semaphore``, ``BoundedSemaphore``, ``Event``, ``Barrier`` and
``queue.Queue`` are built on these factories in the standard library, so they are tracked
too.

Tracking itself (the :class:`Tracker`, the ``Thread.join`` hook) is on only while a body
runs (:class:`tracking`). Outside a body ``TRACKER`` is ``None`` and a tracked lock is a
real lock that also remembers its owner: no global lock, no bookkeeping, and where it was
made is kept as plain data, formatted only when a report names it.

What is tracked, and the invariants:

- A :class:`TrackedLock` records its *owner* (the thread that acquired it) and where it was
  created. The uncontended path is one non-blocking acquire of the real lock plus a few
  attribute writes: no global lock is taken.
- A lock released by a thread other than its owner is a *signal* (a binary semaphore, a
  ``Condition`` waiter), not a mutex: no thread "holds" it in the wait-for graph.
- A thread that must block registers a :class:`Wait` in the :class:`Tracker` (under the
  tracker's own, untracked lock), then waits in short slices. At the moment it starts
  waiting it looks for a wait-for cycle through mutex owners and joined threads; at each
  slice it checks whether every thread of the test is blocked in a tracked wait that
  nothing left running can end. A finding must hold on two looks in a row (so a wait that
  was just ended but not yet unregistered is never taken for a deadlock); then the
  tracker's *verdict* is set and every tracked wait of the test raises
  :class:`DeadlockError`, which unblocks the threads and fails the test with the diagnosis.
- While locks nest, the order of acquisition is recorded (lockdep style): taking B while
  holding A at one place and A while holding B at another is a potential deadlock, reported
  even when this run did not hang.

No thread of our own is ever started: the waiting threads are the watchdog, so the
process backend's fork never sees a thread of the plugin's.

Why one module of about 1,000 lines: the lock, the tracker and the factories that install
them read two globals on every acquire (``TRACKER``, ``SCHEDULER``) and keep the invariants
above together; split, the hot path would pay an attribute lookup on another module. What
only locates and tells (sites, reports, graphs) is in ``_lock_diagnosis``.
"""

from __future__ import annotations

import _thread
import dataclasses
import dis
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType
from typing import Any, final

from pytest_concur import _patches, _primitives
from pytest_concur._errors import DeadlockError, HangError
from pytest_concur._lock_diagnosis import (
    _blocking_call,
    _capture_site,
    _format_site,
    _inversion_graph,
    _inversion_report,
    _render,
    _thread_name,
)

# Also handed on, for the modules that read them here (the loop deadlock check's sites, the
# graphs the deadlock check keeps for the report).
from pytest_concur._lock_diagnosis import _is_machinery as _is_machinery
from pytest_concur._lock_diagnosis import note_graphs as note_graphs
from pytest_concur._lock_diagnosis import take_graphs as take_graphs
from pytest_concur._lock_diagnosis import user_site as user_site
from pytest_concur._stacks import PACKAGE
from pytest_concur._state import items_begun

_PACKAGE = PACKAGE  # (see _stacks)
_real_allocate_lock = _primitives.allocate_lock
_real_rlock: Callable[[], Any] = _primitives.RLock
_get_ident = _thread.get_ident

# How long a blocked thread sleeps between looks, and the delay between the two looks
# that confirm a finding.
_SLICE = 0.005
_MAX_SLICE = 0.05


@final
class TrackedLock:
    """A lock (or, with ``reentrant``, an RLock) whose owner and waiters we can see."""

    __slots__ = ("__weakref__", "_count", "_lock", "_made_at", "_reentrant", "owner", "signal")

    def __init__(self, *, reentrant: bool = False, signal: bool = False) -> None:
        self._lock = _real_rlock() if reentrant else _real_allocate_lock()
        self._reentrant = reentrant
        self._count = 0
        self.owner: int | None = None
        self.signal = signal
        self._made_at = _capture_site(sys._getframe(1))

    @property
    def site(self) -> str:
        """Where the lock was made: ``file:line in function``."""
        return _format_site(self._made_at)

    # -- the lock API -------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if timeout != -1 and (not blocking or not 0 <= timeout <= threading.TIMEOUT_MAX):
            # Arguments a real lock refuses: let it refuse them, with its own message.
            return bool(self._lock.acquire(blocking, timeout))
        if SCHEDULER is not None:
            SCHEDULER.point()  # a switch point of an explored thread body (_explore/_threads)
        if self._lock.acquire(False):
            # _took, inlined: every lock of the session takes this path, mostly untracked.
            me = _get_ident()
            if self._reentrant:
                if self.owner == me:
                    self._count += 1
                    return True
                self._count = 1
            self.owner = me
            tracker = TRACKER
            if tracker is not None and not self.signal:
                # Only an acquire that would wait forever takes part in lock order: a
                # try-lock or a timed acquire cannot deadlock.
                tracker.note_acquired(self, me, bool(blocking) and timeout < 0)
            return True
        if not blocking:
            return False
        return self._wait(timeout)

    def release(self) -> None:
        me = _get_ident()
        if self._reentrant:
            if self.owner != me:
                raise RuntimeError("cannot release un-acquired lock")
            self._count -= 1
            if self._count == 0:
                self.owner = None
                if TRACKER is not None:  # (a call saved on the untracked path)
                    _note_released(self, me)
            self._lock.release()
            if SCHEDULER is not None:
                SCHEDULER.point()
            return
        owner = self.owner
        if owner is not None and owner != me:
            self.signal = True  # released by someone else: a signal, not a mutex
        self.owner = None
        self._lock.release()
        if owner is not None and TRACKER is not None:
            _note_released(self, owner)
        if SCHEDULER is not None:
            SCHEDULER.point()

    __enter__ = acquire  # one call less on the hottest path: ``with lock:``

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def locked(self) -> bool:
        if self._reentrant:
            return self.owner is not None
        return bool(self._lock.locked())

    # Condition's protocol for RLocks (and its fallbacks for plain locks).
    def _is_owned(self) -> bool:
        if self._reentrant:
            return self.owner == _get_ident()
        if self._lock.acquire(False):
            self._lock.release()
            return False
        return True

    def _release_save(self) -> Any:
        if not self._reentrant:
            self.release()
            return None
        if self.owner != _get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        count, self._count = self._count, 0
        self.owner = None
        _note_released(self, _get_ident())
        for _ in range(count):
            self._lock.release()
        return count

    def _acquire_restore(self, state: Any) -> None:
        # Condition.wait takes its lock back here even when unwinding with DeadlockError:
        # the caller's `with` releases it next, so it must hold it, verdict or not.
        if not self._lock.acquire(False) and (
            SCHEDULER is None or not SCHEDULER.wait_lock(self, -1)
        ):
            while not self._lock.acquire(True, _MAX_SLICE):
                pass
        self._took(False)
        if self._reentrant and state:
            for _ in range(state - 1):
                self._lock.acquire()
            self._count = state

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Like a real lock: not to be copied or pickled (a copy would share the lock), and
        # with its words, which people (and the process backend's advice) recognise.
        kind = type(self._lock)
        raise TypeError(f"cannot pickle '{kind.__module__}.{kind.__qualname__}' object")

    def _recursion_count(self) -> int:
        # RLock's (3.11+), used by multiprocessing's resource tracker among others.
        return self._count if self.owner == _get_ident() else 0

    def _at_fork_reinit(self) -> None:
        self._lock = _real_rlock() if self._reentrant else _real_allocate_lock()
        self._count = 0
        self.owner = None

    def __repr__(self) -> str:
        # The real lock's (<unlocked _thread.lock object at 0x...>): messages and tests that
        # show or match it read the same; our reports name the creation site themselves.
        return repr(self._lock)

    # -- internals ----------------------------------------------------------------------

    def _took(self, ordered: bool = True) -> None:
        me = _get_ident()
        if self._reentrant:
            if self.owner == me:
                self._count += 1
                return
            self._count = 1
        self.owner = me
        tracker = TRACKER
        if tracker is not None and not self.signal:
            tracker.note_acquired(self, me, ordered)

    def _wait(self, timeout: float) -> bool:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        scheduler = SCHEDULER
        if scheduler is not None and scheduler.wait_lock(self, timeout):
            self._took(timeout < 0)  # the scheduler let this thread take it (_explore/_threads)
            return True
        tracker = TRACKER
        if tracker is None:
            got = self._lock.acquire(True, timeout)
        else:
            got = tracker.wait_for(
                Wait(kind="lock", lock=self, timeout=None if timeout < 0 else timeout),
                lambda slice_: bool(self._lock.acquire(True, slice_)),
            )
        if got:
            self._took(timeout < 0)
        return got


def waits_now(tracker: Tracker | None, frames: dict[int, FrameType]) -> dict[int, Wait]:
    """Who waits for what: the tracker's waits, and waits on tracked locks begun outside it.

    A thread that began to wait before the body did (a fixture's thread) waits as a plain
    lock does, in one call we can see on its stack. Reads the tracker's table without its
    mutex (a signal handler may hold it): a copy that a concurrent change spoilt is retried.
    """
    waits: dict[int, Wait] = {}
    if tracker is not None:
        for _ in range(10):
            try:
                waits = dict(tracker.waits)
                break
            except RuntimeError:
                continue
    for ident, frame in frames.items():
        if ident in waits or frame.f_code not in _PLAIN_WAITS:
            continue
        lock = frame.f_locals.get("self")
        if isinstance(lock, TrackedLock):
            waits[ident] = Wait(kind="lock", lock=lock, ident=ident, site=user_site(frame))
    return waits


def _note_released(lock: TrackedLock, owner: int) -> None:
    tracker = TRACKER
    if tracker is not None:
        tracker.note_released(lock, owner)


# Where a thread waits on a tracked lock while no tracker sees it.
_PLAIN_WAITS = frozenset({TrackedLock._wait.__code__, TrackedLock._acquire_restore.__code__})


@dataclasses.dataclass(eq=False)
class Wait:
    """What one blocked thread waits for."""

    kind: str  # "lock", "join" or "channel" (see _channels)
    lock: TrackedLock | None = None
    thread: threading.Thread | None = None
    timeout: float | None = None
    ident: int = 0
    site: str = ""
    call: tuple[str, object] | None = None
    began: float = 0.0  # time.monotonic() when the wait was registered
    # A channel's: whether the wait provably cannot end yet, and what it waits on.
    blocked: Callable[[], bool] | None = None
    what: str = ""
    # Set as soon as an attempt succeeded: the thread is leaving the wait (it may be kept
    # from removing it for a while, on a busy machine, by another thread's look).
    done: bool = False

    def still_blocked(self) -> bool:
        if self.done:
            return False
        if self.kind == "join":
            return self.thread is not None and self.thread.is_alive()
        if self.blocked is not None:
            try:
                return self.blocked()
            except Exception:
                return False  # cannot tell: not provably blocked
        lock = self.lock
        if lock is None or not lock.locked():
            return False
        # Locked with no owner recorded: taken a moment ago, most likely by this very wait
        # (its owner is set once the attempt returns), so not provably blocked.
        return lock._reentrant or lock.owner is not None

    def holder(self) -> int | None:
        """The thread this wait depends on, when that is one thread: a mutex owner, a joinee."""
        if self.kind == "join":
            return None if self.thread is None else self.thread.ident
        if self.lock is None or self.lock.signal:
            return None
        return self.lock.owner

    def describe(self) -> str:
        if self.kind == "join":
            assert self.thread is not None
            return f"joins thread {self.thread.name!r}"
        if self.kind == "channel":
            return f"waits on {self.what}"
        assert self.lock is not None
        if self.call is not None:
            kind, obj = self.call
            return f"waits on {kind} {_describe_sync(obj)}"
        what = "RLock" if self.lock._reentrant else "Lock"
        holder = self.holder()
        held = f", held by {_thread_name(holder)}" if holder is not None else ""
        return f"waits for {what} created at {self.lock.site}{held}"


def _describe_sync(obj: object) -> str:
    """Where a stdlib synchronisation object was made, through the tracked lock inside it."""
    for attribute in ("_cond", "mutex", "_lock", "_condition"):
        inner = getattr(obj, attribute, None)
        if not isinstance(inner, TrackedLock):
            inner = getattr(inner, "_lock", None)  # a Condition's lock
        if isinstance(inner, TrackedLock):
            return f"created at {inner.site}"
    return "(created before the test, or in C code)"


@final
class Tracker:
    """The tracked state of one body run: who waits for what, and the verdict."""

    def __init__(self, body_thread: int, passive_threads: frozenset[int]) -> None:
        self._mutex = _real_allocate_lock()
        self.body_thread = body_thread
        self.pid = os.getpid()  # a forked child inherits the tracker, not the process
        # Threads that only wait for the body (the thread backend's pytest thread).
        self.passive_threads = passive_threads
        self.started: list[threading.Thread] = []
        self.starting = 0
        self._last_look = 0.0
        # Set when the body installs a signal handler, which can wake the main thread.
        self.handler_installed = False
        self.waits: dict[int, Wait] = {}
        self.verdict: str | None = None
        self.graph: dict[str, Any] | None = None  # the verdict's, as data
        # Set when the test is given up on at its deadline (see _hang.release).
        self.abandoned: str | None = None
        # Threads a DeadlockError with the whole verdict was raised in.
        self._told: set[int] = set()
        # Lock order (lockdep): (first, then) -> where "then" was taken while holding "first".
        self.order: dict[tuple[int, int], tuple[TrackedLock, TrackedLock, str]] = {}
        # Who took "then" while holding "first", by the same keys (for the graphs).
        self.order_threads: dict[tuple[int, int], str] = {}
        self.inversions: list[str] = []
        self.inversion_graphs: list[dict[str, Any]] = []
        self.held: dict[int, list[TrackedLock]] = {}
        self.foreign_at_start = {
            t.ident for t in threading.enumerate() if t.ident not in passive_threads
        } - {body_thread}

    # -- lock order ---------------------------------------------------------------------

    def note_acquired(self, lock: TrackedLock, me: int, ordered: bool = True) -> None:
        held = self.held.get(me)
        if held is None:
            self.held[me] = [lock]
            return
        for first in held if ordered else ():
            if first is lock:
                continue
            key = (id(first), id(lock))
            if key in self.order:
                continue
            site = user_site(sys._getframe(2), with_caller=True)
            with self._mutex:
                self.order[key] = (first, lock, site)
                self.order_threads[key] = threading.current_thread().name
                reverse = self.order.get((id(lock), id(first)))
                if reverse is not None:
                    self.inversions.append(_inversion_report(first, lock, site, reverse[2]))
                    earlier = self.order_threads.get((id(lock), id(first)), "")
                    self.inversion_graphs.append(
                        _inversion_graph(
                            (first, lock), (earlier, reverse[2]), (self.order_threads[key], site)
                        )
                    )
        held.append(lock)

    def note_released(self, lock: TrackedLock, owner: int) -> None:
        held = self.held.get(owner)
        if held:
            for index in range(len(held) - 1, -1, -1):
                if held[index] is lock:
                    del held[index]
                    break

    # -- waits --------------------------------------------------------------------------

    def wait_for(self, wait: Wait, attempt: Callable[[float], bool]) -> bool:
        """Block in slices until ``attempt`` succeeds, the timeout passes, or a verdict."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        wait.ident = _get_ident()
        frame = sys._getframe(2)
        wait.site = user_site(frame)
        wait.call = _blocking_call(frame)
        wait.began = time.monotonic()
        deadline = None if wait.timeout is None else time.monotonic() + wait.timeout
        with self._mutex:
            self.waits[wait.ident] = wait
        try:
            if wait.timeout is None:
                self._look(wait, first=True)
            slice_ = _SLICE
            while True:
                if self.abandoned is not None:
                    raise HangError(self.abandoned)
                if self.verdict is not None:
                    raise self._deadlock_error(wait)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return attempt(0)
                    slice_ = min(slice_, remaining)
                if attempt(slice_):
                    wait.done = True
                    if wait.timeout is None and self.decided():
                        # The joined thread ended, or the lock's holder let go, only because
                        # the verdict unwound it: this wait is part of the deadlock too.
                        if wait.lock is not None:
                            wait.lock._lock.release()  # taken in attempt: not ours to keep
                        raise self._deadlock_error(wait)
                    return True
                if wait.timeout is None:
                    self._look(wait, first=False)
                slice_ = min(slice_ * 2, _MAX_SLICE)
        finally:
            with self._mutex:
                if self.waits.get(wait.ident) is wait:
                    del self.waits[wait.ident]

    def _look(self, wait: Wait, *, first: bool) -> None:
        """Look for a deadlock; if one holds on two looks, set the verdict."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        finding = self._find(wait, self.snapshot())
        if finding is None:
            return
        time.sleep(_SLICE)  # confirm: a wait that just ended must have unregistered by now
        waits = self.snapshot()
        if self._find(wait, waits) == finding:
            with self._mutex:
                if self.verdict is None:
                    self.verdict = _render(finding, waits)
                    self.graph = wait_for_graph(finding, waits, self.verdict)
        if self.verdict is not None:
            raise self._deadlock_error(wait)

    def _deadlock_error(self, wait: Wait) -> DeadlockError:
        """The error for a wait the verdict ends: the whole report once per thread.

        A thread unwinding from one often waits again on its way out (a ``with`` pool
        joining its workers): that wait fails too, with a short reminder, not the whole
        report again, which is already in the first error of the thread.
        """
        verdict = self.verdict
        assert verdict is not None
        ident = _get_ident()
        with self._mutex:
            told = ident in self._told
            self._told.add(ident)
        # Or it got the report another way: from a worker, through a future's result().
        handling = sys.exc_info()[1]
        while not told and handling is not None:
            told = isinstance(handling, DeadlockError)
            handling = handling.__context__
        if not told:
            return DeadlockError(verdict)
        headline = verdict.splitlines()[0]
        return DeadlockError(
            f"{headline} (reported with this thread's first DeadlockError; this wait, "
            f"{wait.describe()} at {wait.site}, was ended too, to let the test unwind)"
        )

    def decided(self) -> bool:
        """Whether the test was declared deadlocked (another thread may do it any time)."""
        return self.verdict is not None

    def abandon(self, why: str) -> None:
        """Give up on the test: every tracked wait of it raises HangError."""
        self.abandoned = why

    def set_verdict(self, verdict: str) -> None:
        """Declare the test deadlocked: every tracked wait of it raises DeadlockError."""
        with self._mutex:
            if self.verdict is None:
                self.verdict = verdict

    def handlers_unchanged(self) -> bool:
        """Whether the body has left signal handlers as they were."""
        return not self.handler_installed

    def snapshot(self) -> dict[int, Wait]:
        """Who waits for what, now."""
        with self._mutex:
            return dict(self.waits)

    def _find(self, wait: Wait, waits: dict[int, Wait]) -> tuple[str, tuple[int, ...]] | None:
        """What kind of deadlock holds, and between which threads; ``None`` if none does."""
        cycle = self._cycle(wait.ident, waits)
        if cycle is not None:
            return ("cycle", self._canonical(cycle))
        now = time.monotonic()
        if now - self._last_look < _SLICE:
            return None  # another blocked thread just looked: N waiters, not N looks a slice
        self._last_look = now
        blocked = self._all_blocked(waits)
        if blocked is None:
            return None
        # Everyone is stuck; if a cycle is why, name the cycle: it says more.
        for ident in blocked:
            cycle = self._cycle(ident, waits)
            if cycle is not None:
                return ("cycle", self._canonical(cycle))
        for ident in blocked:
            if waits[ident].holder() == ident:
                return ("self", (ident,))
        return ("blocked", tuple(blocked))

    def _canonical(self, cycle: list[int]) -> tuple[int, ...]:
        """The cycle from its earliest-started thread, so every thread reports it alike."""
        order = [self.body_thread] + [t.ident for t in self.started]
        rank = {ident: index for index, ident in enumerate(order)}
        first = min(range(len(cycle)), key=lambda i: rank.get(cycle[i], len(order)))
        return tuple(cycle[first:] + cycle[:first])

    def _cycle(self, start: int, waits: dict[int, Wait]) -> list[int] | None:
        path = [start]
        current = start
        while True:
            wait = waits.get(current)
            if wait is None or wait.timeout is not None or not wait.still_blocked():
                return None
            nxt = wait.holder()
            if nxt is None:
                return None
            if nxt == start:
                # A thread waiting for a lock it holds itself may be waiting for another
                # thread to release it (a lock used as a signal): only "every thread is
                # blocked" can tell, below.
                return path if len(path) > 1 else None
            if nxt in path:
                return None  # a cycle that does not pass through us: its own threads see it
            path.append(nxt)
            current = nxt

    def _all_blocked(self, waits: dict[int, Wait]) -> list[int] | None:
        if self.starting:
            return None
        test_threads = [self.body_thread] + [
            t.ident for t in self.started if t.ident is not None and t.is_alive()
        ]
        for ident in test_threads:
            wait = waits.get(ident)
            if wait is None or wait.timeout is not None or not wait.still_blocked():
                return None
        # Anyone else who could end a wait? Threads that were running before the body and
        # that Python knows (a fixture's server thread) might; the harness's own threads
        # (unknown to threading: xdist's I/O thread) and the thread backend's waiting pytest
        # thread do not.
        if threading.main_thread().ident in test_threads and not self.handlers_unchanged():
            return None  # a signal handler installed by the test may end a wait
        frames = sys._current_frames()
        for thread in threading.enumerate():
            other_ident = thread.ident
            if other_ident is None or other_ident in self.passive_threads:
                continue
            if other_ident in test_threads or not thread.is_alive():
                continue
            other = waits.get(other_ident)
            if other is not None and other.timeout is None and other.still_blocked():
                continue  # blocked itself (not one whose lock was just let go: it will run)
            if not can_wake(thread, frames):
                continue
            return None
        return test_threads

    def report_inversions(self) -> str | None:
        return "\n\n".join(dict.fromkeys(self.inversions)) or None


# Threads an earlier test left running, reported with it (a leak, or a body given up on
# at its deadline; see the threads check and _hang.release). Each with the number of test
# protocols begun when it was noted: it is an *earlier* test's once another test began.
_LEFT_BEHIND: weakref.WeakKeyDictionary[threading.Thread, int] = weakref.WeakKeyDictionary()
_left_behind_lock = _real_allocate_lock()


def note_left_behind(threads: Iterable[threading.Thread]) -> None:
    """These threads were reported as left running by a test: no later test's business."""
    with _left_behind_lock:
        for thread in threads:
            _LEFT_BEHIND.setdefault(thread, items_begun())


def left_behind(thread: threading.Thread) -> bool:
    """Whether an earlier test left this thread running, and was failed for it."""
    with _left_behind_lock:
        noted = _LEFT_BEHIND.get(thread)
    return noted is not None and noted < items_begun()


def can_wake(thread: threading.Thread, frames: dict[int, FrameType]) -> bool:
    """Whether a thread that is not in a tracked wait might still end someone's wait.

    Not: pytest-timeout's timer thread (it ends the test, not a wait), an idle worker of a
    thread pool (it waits for work, in C, and only runs what a running thread submits), a
    thread an earlier test left running and was failed for (its leak is reported once;
    letting it hide every later deadlock would turn each into a silent wait for the
    deadline).
    """
    if thread.name.startswith("pytest_timeout ") or left_behind(thread):
        return False
    frame = frames.get(thread.ident or -1)
    return frame is None or not _idle_pool_worker(frame)


def _idle_pool_worker(frame: FrameType) -> bool:
    """A ``ThreadPoolExecutor`` worker waiting for work that nobody has submitted yet.

    Not one between two work items (it has just taken one, or just finished one): on a
    busy machine it can stay there, in ``_worker``, for longer than the two looks take.
    """
    code = frame.f_code
    if code.co_name != "_worker" or not code.co_filename.endswith(
        os.path.join("concurrent", "futures", "thread.py")
    ):
        return False
    if frame.f_lineno not in _get_lines(code):
        return False
    local = frame.f_locals
    queue = local.get("work_queue")
    # work_item is deleted after each item: present, the worker has just taken one.
    return "work_item" not in local and queue is not None and bool(queue.empty())


def _get_lines(code: CodeType) -> frozenset[int]:
    """The lines of ``_worker`` where it takes the next work item from its queue."""
    lines = _GET_LINES.get(code)
    if lines is None:
        found, line = set(), None
        for instruction in dis.get_instructions(code):
            positions = getattr(instruction, "positions", None)  # 3.11+; starts_line before
            if positions is not None and positions.lineno is not None:
                line = positions.lineno
            elif type(instruction.starts_line) is int:
                line = instruction.starts_line
            if instruction.argval == "get" and line is not None:
                found.add(line)
        lines = _GET_LINES[code] = frozenset(found)
    return lines


_GET_LINES: dict[CodeType, frozenset[int]] = {}


def wait_for_graph(
    finding: tuple[str, tuple[int, ...]], waits: dict[int, Wait], verdict: str
) -> dict[str, Any]:
    """The deadlock as plain data: its threads and locks, and who holds and waits for what.

    ``{"kind", "title", "nodes": [{"id", "type", "label", "detail"}], "edges": [{"from",
    "to", "label"}]}``: node types ``thread`` and ``lock`` (a lock, or the ``Event``,
    ``Condition``, ``Queue``... built on one), edge labels ``waits for``, ``holds`` and
    ``joins``. JSON-serialisable, so it reaches an xdist controller with the report.
    """
    nodes: dict[str, dict[str, str]] = {}
    edges: list[dict[str, str]] = []

    def thread_node(ident: int) -> str:
        key = f"thread-{ident}"
        if key not in nodes:
            wait = waits.get(ident)
            nodes[key] = {
                "id": key,
                "type": "thread",
                "label": _thread_name(ident).strip("'"),
                "detail": f"at {wait.site}" if wait is not None else "",
            }
        return key

    for ident in finding[1]:
        wait = waits[ident]
        me = thread_node(ident)
        if wait.kind == "join":
            if wait.thread is not None and wait.thread.ident is not None:
                edges.append({"from": me, "to": thread_node(wait.thread.ident), "label": "joins"})
            continue
        lock = wait.lock
        if lock is None:
            continue
        key = f"lock-{id(lock)}"
        if wait.call is not None:
            kind, obj = wait.call
            label, detail = kind, _describe_sync(obj)
        else:
            label, detail = ("RLock" if lock._reentrant else "Lock"), f"created at {lock.site}"
        nodes.setdefault(key, {"id": key, "type": "lock", "label": label, "detail": detail})
        edges.append({"from": me, "to": key, "label": "waits for"})
        holder = wait.holder()
        if holder is not None:
            edge = {"from": thread_node(holder), "to": key, "label": "holds"}
            if edge not in edges:
                edges.append(edge)
    return {
        "kind": "deadlock",
        "title": verdict.splitlines()[0],
        "nodes": list(nodes.values()),
        "edges": edges,
    }


# -- installing and removing the tracking ---------------------------------------------

TRACKER: Tracker | None = None
# While a thread body is explored, its scheduler (``_explore/_threads``): tracked locks and
# joins are its switch points. ``point()`` may let other threads of the body run first;
# ``wait_lock(lock, timeout)`` is asked before a thread blocks on ``lock`` and answers True
# when it took the real lock for the thread; ``joining(thread)`` returns when the joined
# thread is done or the scheduler lets the thread wait as usual.
SCHEDULER: Any = None
_install_lock = _real_allocate_lock()
_real_join = threading.Thread.join
_real_signal = signal.signal


class _FactoryMeta(type):
    """Keeps ``isinstance(x, threading.Lock)`` working (3.13+) while the factory is ours."""

    _real: Any

    def __instancecheck__(cls, instance: object) -> bool:
        real = cls._real
        return isinstance(instance, TrackedLock) or (
            isinstance(real, type) and isinstance(instance, real)
        )


class _tracked_lock(metaclass=_FactoryMeta):
    _real = threading.Lock

    def __new__(cls) -> Any:
        if _untracked_maker(sys._getframe(1)):
            return _real_allocate_lock()
        return TrackedLock()


class _tracked_rlock(metaclass=_FactoryMeta):
    _real = threading.RLock

    def __new__(cls, *args: object, **kwargs: object) -> Any:
        if _untracked_maker(sys._getframe(1)):
            return _real_rlock()
        return TrackedLock(reentrant=True)


def _tracked_signal_lock() -> Any:
    # Condition.wait's waiter: acquired by the waiter, released by the notifier. A condition
    # whose own lock is not tracked gets an untracked waiter too.
    # Anyone else (threading's _after_fork, in a forked child) gets a plain lock.
    caller = sys._getframe(1)
    condition = caller.f_locals.get("self") if caller.f_code.co_name == "wait" else None
    if condition is None or not isinstance(getattr(condition, "_lock", None), TrackedLock):
        return _real_allocate_lock()
    return TrackedLock(signal=True)


# Who makes locks we leave untracked: importlib (module locks are signals between importing
# threads, and it detects its own deadlocks), multiprocessing and process pools, whose
# threads wait on other processes through pipes and semaphores we cannot see, and the
# harness that runs the tests.
_UNTRACKED_MAKERS = (
    "<frozen importlib",
    os.path.join("multiprocessing", ""),
    os.path.join("concurrent", "futures", "process.py"),
    # And the test harness, whose locks are tracked for the whole session since the
    # factories are: pytest and pluggy, xdist and its execnet channels (whose I/O thread
    # takes them while bodies run), pytest-timeout's timer, coverage's collector.
    os.path.join("", "_pytest", ""),
    os.path.join("", "pluggy", ""),
    os.path.join("", "xdist", ""),
    os.path.join("", "execnet", ""),
    "pytest_timeout.py",
    os.path.join("", "coverage", ""),
    # The thread backend's body thread (its start and join, in pytest's thread): nothing of
    # the test waits on its internal Event, and every item pays for tracking it.
    os.path.join("pytest_concur", "_backends", "thread.py"),
)


def _untracked_maker(frame: FrameType | None) -> bool:
    while frame is not None and frame.f_code.co_filename.endswith("threading.py"):
        if frame.f_code.co_name in _THREADING_OWN:
            return True
        frame = frame.f_back  # a Condition or Event made by someone else
    while frame is not None and frame.f_code.co_filename.endswith(_LOGGING):
        frame = frame.f_back  # a handler's lock: whoever made the handler (pytest, per test)
    if frame is None:
        return False
    filename = frame.f_code.co_filename
    known = _UNTRACKED_FILES.get(filename)
    if known is None:
        known = _UNTRACKED_FILES[filename] = any(part in filename for part in _UNTRACKED_MAKERS)
    return known


_UNTRACKED_FILES: dict[str, bool] = {}
_LOGGING = os.path.join("logging", "__init__.py")
# threading's own locks, made again in a forked child (_active_limbo_lock): plain, as the
# ones the parent made at import are.
_THREADING_OWN = frozenset({"_after_fork", "<module>"})


def _tracked_join(self: threading.Thread, timeout: float | None = None) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    if SCHEDULER is not None:
        SCHEDULER.joining(self)  # an explored body's join: others run meanwhile
    tracker = TRACKER
    if (
        tracker is None
        or timeout is not None
        or self is threading.current_thread()
        or _get_ident() in tracker.passive_threads
    ):
        _real_join(self, timeout)
        return

    def attempt(slice_: float) -> bool:
        _real_join(self, slice_)
        return not self.is_alive()

    if not self.is_alive():
        _real_join(self, None)  # finished, or never started: let join say which
        return
    tracker.wait_for(Wait(kind="join", thread=self), attempt)


def _quiet_hook(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """An excepthook that keeps quiet about the DeadlockErrors we raised to unblock threads."""

    def hook(args: Any) -> object:
        if isinstance(args.exc_value, DeadlockError):
            return None  # the test's failure already carries the diagnosis
        return previous(args)

    return hook


def _tracked_signal(signalnum: int, handler: Any) -> Any:
    tracker = TRACKER
    if tracker is not None:
        tracker.handler_installed = True
    return _real_signal(signalnum, handler)


def _on_start(thread: threading.Thread) -> Callable[[], None] | None:
    """Listens to ``Thread.start`` (see ``_patches``) while tracking is on."""
    tracker = TRACKER
    if tracker is None:
        return None
    tracker.started.append(thread)
    tracker.starting += 1  # not blocked, not yet alive: it will run

    def started() -> None:
        tracker.starting -= 1

    return started


# The replacements are made here (the factories are the hot path), swapped in and out by
# _patches, which records them.
_PATCHES: list[tuple[Any, str, Any]] = [
    (threading, "Lock", _tracked_lock),
    (threading, "RLock", _tracked_rlock),
    (threading, "_allocate_lock", _tracked_signal_lock),
    (_thread, "allocate_lock", _tracked_lock),
    (_thread, "RLock", _tracked_rlock),
    (signal, "signal", _tracked_signal),
]


@final
class tracking:
    """Track locks and waits in this process for the span of a ``with`` block."""

    def __init__(
        self,
        passive_threads: frozenset[int] = frozenset(),
        extra: Iterable[tuple[Any, str, Any]] = (),
    ) -> None:
        self._passive = passive_threads
        # More (owner, name, replacement) swaps for the block (the channels', say).
        self._extra = list(extra)
        self._undo: Callable[[], bool] = _nothing
        self._stop_listening: Callable[[], object] = _nothing
        self.tracker: Tracker | None = None

    def __enter__(self) -> Tracker:
        global TRACKER, _ACTIVE
        with _install_lock:
            if _ACTIVE is not None:
                # A body that was abandoned (a timeout ended the wait for it) never ended its
                # tracking; the new body takes over.
                _ACTIVE._restore()
            tracker = self.tracker = TRACKER = Tracker(_get_ident(), self._passive)
            # Module attributes are swapped for the block (the factories only if the
            # session has not made them ours already: see install); the two methods of
            # Thread are hooked once for the session and act only while TRACKER is set.
            self._undo = _patches.swap_many(
                [
                    *_PATCHES,
                    *self._extra,
                    (threading, "excepthook", _quiet_hook(threading.excepthook)),
                ]
            )
            _patches.replace(threading.Thread, "join", lambda original: _tracked_join)
            self._stop_listening = _patches.listen(_patches.THREAD_START, _on_start)
            _ACTIVE = self
        return tracker

    def __exit__(self, *exc_info: object) -> None:
        with _install_lock:
            if _ACTIVE is self:
                self._restore()

    def _restore(self) -> None:
        global TRACKER, _ACTIVE
        self._undo()
        self._undo = _nothing
        self._stop_listening()
        TRACKER = None
        _ACTIVE = None


_ACTIVE: tracking | None = None

# The lock factories, ours for the session: (owner, name, ours).
_FACTORIES = [patch for patch in _PATCHES if patch[2] is not _tracked_signal]
# The undoing of each install() not yet undone (pytester's inline runs configure a session
# inside a session; the inner one finds the factories ours already, and swaps nothing).
_session_undo: list[Callable[[], bool]] = []


def install() -> None:
    """Make every lock created from now on a :class:`TrackedLock`, until :func:`uninstall`.

    Outside a body a tracked lock only remembers its owner: ``TRACKER`` is ``None``, so it
    takes no global lock and keeps no books. Calls nest; each must be paired.
    """
    with _install_lock:
        _session_undo.append(_patches.swap_many(_FACTORIES))


def uninstall() -> None:
    """Undo the latest :func:`install`: the factories it found are put back.

    A factory someone replaced after us (a later plugin, a test's monkeypatch still in
    place) is theirs: left alone (see ``_patches.swap_many``).
    """
    with _install_lock:
        if _session_undo:
            _session_undo.pop()()


def _nothing() -> bool:
    return True


def started_threads(tracker: Tracker) -> Iterator[threading.Thread]:
    """Threads started while ``tracker`` was active."""
    return iter(list(tracker.started))
