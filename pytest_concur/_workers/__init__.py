"""Workers a test starts itself: the ``concur`` fixture, its ``Worker`` and ``expect_clean()``.

``concur.start(fn, *args, **kwargs)`` runs ``fn`` in a worker of the test's own backend
(see docs/workers.md). One module per concern:

- ``_concur``: :class:`Concur`, the fixture's object: starts workers of the test's backend
  and judges those nobody joined;
- ``_worker``: :class:`Worker`, the handle a test joins, whatever kind of worker it is;
- ``_run``: what every kind of run provides, and what the kinds share; ``_thread``,
  ``_task`` and ``_process``: how a thread, a task and a process worker run, are waited for
  and are stopped;
- ``_claims``: the threads, tasks and processes this package reports itself, which the leak
  checks leave alone;
- ``_clean``: :class:`CleanBlock`, the block of ``concur.expect_clean()``;
- ``_check``: the fixture's body, and :class:`WorkersCheck`, which judges a body's workers
  where the body runs.

Invariants: the state of a ``Concur`` and of each ``Worker`` is only touched under its own
lock, a real one (the deadlock check swaps ``threading.Lock`` during bodies, and our
bookkeeping must not be tracked); no user code runs while one is held.

This module only hands names on: those other modules import from ``pytest_concur._workers``.
"""

from __future__ import annotations

from pytest_concur._workers._check import WorkersCheck, fixture
from pytest_concur._workers._claims import claimed
from pytest_concur._workers._concur import Concur
from pytest_concur._workers._worker import Worker

__all__ = ["Concur", "Worker", "WorkersCheck", "claimed", "fixture"]
