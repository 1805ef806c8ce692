"""The ``blocked_loop`` check: a task step or a callback that holds an event loop too long.

While one step of a task (the code between two awaits) or one callback runs, nothing else
on its loop can: no other task, no timer, no I/O. A step longer than the threshold
(``concur_blocked_loop``, 0.1 s by default, as asyncio's debug mode uses) fails the test,
naming the task and coroutine and the lines the step ran between, or the callback and
where it is defined.

Design. From ``begin`` to ``end`` (switched off in ``end`` whatever happens):

- ``asyncio.events.Handle._run``, which every loop calls for each ready callback (a task's
  step is one: ``Task.__step`` or ``__wakeup`` bound to the task), is wrapped, once per
  session (``pytest_concur._hooks``). The wrapper times only handles of the loops a
  running watch follows; with no watch it costs one global read, for any other loop (a
  fixture's server loop in another thread, say) one dict lookup more. Debug mode is not
  used: it changes how asyncio behaves and costs far more.
- The loops followed: the loop running where the body starts (the item's loop for an
  ``async def`` body, and under the ``asyncio`` backend), and every loop created while the
  body runs (``BaseEventLoop.__init__`` is listened to, as the tasks check does), so
  ``asyncio.run`` inside a sync body is covered under every backend.
- Before a task's step, each frame of its await chain is noted with its ``f_lasti``
  (where it stands); only for a step over the threshold are lines worked out and a
  report written. The frames are dropped when the step is over.

The step that is running when ``begin`` is called (the body's task, inside which the
watches begin) started before the wrapper existed. For an ``async def`` body its part from
``begin`` on is the start of the body, so it is timed by hand: from ``begin`` to the start of
the next handle the loop runs (a no-op handle is queued so the loop cannot sleep in
``select`` in between), or to ``end`` if the body never suspends. Likewise the step running
at ``end`` (the body's last one) is judged there. For a plain ``def`` body, which the
backend calls from inside the loop, that step is the body itself and is not counted; nor
are the steps of pytest-concur's own tasks that call a sync body (stress mode's copies).

Invariants. The per-loop timing state (``_LoopState``) is only touched from the thread
that runs that loop. The set of followed loops is replaced or added to under the lock
and only read (one dict lookup) by the wrapper; what was seen is recorded under the lock,
and nothing is recorded once the watch has ended.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import dataclasses
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from inspect import iscoroutinefunction
from types import CodeType, CoroutineType, FrameType, GeneratorType
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur import _hooks, _primitives
from pytest_concur._checks import _allow
from pytest_concur._checks._where import _is_library, callable_name, plural, short_path

if TYPE_CHECKING:
    import asyncio

NAME = "blocked_loop"
INI = "concur_blocked_loop"
MARKER = "concur_blocked_loop"
DEFAULT = 0.1
# Taken at import, before any check runs: the deadlock check swaps threading.Lock for a
# tracked one during the body, and our own bookkeeping must not be tracked.
_real_lock = _primitives.allocate_lock
_clock = time.perf_counter
_get_ident = _thread.get_ident
# The sampler looks for running steps every threshold / 2, within these bounds (seconds),
# and ends once no watch has run for _LINGER seconds (the next one starts it again).
_MIN_TICK = 0.005
# A wait for a CPU shorter than this is not worth a word in the report.
_SHOWN_WAIT = 0.01
_MAX_TICK = 0.25
_LINGER = 1.0
# Linux's scheduler statistics of the calling thread: nanoseconds on a CPU, nanoseconds
# waiting for one (runnable, not running), timeslices (Documentation/scheduler/sched-stats).
_SCHEDSTAT = "/proc/thread-self/schedstat"
# Await chains deeper than this are cut (the user's line is almost always in the first few).
_MAX_CHAIN = 32
# How far past co_firstlineno (the first decorator) a ``def`` line is looked for.
_MAX_DECORATOR_LINES = 50
# Thresholds suggested in the report, a little above the longest step seen.
_ROUND = (0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


def from_ini(config: pytest.Config) -> float:
    """The ``concur_blocked_loop`` ini key in seconds; a usage error if it is not one."""
    value = config.getini(INI)
    seconds = _seconds(value)
    if seconds is None:
        raise pytest.UsageError(
            f"pytest-concur: {INI} = {value!r} is not a number of seconds; write e.g. "
            f"{INI} = 0.5 (the default is {DEFAULT}; 0 turns the check off)"
        )
    return seconds


def for_item(item: pytest.Item, default: float) -> float:
    """The threshold for ``item``: its closest marker, else ``default``; a bad marker fails it."""
    found = _allow.marks(item, MARKER)
    if not found:
        return default
    mark = found[0]
    given: list[object] = [*mark.args, *mark.kwargs.values()]
    seconds = None
    if len(given) == 1 and set(mark.kwargs) <= {"seconds"}:
        seconds = _seconds(given[0], strict=True)
    if seconds is None:
        shown = ", ".join([*map(repr, mark.args), *(f"{k}={v!r}" for k, v in mark.kwargs.items())])
        pytest.fail(
            f"In {item.name}: @pytest.mark.{MARKER} takes one number of seconds (0 turns the "
            f"check off), got ({shown}). Write e.g. @pytest.mark.{MARKER}(0.5)",
            pytrace=False,
        )
    return seconds


def _seconds(value: object, *, strict: bool = False) -> float | None:
    """``value`` as a finite number of seconds >= 0, or None; ``strict`` takes numbers only."""
    if isinstance(value, bool) or (strict and not isinstance(value, (int, float))):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@final
class BlockedLoopCheck:
    """No task step or callback of the body's event loops runs longer than a threshold."""

    name = NAME
    description = (
        "a task step or callback that holds the event loop longer than concur_blocked_loop "
        "seconds fails the test"
    )

    def __init__(self, config: pytest.Config) -> None:
        self._default = from_ini(config)

    def watch(self, item: pytest.Item) -> BlockedLoopWatch | None:
        if NAME in _allow.for_item(item).checks_off:
            return None
        threshold = for_item(item, self._default)
        if threshold == 0:
            return None
        function = getattr(item, "obj", None)
        code = getattr(function, "__code__", None)
        return BlockedLoopWatch(
            threshold=threshold,
            body_is_async=iscoroutinefunction(function),
            body_name=callable_name(function),
            body_file=code.co_filename if code is not None else "",
            body_line=code.co_firstlineno if code is not None else 0,
        )


@final
class BlockedLoopWatch:
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def __init__(
        self,
        threshold: float,
        body_is_async: bool,
        body_name: str,
        body_file: str,
        body_line: int,
    ) -> None:
        self.threshold = threshold
        self.body_is_async = body_is_async
        self.body_name = body_name
        # Where the body's function starts (its first decorator), made a site only for a
        # report: most watches never write one.
        self.body_file = body_file
        self.body_line = body_line
        self._timing: _Timing | None = None

    def begin(self) -> None:
        self._timing = _Timing(self)

    def end(self, failed: bool) -> str | None:
        timing = self._timing
        if timing is None:
            return None
        self._timing = None
        return timing.finish()


@final
class _LoopState:
    """Timing of one followed loop; only touched from the thread that runs it."""

    __slots__ = ("current", "first", "looks", "next_look", "read", "thread")
    # The body's first step, begun before the wrapper was there: (task, start, schedstat).
    first: tuple[asyncio.Task[Any], float, bytes] | None
    # The handle being run: (task or None, await chain before the step, start, schedstat).
    current: tuple[asyncio.Task[Any] | None, _Chain, float, bytes] | None
    # The thread that runs the loop (for the sampler), and its scheduler statistics.
    thread: int
    read: Callable[[], bytes]
    # Written by the sampler (under the timing's lock), read when a step is judged: the
    # start of the step it looked at, and how often it found each user frame there.
    looks: tuple[float, dict[tuple[str, int, str], int]] | None
    # The sampler's own: the step it looks at (its start), and when it looks again.
    next_look: tuple[float, float] | None

    def __init__(self) -> None:
        self.first = None
        self.current = None
        self.thread = _get_ident()
        self.read = _reader().read
        self.looks = None
        self.next_look = None


@dataclasses.dataclass
class _Offender:
    """One distinct blocking place: its longest hold, and how often it held too long."""

    longest: float
    who: str
    where: str
    count: int = 1
    # Of the longest hold: seconds its thread waited for a CPU (not counted; None where
    # the platform does not say), and the user's line the sampler found it at.
    waited: float | None = None
    blocked_at: str = ""


class _Timing:
    """The wrappers of one watch, and what they saw."""

    def __init__(self, watch: BlockedLoopWatch) -> None:
        import asyncio
        import asyncio.events

        self._watch = watch
        self._lock = _real_lock()
        self._active = True
        self._offenders: dict[tuple[str, ...], _Offender] = {}
        self._loops: dict[Any, _LoopState] = {}
        self._body_task: asyncio.Task[Any] | None = None
        self._restore: list[Callable[[], None]] = []

        loop = asyncio.events._get_running_loop()
        # No loop runs where the body begins: a loop made before the watch that starts
        # running in this thread is the body's too (pytest-asyncio's and anyio's, under
        # --concur-check-all; a fixture's loop that a sync body runs). See adopt.
        self._adopt_thread: int | None = _get_ident() if loop is None else None
        if loop is not None:
            state = self._loops[loop] = _LoopState()
            self._body_task = asyncio.current_task(loop)
            if watch.body_is_async and self._body_task is not None:
                state.first = (self._body_task, _clock(), _schedstat())
                # Without a ready handle the loop could sleep in select() right after the
                # body's first await, and that sleep would be counted as part of the step.
                loop.call_soon(_nothing)

        self._threshold = watch.threshold
        # How often the sampler looks for a step that began (it then waits for the step
        # to pass the threshold, and looks at it then).
        self.tick = min(max(watch.threshold / 2, _MIN_TICK), _MAX_TICK)
        self._task_type = asyncio.Task
        _hooks.replace(asyncio.events.Handle, "_run", _timed_run)
        self._restore.append(_hooks.listen(_hooks.LOOP_INIT, self._follow))
        _start_timing(self)

    def time(self, handle: asyncio.Handle, state: _LoopState, run: Callable[[Any], None]) -> None:
        """Run one handle of a followed loop, and judge it if it held the loop too long."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        # A task's step is a callback bound to the task (Task.__step or __wakeup).
        owner = getattr(handle._callback, "__self__", None)  # type: ignore[attr-defined]
        if isinstance(owner, self._task_type):
            task: asyncio.Task[Any] | None = owner
            before = _chain(owner.get_coro())
        else:
            task, before = None, _NO_CHAIN
        ident = _get_ident()
        if ident != state.thread:  # a loop made in one thread and run in another
            state.thread, state.read = ident, _reader().read
        sched = state.read()
        start = _clock()
        first = state.first
        if first is not None:  # the body's first step ended before this handle began
            state.first = None
            self._judge(None, first[0], None, start - first[1], state, first[1], first[2], sched)
        previous = state.current
        state.current = (task, before, start, sched)
        try:
            run(handle)
        finally:
            state.current = previous
            elapsed = _clock() - start
            if elapsed > self._threshold:
                self._judge(handle, task, before, elapsed, state, start, sched, state.read())

    def sample(self, now: float, frames: Callable[[], dict[int, FrameType]]) -> float:
        """In the sampler's thread: note where each step running past the threshold is.

        Returns when it wants to look next. A step is looked at when it passes the
        threshold, then at twice, four times ... that age: a few looks name the line, and
        each look takes the GIL from the loop's thread, which would lengthen the very step
        it looks at (more so on a busy machine, where the sampler may wait for a CPU while
        holding it).
        """
        wanted = now + self.tick
        for state in list(self._loops.values()):
            current, first = state.current, state.first
            if current is not None:
                start = current[2]
            elif first is not None:
                start = first[1]
            else:
                continue  # idle, or running a handle of no followed loop
            age = now - start
            if age <= self._threshold:
                wanted = min(wanted, start + self._threshold + _MIN_TICK)
                continue
            following = state.next_look
            if following is not None and following[0] == start and now < following[1]:
                wanted = min(wanted, following[1])
                continue
            state.next_look = (start, start + 2 * age)
            wanted = min(wanted, start + 2 * age)
            place = _user_frame(frames().get(state.thread))
            if place is None:
                continue
            with self._lock:
                looks = state.looks
                if looks is None or looks[0] != start:
                    looks = state.looks = (start, {})
                looks[1][place] = looks[1].get(place, 0) + 1
        return wanted

    def _follow(self, loop: Any, result: None = None) -> None:
        with self._lock:
            if not self._active:
                return
            # Copied, not changed in place: the wrapper reads it without the lock.
            self._loops = {**self._loops, loop: _LoopState()}
        _loop_followed()

    def adopt(self, loop: Any) -> _LoopState | None:
        """Follow ``loop`` if it runs a handle in the thread where the body began."""
        if _get_ident() != self._adopt_thread:
            return None
        self._follow(loop)
        return self._loops.get(loop)

    def follows_a_loop(self) -> bool:
        """Whether a loop runs, or was made, under this watch: then the sampler is wanted.

        A body that makes no loop starts no sampler thread (one thread start fewer per
        test, and no thread of ours in the process while it runs).
        """
        return bool(self._loops)

    def _judge(
        self,
        handle: asyncio.Handle | None,
        task: asyncio.Task[Any] | None,
        before: _Chain | None,
        elapsed: float,
        state: _LoopState,
        start: float,
        sched_start: bytes,
        sched_end: bytes,
        *,
        body_returned: bool = False,
    ) -> None:
        """Record a step or callback over the threshold, unless it is exempt."""
        if elapsed <= self._watch.threshold:
            return
        # What the step itself took: not the time its thread was ready to run but waited
        # for a CPU (a busy machine), where the platform says how long that was.
        waited = _waited(sched_start, sched_end)
        held = elapsed - waited if waited is not None else elapsed
        # Nor the garbage collector's pauses: a full collection in a long session (many
        # objects alive) can take longer than the threshold, in whichever step it lands.
        held -= _gc_during(state.thread, start, start + elapsed)
        # Nor waits for the GIL while its holder could not run (see _note_stall): only the
        # part of them its own thread spent off its CPU, neither running nor runnable.
        on_cpu = _on_cpu(sched_start, sched_end)
        if on_cpu is not None and held > self._watch.threshold:
            off_cpu = max(0.0, elapsed - on_cpu - (waited or 0.0))
            held -= min(off_cpu, _stalled_during(start, start + elapsed))
        with self._lock:
            looks = state.looks
            if looks is not None and looks[0] == start:
                state.looks = None
                blocked_at = _blocked_at(looks[1])
            else:
                blocked_at = ""
        if held <= self._watch.threshold:
            return
        sync_body = not self._watch.body_is_async
        if sync_body and task is not None and _runs_sync_body(task, self._body_task):
            return  # the sync body itself, called by the backend from inside the loop
        try:
            if task is not None:
                key, who, where = self._describe_step(task, before, body_returned)
            else:
                callback = getattr(handle, "_callback", None)
                key, who, where = _describe_callback(callback)
        except Exception as error:  # this runs inside the user's loop: never break it
            key, who, where = ("?",), f"a step or callback ({error!r} naming it)", ""
        with self._lock:
            if not self._active:
                return
            seen = self._offenders.get(key)
            if seen is None:
                self._offenders[key] = _Offender(held, who, where, 1, waited, blocked_at)
                return
            seen.count += 1
            if held > seen.longest:
                seen.longest, seen.who, seen.waited = held, who, waited
                seen.blocked_at = blocked_at or seen.blocked_at

    def _describe_step(
        self,
        task: asyncio.Task[Any],
        before: _Chain | None,
        body_returned: bool,
    ) -> tuple[tuple[str, ...], str, str]:
        coroutine = _coroutine_name(task, self._watch.body_name)
        if before is None:  # the body's first step: it began where the body begins
            watch = self._watch
            start = f"its start ({_def_site(watch.body_file, watch.body_line)})"
        else:
            start = _site(before, before=True) or "its start"
        if body_returned or task.done():
            stop = "its end"
        else:
            stop = _site(_chain(task.get_coro()), before=False) or "where it suspended"
        who = f"task {_task_name(task)!r} running {coroutine}()"
        where = f"in one step, from {start} to {stop}"
        return ("task", coroutine, start, stop), who, where

    def finish(self) -> str | None:
        """Judge the step running now (the body's last), undo the wrappers, report."""
        import asyncio.events

        loop = asyncio.events._get_running_loop()
        state = self._loops.get(loop) if loop is not None else None
        if state is not None:
            sched = _schedstat()
            now = _clock()
            if state.first is not None:  # the body never suspended
                task, start, sched_start = state.first
                state.first = None
                self._judge(
                    None,
                    task,
                    None,
                    now - start,
                    state,
                    start,
                    sched_start,
                    sched,
                    body_returned=True,
                )
            elif state.current is not None:
                task_now, before, start, sched_start = state.current
                if task_now is not None:
                    # Recorded here: the wrapper that timed this step records nothing once
                    # the watch has ended, which it has by the time the step is over.
                    self._judge(
                        None,
                        task_now,
                        before,
                        now - start,
                        state,
                        start,
                        sched_start,
                        sched,
                        body_returned=task_now is self._body_task,
                    )
        with self._lock:
            if not self._active:
                return None
            self._active = False
            self._loops = {}
            offenders = sorted(self._offenders.values(), key=lambda o: -o.longest)
            self._offenders = {}
        self._body_task = None
        _stop_timing(self)
        restores, self._restore = self._restore, []  # they hold us: no cycle left behind
        for restore in reversed(restores):
            restore()
        if not offenders:
            return None
        return _report(offenders, self._watch.threshold)


# The timings of the watches that run now (one, but for a body abandoned at its deadline):
# replaced under the lock, read without it by the wrapper of Handle._run and the sampler.
_timings_lock = _real_lock()
_TIMINGS: tuple[_Timing, ...] = ()


def _start_timing(timing: _Timing) -> None:
    global _TIMINGS
    with _timings_lock:
        _TIMINGS = (timing, *_TIMINGS)
    if timing.follows_a_loop():
        _loop_followed()


def _loop_followed() -> None:
    """A watch follows a loop: the sampler runs, and collections are timed (not blamed)."""
    with _timings_lock:
        if _on_gc not in gc.callbacks:
            gc.callbacks.append(_on_gc)
    _sampler.wanted()


def _stop_timing(timing: _Timing) -> None:
    global _TIMINGS
    with _timings_lock:
        _TIMINGS = tuple(t for t in _TIMINGS if t is not timing)
        if not _TIMINGS:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(_on_gc)
            _GC_SPANS.clear()
            _STALLS.clear()


# -- the interpreter lock: waits that no step is to blame for ---------------------------
#
# A loop's thread that waits for the GIL is off its CPU, as in a blocking call, and its own
# scheduler statistics do not tell the two apart. On a busy machine another thread can be
# descheduled while it holds the GIL (a harness's I/O thread, the sampler itself), and the
# step then "takes" as long as that thread waits for a CPU. The sampler notices: it too
# needs the GIL to come back from its wait, so it comes back late. Each time it is late by
# more than _STALL for a reason other than its own wait for a CPU, the span is kept; a step
# over the threshold is not charged the part of such spans during which its own thread was
# off its CPU (a step that computes holds the GIL, and is charged in full).
_STALL = 0.02
_STALLS: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)


def _note_stall(due: float, back: float, own_wait: float | None) -> None:
    """The sampler came back at ``back``, due at ``due``, having waited ``own_wait`` for a CPU."""
    if own_wait is None:  # no scheduler statistics: its lateness may be its own CPU wait
        return
    if back - due - own_wait > _STALL:
        # The span it waited for the GIL, as nearly as one can say: its own CPU wait is
        # taken off the start.
        _STALLS.append((due + own_wait, back))


def _stalled_during(start: float, end: float) -> float:
    """Seconds of GIL stalls the sampler saw between ``start`` and ``end``.

    With the one it is in now, if it is overdue: when the GIL's holder lets go, the loop's
    thread may take it first and judge its step before the sampler is back to say so.
    """
    spans = list(_STALLS)
    sampler = _sampler
    waiting, native_id = sampler.waiting, sampler.native_id
    if waiting is not None and native_id is not None and end - waiting[0] > _STALL:
        due, sched_before = waiting
        own_wait = _waited(sched_before, _task_schedstat(native_id))
        if own_wait is not None and end - due - own_wait > _STALL:
            spans.append((due + own_wait, end))
    return sum(max(0.0, min(end, stop) - max(start, began)) for began, stop in spans)


def _task_schedstat(native_id: int) -> bytes:
    """Another thread's scheduler statistics (Linux), ``b""`` if it has none or is gone."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as stream:
            return stream.read(64)
    except OSError:
        return b""


def _on_cpu(start: bytes, end: bytes) -> float | None:
    """Seconds the thread ran on a CPU in between (field 1 of schedstat); None: unknown."""
    if not start or not end:
        return None
    try:
        return max(0.0, (int(end.split()[0]) - int(start.split()[0])) / 1e9)
    except (IndexError, ValueError):  # pragma: no cover - a format we do not know
        return None


# -- garbage collection: pauses that no step is to blame for -----------------------------
#
# While a watch follows a loop, gc.callbacks tells when each collection starts and stops, in the
# thread that triggered it; the last few spans of each thread are kept, and a step over
# the threshold is charged its wall time less the collections that ran in it.
_GC_STARTED: dict[int, float] = {}
_GC_SPANS: dict[int, collections.deque[tuple[float, float]]] = {}


def _on_gc(phase: str, info: dict[str, int]) -> None:
    ident = _get_ident()
    if phase == "start":
        _GC_STARTED[ident] = _clock()
        return
    began = _GC_STARTED.pop(ident, None)
    if began is None:
        return
    spans = _GC_SPANS.get(ident)
    if spans is None:
        spans = _GC_SPANS[ident] = collections.deque(maxlen=32)
    spans.append((began, _clock()))


def _gc_during(ident: int | None, start: float, end: float) -> float:
    """Seconds thread ``ident`` spent collecting garbage between ``start`` and ``end``."""
    spans = _GC_SPANS.get(ident) if ident is not None else None
    if not spans:
        return 0.0
    return sum(max(0.0, min(end, stop) - max(start, began)) for began, stop in list(spans))


# -- what a step consumed: wall time less the time its thread waited for a CPU ------------


class _SchedStat:
    """The calling thread's ``/proc/thread-self/schedstat``, kept open (one per thread)."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        try:
            self.fd = os.open(_SCHEDSTAT, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # not Linux, or no scheduler statistics: wall time it is
            self.fd = -1

    def read(self) -> bytes:
        if self.fd < 0:
            return b""
        try:
            return os.pread(self.fd, 64, 0)
        except OSError:  # pragma: no cover - the kernel refused a file it opened
            return b""

    def __del__(self) -> None:  # the thread ended (its locals go), or a fork's child
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_sched_local = threading.local()


def _reader() -> _SchedStat:
    """The calling thread's reader of its scheduler statistics."""
    reader: _SchedStat | None = getattr(_sched_local, "reader", None)
    if reader is None:
        reader = _sched_local.reader = _SchedStat()
    return reader


def _schedstat() -> bytes:
    """The calling thread's scheduler statistics now, unparsed; ``b""`` where there are none.

    Read before every step of a followed loop (one ``pread``), and after one that took
    longer than the threshold; parsed only then.
    """
    return _reader().read()


def _waited(start: bytes, end: bytes) -> float | None:
    """Seconds the thread was ready to run but waited for a CPU in between; None: unknown."""
    if not start or not end:
        return None
    try:
        return max(0.0, (int(end.split()[1]) - int(start.split()[1])) / 1e9)
    except (IndexError, ValueError):  # pragma: no cover - a format we do not know
        return None


def measured_as() -> str:
    """How the check measures a step here, for its report."""
    if _schedstat():
        return (
            "wall time less the time its thread waited for a CPU or for a GIL holder that "
            "could not run, or collected garbage"
        )
    return "wall time less garbage collection: this platform tells no thread's wait for a CPU"


# -- the sampler: which line a step that runs too long is at -----------------------------
#
# Only a thread of its own can look at a loop whose thread is busy in the step. It is
# started with _thread (no threading.Thread: the leak checks, the deadlock check and the
# process backend's start method see only those; a hang report shows no thread whose frames
# are all ours), when a watch begins and none runs; it
# ends once no watch has run for _LINGER seconds, and before every fork (os.register_at_fork:
# a fork must not copy a thread of ours, and Python 3.12+ warns of one). It takes no lock
# a body can hold, and never calls threading.current_thread() (that would register it).


@final
class _Sampler:
    def __init__(self) -> None:
        self.lock = _real_lock()
        self.running = False
        self.stopping = False
        self.native_id: int | None = None
        self.ident: int | None = None
        # Held while the sampler waits between looks: released to wake it early.
        self.wake = _real_lock()
        self.wake.acquire()
        self.done = _real_lock()
        # Held from the thread's start until it runs (see wanted).
        self.started = _real_lock()
        # While it waits between looks: when it is due back, and its schedstat then.
        self.waiting: tuple[float, bytes] | None = None

    def wanted(self) -> None:
        """A watch began: make sure the sampler runs."""
        with self.lock:
            if self.running or self.stopping:
                return
            self.running = True
            self.done.acquire()
        self.started.acquire()
        try:
            _thread.start_new_thread(self._run, ())
        except RuntimeError:  # pragma: no cover - no more threads: no lines named
            self.started.release()
            with self.lock:
                self.running = False
                self.done.release()
            return
        # Until the new thread runs, its state has no thread id, and Python 3.14's
        # faulthandler stops its dump of every thread at such a state: a body that crashed
        # right after the sampler's start would be reported with none of its frames.
        if self.started.acquire(timeout=1.0):
            self.started.release()

    def _run(self) -> None:
        self.ident = _get_ident()
        self.native_id = threading.get_native_id()
        with contextlib.suppress(RuntimeError):  # released by wanted after its timeout
            self.started.release()
        idle_since: float | None = None
        timeout = _MIN_TICK
        try:
            while True:
                timings = _TIMINGS
                with self.lock:
                    if self.stopping:
                        return
                    now = time.monotonic()
                    if timings:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = now
                    elif now - idle_since > _LINGER:
                        return
                timeout = max(timeout, _MIN_TICK)
                due, sched_before = _clock() + timeout, _schedstat()
                self.waiting = (due, sched_before)  # see _stalled_during
                if self.wake.acquire(timeout=timeout):
                    self.waiting = None
                    continue  # woken: stopping
                timings = _TIMINGS
                now = _clock()
                wanted = now + (min(t.tick for t in timings) if timings else _LINGER / 4)
                for timing in timings:
                    with contextlib.suppress(Exception):  # a look never ends it
                        wanted = min(wanted, timing.sample(now, sys._current_frames))
                after = _clock()
                if after - due > _STALL:
                    _note_stall(due, after, _waited(sched_before, _schedstat()))
                self.waiting = None
                timeout = wanted - after
        finally:
            with self.lock:
                self.running = False
                self.ident = None
            self.done.release()

    def stop(self) -> None:
        """Before a fork: end the sampler and wait until its thread is gone."""
        with self.lock:
            if not self.running:
                return
            self.stopping = True
            native_id = self.native_id
        self.wake.release()
        self.done.acquire()  # it left its loop
        self.done.release()
        self.wake.acquire(blocking=False)  # taken back, if it did not take it
        # The thread's last instructions still run after it released ``done``: wait until
        # the kernel has it no more (Linux), so that the fork copies no thread of ours.
        task = f"/proc/self/task/{native_id}"
        deadline = time.monotonic() + 1.0
        while native_id is not None and os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0005)
        with self.lock:
            self.stopping = False

    def after_fork_in_parent(self) -> None:
        if any(timing.follows_a_loop() for timing in _TIMINGS):
            self.wanted()


_sampler = _Sampler()


def _after_fork_in_child() -> None:
    global _sampler, _sched_local
    _sampler = _Sampler()  # the parent's sampler is not in the child
    _sched_local = threading.local()  # its files are the parent's threads'


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=lambda: _sampler.stop(),
        after_in_parent=lambda: _sampler.after_fork_in_parent(),
        after_in_child=_after_fork_in_child,
    )


def sampler_ident() -> int | None:
    """The sampler's thread ident while it runs (hang reports leave it out already: all its
    frames are pytest-concur's)."""
    return _sampler.ident


def _user_frame(frame: FrameType | None) -> tuple[str, int, str] | None:
    """The innermost frame of the user's code on a stack: (file, line, function)."""
    while frame is not None:
        code = frame.f_code
        if not _is_library(code.co_filename):
            return code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name)
        frame = frame.f_back
    return None


def _blocked_at(looks: dict[tuple[str, int, str], int]) -> str:
    """The line the sampler found a step at most often, with its source."""
    import linecache

    (filename, lineno, function), count = max(looks.items(), key=lambda item: item[1])
    total = sum(looks.values())
    text = linecache.getline(filename, lineno).strip()
    where = f"at {short_path(filename)}:{lineno} in {function}" + (f": {text}" if text else "")
    if total > count:
        where += f" ({count} of {total} looks)"
    return where


def _timed_run(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``Handle._run``, timed for the loops a watch follows (installed once, see _hooks)."""

    def _run(handle: Any) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        timings = _TIMINGS
        if timings:
            loop = handle._loop
            for timing in timings:
                state = timing._loops.get(loop)
                if state is None and timing._adopt_thread is not None:
                    state = timing.adopt(loop)
                if state is not None:
                    timing.time(handle, state, original)
                    return
        original(handle)

    return _run


def _nothing() -> None:
    """Queued at ``begin`` so the loop runs a handle right after the body's first step."""


# An await chain as noted before a step: each frame with its f_lasti then (reading
# f_lineno would cost a walk of the line table per frame, on every step).
_Chain = list[tuple[FrameType, int]]
_NO_CHAIN: _Chain = []


def _chain(coro: Any) -> _Chain:
    """Each frame of a coroutine's await chain with the offset it stands at, outermost first.

    Called before every step of a followed loop: it formats nothing, and the frames are
    dropped when the step is over (a suspended coroutine keeps them alive anyway).
    """
    found: _Chain = []
    while len(found) < _MAX_CHAIN:
        kind = type(coro)
        if kind is CoroutineType:
            frame = coro.cr_frame
            following = coro.cr_await
        elif kind is GeneratorType:  # a generator-based coroutine, as asyncio.sleep(0) uses
            frame = coro.gi_frame
            following = coro.gi_yieldfrom
        else:
            break  # a future, or something we cannot look into
        if frame is None:
            break  # finished
        found.append((frame, frame.f_lasti))
        coro = following
    return found


def _site(chain: _Chain, *, before: bool) -> str | None:
    """Where the user's code stood in an await chain, before or after a step.

    The innermost frame of user code, as ``file:line``; when that is a coroutine the task's
    own awaits, the line of the task's own coroutine is added, as the blocking call is
    often there, between the two calls.
    """
    user = [(frame, lasti) for frame, lasti in chain if not _is_library(frame.f_code.co_filename)]
    if not user:
        return None
    frame, lasti = user[-1]
    code = frame.f_code
    if before and _unstarted(code, lasti):
        return f"its start ({_def_site(code.co_filename, code.co_firstlineno)})"
    text = _frame_site(frame, lasti)
    outer, outer_lasti = user[0]
    if outer is not frame:
        name = getattr(code, "co_qualname", code.co_name)
        text += f" in {name}() (called at {_frame_site(outer, outer_lasti)})"
    return text


def _frame_site(frame: FrameType, lasti: int) -> str:
    lineno = _line_at(frame.f_code, lasti) if lasti >= 0 else None
    return f"{short_path(frame.f_code.co_filename)}:{lineno or frame.f_lineno}"


def _unstarted(code: CodeType, lasti: int) -> bool:
    """Whether a coroutine frame at ``lasti`` has not run yet (before its first RESUME)."""
    if lasti < 0:
        return True  # 3.10
    import dis

    for instruction in dis.get_instructions(code):
        if instruction.opname == "RESUME":  # 3.11+: the first one is where a frame starts
            return lasti < instruction.offset
    return False


def _line_at(code: CodeType, lasti: int) -> int | None:
    """The line of the instruction at byte offset ``lasti`` (what f_lineno said then)."""
    for start, stop, lineno in code.co_lines():
        if start <= lasti < stop:
            return lineno
    return None


def _def_site(filename: str, first_line: int) -> str:
    """``file:line`` of a function's ``def``, past its decorators (``co_firstlineno``)."""
    import linecache

    if not filename:
        return "an unknown place"
    lineno = first_line
    for offset in range(_MAX_DECORATOR_LINES):
        text = linecache.getline(filename, first_line + offset).lstrip()
        if text.startswith(("def ", "async def ")):
            lineno = first_line + offset
            break
        if not text:
            break  # no source to read: keep the first line
    return f"{short_path(filename)}:{lineno}"


def _runs_sync_body(task: asyncio.Task[Any], body_task: asyncio.Task[Any] | None) -> bool:
    """Whether ``task`` is pytest-concur's own task that calls a sync body."""
    if task is body_task:
        return True
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and _is_pytest_concur(code.co_filename)


def _coroutine_name(task: asyncio.Task[Any], body_name: str) -> str:
    """The user's coroutine the task runs, past pytest-concur's and asyncio's own."""
    coro: Any = task.get_coro()
    top = coro
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and not _is_library(code.co_filename):
            return str(getattr(coro, "__qualname__", None) or code.co_name)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    code = getattr(top, "cr_code", None)
    if code is not None and _is_pytest_concur(code.co_filename):
        # pytest-concur's task that awaits the body (or a stress-mode copy of it), whose
        # coroutine has finished by now.
        return body_name
    return str(getattr(top, "__qualname__", None) or type(top).__name__)


def _is_pytest_concur(filename: str) -> bool:
    import pytest_concur

    return filename.startswith(pytest_concur.__path__[0])


def _task_name(task: asyncio.Task[Any]) -> str:
    # 3.13 may leave a task unnamed (get_name() is None) until someone names it.
    return task.get_name() or f"Task at 0x{id(task):x}"


def describe_callable(callback: Any) -> tuple[str, str]:
    """The name of a callback and ``file:line`` of its definition ("" if it has none)."""
    function = callback
    while hasattr(function, "func"):  # functools.partial
        function = function.func
    function = getattr(function, "__func__", function)  # a bound method
    code = getattr(function, "__code__", None)
    site = f"{short_path(code.co_filename)}:{code.co_firstlineno}" if code is not None else ""
    return callable_name(function), site


def _describe_callback(callback: Any) -> tuple[tuple[str, ...], str, str]:
    """Key, name and definition site of a plain callback."""
    name, site = describe_callable(callback)
    owner = getattr(callback, "__self__", None)
    protocol = getattr(owner, "_protocol", None)
    if protocol is not None:
        # A transport's callback runs the user's protocol (data_received and the like).
        name = f"{name} (for protocol {type(protocol).__qualname__})"
    who = f"callback {name}" + (f" (defined at {site})" if site else "")
    return ("callback", name, site), who, ""


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds:.3f} s"


def _suggest(longest: float) -> str:
    """A round threshold comfortably above ``longest``, for the report's advice."""
    for value in _ROUND:
        if value >= longest * 1.5:
            return repr(value)
    return repr(math.ceil(longest * 1.5))


def _report(offenders: list[_Offender], threshold: float) -> str:
    count = sum(o.count for o in offenders)
    lines = [
        f"pytest-concur: the event loop was blocked: {plural(count, 'step or callback', 'steps or callbacks')} "
        f"held it longer than {threshold:g} s ({INI}; measured as {measured_as()})"
    ]
    for offender in offenders:
        line = f"  {offender.who} held the event loop for {_seconds_text(offender.longest)}"
        if offender.where:
            line += f" {offender.where}"
        if offender.count > 1:
            line += f" ({offender.count} times; the longest shown)"
        lines.append(line)
        if offender.blocked_at:
            lines.append(f"    blocked {offender.blocked_at}")
        if offender.waited is not None and offender.waited >= _SHOWN_WAIT:
            lines.append(
                f"    (its thread also waited {_seconds_text(offender.waited)} for a CPU: "
                "a busy machine, not counted)"
            )
    longest = max(o.longest for o in offenders)
    lines.append(
        "  Nothing else on the loop runs meanwhile (no other task, no timer, no I/O). A "
        "blocking call between two awaits (time.sleep, a sync socket or file, a lock) or "
        "heavy CPU does this: move it to a thread with await asyncio.to_thread(...), or "
        f"raise the threshold for this test: @pytest.mark.{MARKER}({_suggest(longest)})."
    )
    return "\n".join(lines)
