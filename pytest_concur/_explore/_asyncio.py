"""An event loop that lets a seeded schedule choose which task runs next.

asyncio runs ready callbacks first in, first out: two tasks that race always meet in the
same order, so a check-then-await race that this order happens to hide stays hidden. The
exploring loop is the item's selector loop (with the deadlock watch of ``_loop_deadlocks``)
whose ready queue, ``BaseEventLoop._ready``, is replaced by :class:`_ReadyQueue`
(:func:`exploring_loop`). The loop
takes callbacks from it only with ``popleft()``; ours answers with the first ready callback
of an owner the schedule picks:

- the owner of a callback is the task it steps or wakes (the ``__self__`` of the task's own
  step and wake-up methods, C or Python tasks alike), else the task that was running when
  it was scheduled (``call_soon`` from a task), else the loop itself (timers, I/O, other
  threads' ``call_soon_threadsafe``);
- each owner's callbacks keep their order, so what asyncio promises about one task's own
  callbacks holds; only the order between owners is chosen;
- one owner ready is no decision: nothing is drawn from the schedule.

The loop's iteration takes as many callbacks as were ready when it began, so I/O and timers
are still polled between batches: the schedule chooses among what is ready, it never makes
a callback ready.

Private attributes relied on (CPython 3.10 to 3.15): ``BaseEventLoop._ready``, a
``collections.deque`` that ``_call_soon``, ``_add_callback`` and ``_run_once`` use only
through ``append``, ``popleft``, ``len`` and truth, and ``close`` through ``clear``; and
``Handle._callback``. :func:`exploring_loop` checks ``_ready`` is an empty deque; if not,
the loop runs as it is, and the run says that it was not controlled.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, final

from pytest_concur._explore._schedule import Schedule
from pytest_concur._locks import _PACKAGE
from pytest_concur._loop_deadlocks import new_loop

# The owner of callbacks that belong to no task: the loop's own (timers, I/O).
_LOOP = "the loop"


@final
class Control:
    """What one item's exploring loop is told by the run, and what it tells back."""

    def __init__(self) -> None:
        # The schedule of the run in progress; None between runs (fixtures: first in, first out).
        self.schedule: Schedule | None = None
        # Whether the loop took a callback while a schedule was set: the body ran on it.
        self.ran = False
        # False when the loop could not be made to explore (see the module docstring).
        self.explorable = True


@final
class _ReadyQueue(collections.deque[Any]):
    """The loop's ready callbacks; ``popleft`` answers as the schedule chooses."""

    def __init__(self, control: Control, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._control = control
        self._loop = loop
        # id(handle) -> its owner, for handles scheduled while a schedule was set. A handle
        # leaves the map when it leaves the queue, so an id is never stale.
        self._owners: dict[int, object] = {}
        # The owner of the callback taken last: the one "running" (running on is no
        # preemption; see _schedule).
        self._last: object = None

    def append(self, handle: Any) -> None:
        if self._control.schedule is not None:
            self._owners[id(handle)] = self._owner(handle)
        super().append(handle)

    def clear(self) -> None:
        super().clear()
        self._owners.clear()

    def popleft(self) -> Any:
        schedule = self._control.schedule
        if schedule is None:
            handle = super().popleft()
            self._owners.pop(id(handle), None)
            self._last = None
            return handle
        self._control.ran = True
        # A copy, made without running Python code, hence whole even while another thread
        # appends (call_soon_threadsafe); only this thread removes, so its indexes hold.
        snapshot = list(self)
        owners = self._owners
        firsts: dict[object, int] = {}
        for index, handle in enumerate(snapshot):
            if handle.cancelled():
                continue  # the loop skips it; it is no candidate
            owner = owners.get(id(handle), _LOOP)
            if owner not in firsts:
                firsts[owner] = index
        if len(firsts) < 2:
            handle = super().popleft()
            self._last = owners.pop(id(handle), _LOOP)
            return handle
        candidates = list(firsts.items())
        last = self._last
        owner, index = candidates[schedule.pick(list(firsts), last)]
        handle = snapshot[index]
        # Where the one that was running stands, if it could go on (before the queue moves).
        current = _where(last, snapshot[firsts[last]]) if last in firsts else None
        del self[index]
        owners.pop(id(handle), None)
        self._last = owner
        schedule.record(_where(owner, handle), current)
        return handle

    def _owner(self, handle: Any) -> object:
        callback = getattr(handle, "_callback", None)
        task = getattr(callback, "__self__", None)
        if isinstance(task, asyncio.Task):
            return task
        if asyncio.events._get_running_loop() is not self._loop:
            return _LOOP  # another thread's call_soon_threadsafe
        running = asyncio.current_task(self._loop)
        return running if running is not None else _LOOP


def exploring_loop(control: Control) -> asyncio.AbstractEventLoop:
    """The item's usual loop (``_loop_deadlocks.new_loop``), with a ready queue ``control`` steers.

    The queue is swapped into the loop rather than the loop subclassed: the watched loop
    stays what it is, deadlock watch included, and only the order of its callbacks changes.
    """
    loop = new_loop()
    ready = getattr(loop, "_ready", None)
    if type(ready) is collections.deque and not ready and hasattr(loop, "_run_once"):
        loop._ready = _ReadyQueue(control, loop)  # type: ignore[attr-defined]
    else:  # pragma: no cover - a CPython whose loop no longer keeps a plain deque
        control.explorable = False
    return loop


def _where(owner: object, handle: Any) -> tuple[object, str, str, int]:
    """Who runs at this decision, as what, and where it stands: the task's first frame of
    user code (its name is taken now: the frame is gone when a report is written)."""
    if isinstance(owner, asyncio.Task):
        coro: Any = owner.get_coro()
        name = getattr(coro, "__qualname__", "")
        # Past pytest-concur's own wrappers (the body's task starts in BodyCall.call_async).
        for _ in range(8):
            frame = getattr(coro, "cr_frame", None)
            if frame is None:
                break  # finished: its done callbacks are what runs
            code = frame.f_code
            if not code.co_filename.startswith(_PACKAGE):
                return (
                    owner,
                    getattr(code, "co_qualname", code.co_name),
                    code.co_filename,
                    frame.f_lineno,
                )
            coro = getattr(coro, "cr_await", None)
        return owner, name, "", 0
    callback = getattr(handle, "_callback", None)
    name = getattr(callback, "__qualname__", None) or type(callback).__name__
    return _LOOP, name, "", 0


def describe(owner: object, name: str) -> str:
    """An owner and the name :func:`_where` found, for people."""
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r} ({name})"
    return f"{owner}'s callback {name}"
