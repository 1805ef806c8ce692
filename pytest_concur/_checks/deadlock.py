"""The deadlock check: tracked locks and waits around every body (see ``_locks``).

A deadlock found while the body runs fails it at once: the blocked threads raise
``DeadlockError`` with the diagnosis, the body's own thread among them. Lock-order
inversions (potential deadlocks) are reported when the body ends, as failures by default
(``concur_lock_order = warn`` or ``off`` to relax that).

A test that runs plainly (``--concur-check-all``) has its async code run on loops that
pytest-asyncio or anyio made: from ``begin`` to ``end`` those that run in its thread are
watched for task deadlocks as pytest-concur's own loops are (``_loop_deadlocks.ThreadLoops``).
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from types import CodeType
from typing import TYPE_CHECKING, final

import pytest

from pytest_concur import _channels, _locks
from pytest_concur._errors import PotentialDeadlockWarning
from pytest_concur._state import backend_of

if TYPE_CHECKING:
    from pytest_concur._loop_deadlocks import ThreadLoops

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
        # A test without a backend is watched only under --concur-check-all, around its
        # call in pytest's thread (see _checks.fixtures); its loops are other plugins'.
        plain = backend_of(item) is None
        return DeadlockWatch(
            threading.get_ident(), self.lock_order, plain, _body_code(item) if plain else None
        )


def _body_code(item: pytest.Item) -> CodeType | None:
    """The test function's code, past the wrappers its plugin puts around it (functools.wraps)."""
    function = getattr(item, "obj", None)
    if function is None:
        return None
    code = getattr(inspect.unwrap(function), "__code__", None)
    return code if isinstance(code, CodeType) else None


@final
class DeadlockWatch:
    def __init__(
        self,
        pytest_thread: int,
        lock_order: str,
        plain: bool = False,
        body_code: CodeType | None = None,
    ) -> None:
        self._pytest_thread = pytest_thread
        self._lock_order = lock_order
        # A plain test's watch is never pickled (it runs in pytest's process): the code
        # object stays here.
        self._plain = plain
        self._body_code = body_code
        self._tracking: _locks.tracking | None = None
        self._loops: ThreadLoops | None = None

    def begin(self) -> None:
        # Under the thread backend, pytest's own thread only waits for the body's thread.
        me = threading.get_ident()
        passive = frozenset() if me == self._pytest_thread else frozenset({self._pytest_thread})
        self._tracking = _locks.tracking(passive, _channels.patches())
        self._tracking.__enter__()
        if self._plain:
            from pytest_concur._loop_deadlocks import ThreadLoops

            self._loops = ThreadLoops(self._body_code)

    def end(self, failed: bool) -> str | None:
        loops, self._loops = self._loops, None
        if loops is not None:
            loops.close()
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
