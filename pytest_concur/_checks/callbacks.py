"""The ``callbacks`` check: an exception that asyncio only hands to the loop's exception handler.

An exception raised by a callback (``loop.call_soon``, ``call_later``, ``call_at``,
``call_soon_threadsafe``, a future's done-callback), or kept by a future that is destroyed
without anyone retrieving it, reaches nobody: asyncio passes it to the loop's exception
handler, whose default logs it and goes on. Such an exception fails the test it happened in.

Design. Three wrappers are put in place once per session (``pytest_concur._patches.replace``)
and do something only while a watch runs (a module-level tuple, read without a lock):

- ``BaseEventLoop.call_exception_handler``: for a loop the watch follows, with no handler
  of the user's set (``loop.set_exception_handler``: then the user sees it, as anyio's
  runner does), a context that carries an ``Exception`` is recorded instead of logged;
  anything else goes to the original. The loops followed: those made while the body runs
  (``BaseEventLoop.__init__`` is listened to), and any loop whose handler is called from
  the body's thread (the loop the body runs on, pytest-asyncio's in a plain test), so a
  fixture's server loop in a thread of its own is left alone;
- ``call_soon``, ``call_soon_threadsafe``, ``call_later`` and ``call_at``: when the user's
  code calls one directly (the caller's frame is not asyncio's nor ours: one look at one
  frame), where it did is kept for the handle, weakly, so the report can say where the
  failing callback was scheduled. Asyncio's own scheduling (every task step) costs that
  look only.

Invariant: the recording state is only touched under its own lock.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, final

from pytest_concur import _patches
from pytest_concur._checks._background import BackgroundCheck, BackgroundWatch
from pytest_concur._checks._blocked_sites import describe_callable
from pytest_concur._checks._where import (
    UNKNOWN,
    Site,
    _is_library,
    format_exception,
    here,
    plural,
)
from pytest_concur._primitives import allocate_lock as _real_lock

NAME = "callbacks"
_SCHEDULERS = ("call_soon", "call_soon_threadsafe", "call_later", "call_at")


@final
class CallbacksCheck(BackgroundCheck):
    """No exception of the body's event loops ends up only in the loop's exception handler."""

    name = NAME
    description = (
        "an exception raised in an event-loop callback, or kept by a future nobody read, "
        "fails the test instead of being logged"
    )


@final
class CallbacksWatch(BackgroundWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def record(self) -> _Recording:
        return _Recording()

    def report(self, errors: Sequence[Any]) -> str:
        return _report(errors)


@final
class _Error:
    """One exception the loop's handler got: what raised it, and where it was scheduled."""

    __slots__ = ("exception", "site", "what")

    def __init__(self, exception: BaseException, what: str, site: Site) -> None:
        self.exception = exception
        self.what = what
        self.site = site


class _Recording:
    """The wrappers' state for one watch, and what they saw."""

    def __init__(self) -> None:
        import asyncio.base_events

        self.lock = _real_lock()
        self.active = True
        self.thread = threading.get_ident()
        self.loops: weakref.WeakSet[Any] = weakref.WeakSet()
        self.scheduled: weakref.WeakKeyDictionary[Any, Site] = weakref.WeakKeyDictionary()
        self.errors: list[_Error] = []
        loop_type = asyncio.base_events.BaseEventLoop
        _patches.replace(loop_type, "call_exception_handler", _handled)
        for name in _SCHEDULERS:
            _patches.replace(loop_type, name, _scheduling)
        self._stop = _patches.listen(_patches.LOOP_INIT, self._follow)
        _start(self)

    def _follow(self, loop: Any, result: None = None) -> None:
        with self.lock:
            if self.active:
                self.loops.add(loop)

    def follows(self, loop: Any) -> bool:
        with self.lock:
            return self.active and (threading.get_ident() == self.thread or loop in self.loops)

    def note_scheduled(self, handle: Any, site: Site) -> None:
        with self.lock:
            if self.active:
                self.scheduled[handle] = site

    def record(self, context: dict[str, Any], exception: BaseException) -> None:
        handle = context.get("handle")
        with self.lock:
            scheduled = self.scheduled.get(handle, UNKNOWN) if handle is not None else UNKNOWN
        error = _Error(exception, _what(context, scheduled), scheduled)
        with self.lock:
            self.errors.append(error)

    def close(self) -> list[_Error]:
        """Stop recording; what was recorded."""
        _stop(self)
        self._stop()
        with self.lock:
            self.active = False
            errors, self.errors = self.errors, []
            self.scheduled.clear()
            self.loops.clear()
        return errors


# The recordings of the watches that run now: replaced under the lock, read without it.
_recordings_lock = _real_lock()
_RECORDINGS: tuple[_Recording, ...] = ()


def _start(recording: _Recording) -> None:
    global _RECORDINGS
    with _recordings_lock:
        _RECORDINGS = (recording, *_RECORDINGS)


def _stop(recording: _Recording) -> None:
    global _RECORDINGS
    with _recordings_lock:
        _RECORDINGS = tuple(r for r in _RECORDINGS if r is not recording)


def _handled(original: Callable[..., None]) -> Callable[..., None]:
    """``call_exception_handler``, recording instead of logging (installed once)."""

    def call_exception_handler(loop: Any, context: dict[str, Any]) -> None:
        recordings = _RECORDINGS
        exception = context.get("exception") if recordings else None
        if isinstance(exception, Exception) and getattr(loop, "_exception_handler", 1) is None:
            for recording in recordings:
                if recording.follows(loop):
                    recording.record(context, exception)
                    return
        original(loop, context)

    return call_exception_handler


def _scheduling(original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``call_*`` method that notes where the user's code scheduled a callback."""

    def schedule(loop: Any, *args: Any, **kwargs: Any) -> Any:
        handle = original(loop, *args, **kwargs)
        recordings = _RECORDINGS
        if recordings:
            caller = sys._getframe(1)
            if not _is_library(caller.f_code.co_filename):
                site = here(caller)
                for recording in recordings:
                    recording.note_scheduled(handle, site)
        return handle

    schedule.__name__ = schedule.__qualname__ = original.__name__
    schedule.__doc__ = original.__doc__
    return schedule


def _what(context: dict[str, Any], scheduled: Site) -> str:
    """The callback, task or future the exception came from, and where, for people."""
    handle = context.get("handle")
    if handle is None:
        future = context.get("future") or context.get("task")
        what = _future_name(future) if future is not None else "the event loop"
        return f"{what}: {context.get('message', 'an exception')}"
    callback = getattr(handle, "_callback", None)
    name, defined = _describe(callback)
    args = getattr(handle, "_args", None) or ()
    if args and _is_future(args[0]) and getattr(callback, "__self__", None) is None:
        # Scheduled by the future itself, from where it was completed.
        done = f" (its future was completed at {scheduled})" if scheduled.frames else ""
        return f"done-callback {name}{defined} of {_future_name(args[0])}{done}"
    where = f", scheduled at {scheduled}" if scheduled.frames else ""
    return f"callback {name}{defined}{where}"


def _describe(callback: Any) -> tuple[str, str]:
    name, site = describe_callable(callback)
    return name, f" (defined at {site})" if site else ""


def _is_future(thing: object) -> bool:
    import asyncio

    return asyncio.isfuture(thing)


def _future_name(future: Any) -> str:
    import asyncio

    if isinstance(future, asyncio.Task):
        coro = future.get_coro()
        name = getattr(coro, "__qualname__", None) or repr(coro)
        return f"task {future.get_name()!r} (coroutine={name})"
    return f"an asyncio {type(future).__name__}"


def _report(errors: Sequence[_Error]) -> str:
    parts = [
        f"pytest-concur: {plural(len(errors), 'exception')} reached only the event loop's "
        "exception handler (asyncio would have logged "
        + ("it" if len(errors) == 1 else "them")
        + " and gone on)"
    ]
    for error in errors:
        parts.append(f"  {error.what}, raised:\n{format_exception(error.exception).rstrip()}")
    parts.append(
        "  Catch what a callback may raise inside it, retrieve every future's exception "
        "(await it, or call .exception()), or set a handler with "
        f'loop.set_exception_handler(); or turn the check off: @pytest.mark.concur_allow(checks_off=["{NAME}"]).'
    )
    return "\n".join(parts)


CallbacksCheck.watch_type = CallbacksWatch
