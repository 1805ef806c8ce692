"""The ``blocked_loop`` check: a task step or a callback that holds an event loop too long.

While one step of a task (the code between two awaits) or one callback runs, nothing else
on its loop can: no other task, no timer, no I/O. A step longer than the threshold
(``concur_blocked_loop``, 0.1 s by default, as asyncio's debug mode uses) fails the test,
naming the task and coroutine and the lines the step ran between, or the callback and
where it is defined.

Design. From ``begin`` to ``end`` (switched off in ``end`` whatever happens):

- ``asyncio.events.Handle._run``, which every loop calls for each ready callback (a task's
  step is one: ``Task.__step`` or ``__wakeup`` bound to the task), is wrapped, once per
  session (``pytest_concur._patches``). The wrapper times only handles of the loops a
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

Where the parts live: this module is the check, its watch and the timing of each step
(:class:`_Timing`, which judges a step and writes the report); ``_blocked_sampler`` holds
the running watches, the wrapper of ``Handle._run`` and the sampler thread;
``_blocked_clock`` what a step cost (CPU waits, garbage collection); ``_blocked_sites``
how a step or callback is named in the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from inspect import iscoroutinefunction
from types import FrameType
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur import _patches
from pytest_concur._checks import _allow
from pytest_concur._checks._blocked_clock import (
    _clock,
    _gc_during,
    _get_ident,
    _reader,
    _schedstat,
    _waited,
    measured_as,
)
from pytest_concur._checks._blocked_sampler import (
    _MIN_TICK,
    _loop_followed,
    _real_lock,
    _start_timing,
    _stop_timing,
    _timed_run,
)
from pytest_concur._checks._blocked_sites import (
    _NO_CHAIN,
    _blocked_at,
    _Chain,
    _chain,
    _coroutine_name,
    _def_site,
    _describe_callback,
    _runs_sync_body,
    _site,
    _task_name,
    _user_frame,
)
from pytest_concur._checks._where import callable_name, plural

if TYPE_CHECKING:
    import asyncio

NAME = "blocked_loop"
INI = "concur_blocked_loop"
MARKER = "concur_blocked_loop"
DEFAULT = 0.1
# A wait for a CPU shorter than this is not worth a word in the report.
_SHOWN_WAIT = 0.01
# The sampler looks at least this often (seconds), however high the threshold.
_MAX_TICK = 0.25
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
        _patches.replace(asyncio.events.Handle, "_run", _timed_run)
        self._restore.append(_patches.listen(_patches.LOOP_INIT, self._follow))
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


def _nothing() -> None:
    """Queued at ``begin`` so the loop runs a handle right after the body's first step."""


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
