"""The watches of the ``blocked_loop`` check that run now, and the threads that serve them.

- :data:`_TIMINGS`: the timing of each running watch (one, but for a body abandoned at its
  deadline), replaced under the lock and read without it;
- :func:`_timed_run`: the wrapper of ``asyncio.events.Handle._run``, installed once per
  session (``_patches``), which hands each handle of a followed loop to its watch's timing;
- the sampler: a thread of its own that looks, from outside, at which line a step running
  past the threshold is at (a loop whose thread is busy in the step cannot tell).

The timing itself (``blocked_loop._Timing``) is seen here only through :class:`_Timed`, so
this module does not import the check.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol, final

from pytest_concur import _primitives
from pytest_concur._checks._blocked_clock import (
    _GC_SPANS,
    _clock,
    _get_ident,
    _on_gc,
)

# Taken at import, before any check runs: the deadlock check swaps threading.Lock for a
# tracked one during the body, and our own bookkeeping must not be tracked.
_real_lock = _primitives.allocate_lock
# The sampler looks for running steps every threshold / 2, from this bound (seconds; the
# upper one is the check's), and ends once no watch has run for _LINGER seconds (the next
# one starts it again).
_MIN_TICK = 0.005
_LINGER = 1.0


class _Timed(Protocol):
    """What the wrapper and the sampler use of a watch's timing."""

    tick: float
    _loops: dict[Any, Any]
    _adopt_thread: int | None

    def adopt(self, loop: Any) -> Any: ...

    def time(self, handle: Any, state: Any, run: Callable[[Any], None]) -> None: ...

    def sample(self, now: float, frames: Callable[[], dict[int, FrameType]]) -> float: ...

    def follows_a_loop(self) -> bool: ...


# The timings of the watches that run now (one, but for a body abandoned at its deadline):
# replaced under the lock, read without it by the wrapper of Handle._run and the sampler.
_timings_lock = _real_lock()
_TIMINGS: tuple[_Timed, ...] = ()


def _start_timing(timing: _Timed) -> None:
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


def _stop_timing(timing: _Timed) -> None:
    global _TIMINGS
    with _timings_lock:
        _TIMINGS = tuple(t for t in _TIMINGS if t is not timing)
        if not _TIMINGS:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(_on_gc)
            _GC_SPANS.clear()


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
                if self.wake.acquire(timeout=max(timeout, _MIN_TICK)):
                    continue  # woken: stopping
                timings = _TIMINGS
                now = _clock()
                wanted = now + (min(t.tick for t in timings) if timings else _LINGER / 4)
                for timing in timings:
                    with contextlib.suppress(Exception):  # a look never ends it
                        wanted = min(wanted, timing.sample(now, sys._current_frames))
                timeout = wanted - _clock()
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
    global _sampler
    _sampler = _Sampler()  # the parent's sampler is not in the child


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


def _timed_run(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``Handle._run``, timed for the loops a watch follows (installed once, see _patches)."""

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
