"""The deadlock check: tracked locks and waits around every body (see ``_locks``).

A deadlock found while the body runs fails it at once: the blocked threads raise
``DeadlockError`` with the diagnosis, the body's own thread among them. Lock-order
inversions (potential deadlocks) are reported when the body ends, as failures by default
(``concur_lock_order = warn`` or ``off`` to relax that).
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import final

import pytest

from pytest_concur import _channels, _locks
from pytest_concur._errors import PotentialDeadlockWarning

LOCK_ORDER_INI = "concur_lock_order"
LOCK_ORDER_CHOICES = ("fail", "warn", "off")


@final
class DeadlockCheck:
    name = "deadlock"
    description = "fail at once on a deadlock; report locks taken in both orders"

    def __init__(self, config: pytest.Config) -> None:
        lock_order = str(config.getini(LOCK_ORDER_INI) or "fail")
        if lock_order not in LOCK_ORDER_CHOICES:
            raise pytest.UsageError(
                f"{LOCK_ORDER_INI} = {lock_order!r} is not one of: {', '.join(LOCK_ORDER_CHOICES)}."
            )
        self.lock_order = lock_order

    def watch(self, item: pytest.Item) -> DeadlockWatch:
        return DeadlockWatch(threading.get_ident(), self.lock_order)


@final
class DeadlockWatch:
    def __init__(self, pytest_thread: int, lock_order: str) -> None:
        self._pytest_thread = pytest_thread
        self._lock_order = lock_order
        self._tracking: _locks.tracking | None = None

    def begin(self) -> None:
        # Under the thread backend, pytest's own thread only waits for the body's thread.
        me = threading.get_ident()
        passive = frozenset() if me == self._pytest_thread else frozenset({self._pytest_thread})
        self._tracking = _locks.tracking(passive, _channels.patches())
        self._tracking.__enter__()

    def end(self, failed: bool) -> str | None:
        tracking, self._tracking = self._tracking, None
        if tracking is None or tracking.tracker is None:
            return None
        tracker = tracking.tracker
        try:
            if tracker.verdict is not None:
                # The threads we unblocked are unwinding with DeadlockError; let them finish
                # while our tracking still stands, so they release what they hold (one
                # second for all of them: some may be busy elsewhere, in time.sleep say).
                deadline = time.monotonic() + 1.0
                for thread in tracker.started:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if thread.is_alive() and thread is not threading.current_thread():
                        _locks._real_join(thread, remaining)
        finally:
            tracking.__exit__(None, None, None)
        if tracker.graph is not None:
            _locks.note_graphs([tracker.graph])
        if self._lock_order == "fail":
            _locks.note_graphs(tracker.inversion_graphs)
        if tracker.verdict is not None and not failed:
            return tracker.verdict  # the body swallowed the DeadlockError
        inversions = tracker.report_inversions()
        if inversions is None or self._lock_order == "off":
            return None
        if self._lock_order == "warn":
            warnings.warn(PotentialDeadlockWarning(inversions), stacklevel=1)
            return None
        return inversions
