"""What one step of an event loop cost, for the ``blocked_loop`` check.

A step's wall time is not all its own: its thread may have waited for a CPU (a busy
machine), and a garbage collection that lands in it pauses whatever runs. The check charges
a step its wall time less both, where the platform says:

- the waits for a CPU come from Linux's scheduler statistics of the thread
  (``/proc/thread-self/schedstat``), kept open per thread and read with one ``pread``
  before every step of a followed loop (parsed only for a step over the threshold);
- the collections come from ``gc.callbacks`` (:func:`_on_gc`, installed by the sampler's
  module while a watch follows a loop): the last spans of each thread are kept.

Invariant: nothing here takes a lock; each thread reads only its own statistics file, and
a forked child opens its own (the parent's files are its threads').
"""

from __future__ import annotations

import _thread
import collections
import os
import threading
import time

# The clock every part of the check uses: steps, samples and collections on one scale.
_clock = time.perf_counter
_get_ident = _thread.get_ident
# Linux's scheduler statistics of the calling thread: nanoseconds on a CPU, nanoseconds
# waiting for one (runnable, not running), timeslices (Documentation/scheduler/sched-stats).
_SCHEDSTAT = "/proc/thread-self/schedstat"


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
        return "wall time less the time its thread waited for a CPU or collected garbage"
    return "wall time less garbage collection: this platform tells no thread's wait for a CPU"


def _after_fork_in_child() -> None:
    global _sched_local
    _sched_local = threading.local()  # its files are the parent's threads'


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
