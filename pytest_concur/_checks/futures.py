"""The ``futures`` check: a ``concurrent.futures.Future`` whose exception nobody looked at.

An exception raised in work handed to an executor (``ThreadPoolExecutor``,
``ProcessPoolExecutor``, any ``Executor`` subclass, ``asyncio.run_coroutine_threadsafe``)
lives in its future until someone asks for it. Plain Python never reports one nobody asked
for: it is lost with the future. Such a future fails the test that made it.

Design. From ``begin`` to ``end`` (taken off in ``end`` whatever happens) five methods of
``concurrent.futures.Future`` are listened to (``pytest_concur._patches``, one wrapper per
session):

- ``__init__`` records each future made while the body runs, with where (the user's frames
  of the ``submit`` call), weakly: a future that never fails costs one dictionary entry;
- ``set_exception`` keeps a recorded future that failed, strongly, until the verdict;
- ``result()`` and ``exception()`` on a future that is done (also when ``result()``
  raises), and ``add_done_callback`` (its callback is handed the future), mark it seen;
  but not the callback by which asyncio's ``run_coroutine_threadsafe`` only passes a
  cancellation on (the future it returns is the caller's to read).

At ``end``, a failed future not seen is reported with its traceback (cancelled ones are not
failures). Not recorded: futures made by threads that act for a fixture (the fixture's,
not the test's), and those ``Executor.map`` makes, which it reads itself in order: when
one raises, the exception reaches the caller and ``map`` drops the rest.

Invariant: the recording state is only touched under its own lock; the GIL is not relied on.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any, final

from pytest_concur import _patches
from pytest_concur._checks._background import BackgroundCheck, BackgroundWatch
from pytest_concur._checks._where import Site, format_exception, here, plural
from pytest_concur._primitives import allocate_lock as _real_lock

NAME = "futures"
_BASE = os.path.join("concurrent", "futures", "_base.py")
# Frames between Future.__init__ and Executor.map: our wrapper, submit, map's comprehension.
_MAP_DEPTH = 6
# The done-callback asyncio adds to run_coroutine_threadsafe's future (asyncio/futures.py,
# _chain_future): it only passes a cancellation on to the coroutine.
_CANCEL_ONLY = "_chain_future.<locals>._call_check_cancel"


@final
class FuturesCheck(BackgroundCheck):
    """Every exception of a future the body made is retrieved by the time it returns."""

    name = NAME
    description = "an exception in a concurrent.futures.Future the body made is not lost"


@final
class FuturesWatch(BackgroundWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def record(self) -> _Recording:
        return _Recording()

    def report(self, errors: Sequence[Any]) -> str:
        return _report(errors)


@final
class _Lost:
    """A failed future nobody looked at, and where it was made."""

    __slots__ = ("future", "site")

    def __init__(self, future: Any, site: Site) -> None:
        self.future = future
        self.site = site


class _Recording:
    """The listeners of one watch, and what they saw."""

    def __init__(self) -> None:
        self.lock = _real_lock()
        self.active = True
        self.made: weakref.WeakKeyDictionary[Any, Site] = weakref.WeakKeyDictionary()
        self.failed: dict[Any, Site] = {}  # insertion order: the order they failed in
        self.seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._stop = _patches.listen_many(
            (
                (_patches.FUTURE_INIT, self._on_init),
                (_patches.FUTURE_SET_EXCEPTION, self._on_set_exception),
                (_patches.FUTURE_RESULT, self._on_read),
                (_patches.FUTURE_EXCEPTION, self._on_read),
                (_patches.FUTURE_ADD_DONE_CALLBACK, self._on_add_done_callback),
            )
        )

    def _on_init(self, future: Any, result: None) -> None:
        if not self.active or _made_by_map(sys._getframe(1)):
            return
        from pytest_concur._checks.threads import acting_for_a_fixture

        if acting_for_a_fixture():
            return
        site = here()
        with self.lock:
            if self.active:
                self.made[future] = site

    def _on_set_exception(self, future: Any, result: None) -> None:
        with self.lock:
            site = self.made.get(future) if self.active else None
            if site is not None and future not in self.seen:
                self.failed[future] = site

    def _on_read(self, future: Any) -> Callable[[], None] | None:
        if not self.active:
            return None

        def after() -> None:
            if future.done():  # a result() that timed out looked at nothing
                self._see(future)

        return after

    def _on_add_done_callback(self, future: Any, args: tuple[Any, ...], kwargs: Any) -> None:
        callback = args[0] if args else kwargs.get("fn")
        if getattr(callback, "__qualname__", "").endswith(_CANCEL_ONLY):
            return  # asyncio passes on a cancellation with it, never the exception
        self._see(future)

    def _see(self, future: Any) -> None:
        with self.lock:
            if self.active:
                self.seen.add(future)
                self.failed.pop(future, None)

    def close(self) -> list[_Lost]:
        """Stop listening; the failed futures nobody looked at, in the order they failed."""
        self._stop()
        with self.lock:
            self.active = False
            failed, self.failed = list(self.failed.items()), {}
            lost = [_Lost(f, site) for f, site in failed if f not in self.seen]
            self.made.clear()
            self.seen.clear()
        return [
            lost_one
            for lost_one in lost
            if not lost_one.future.cancelled() and not _ours(lost_one.future.exception())
        ]


def _ours(exc: BaseException | None) -> bool:
    """A DeadlockError or HangError: the verdict that raised it is the test's failure already.

    (A worker unwinding from a deadlock leaves it in the future the test was waiting on
    when the same verdict ended that wait: reporting it again repeats the whole report.)
    """
    from pytest_concur._errors import DeadlockError, HangError

    return isinstance(exc, (DeadlockError, HangError))


def _made_by_map(frame: Any) -> bool:
    """Whether the future being made is one of ``Executor.map``'s (it reads them itself)."""
    for _ in range(_MAP_DEPTH):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "map" and code.co_filename.endswith(_BASE):
            return True
        frame = frame.f_back
    return False


def _report(lost: Sequence[_Lost]) -> str:
    parts = [
        f"pytest-concur: {plural(len(lost), 'future')} made by the test raised an exception "
        "that nobody retrieved"
    ]
    for one in lost:
        exc = one.future.exception()  # done and not cancelled: it does not block
        text = format_exception(exc) if exc is not None else ""
        parts.append(f"  Future made at {one.site} raised:\n{text.rstrip()}")
    parts.append(
        "  An executor keeps a task's exception in its future until someone asks for it. "
        "Call future.result() (it raises it) or future.exception(), or use "
        "concurrent.futures.wait()/as_completed() and then read each one; or turn the check "
        f'off: @pytest.mark.concur_allow(checks_off=["{NAME}"]).'
    )
    return "\n".join(parts)


FuturesCheck.watch_type = FuturesWatch
