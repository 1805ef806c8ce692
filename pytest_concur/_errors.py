"""Every exception and warning pytest-concur raises at a user, in one leaf module.

A leaf: it imports nothing of the package, so any module may raise these without pulling
in the machinery that usually raises them (a deadlock report, a worker's join). The public
ones are handed on by ``pytest_concur`` itself, and say so in their ``__module__``: that is
the name reports print and pickles use (a child process sends them back to the parent).
"""

from __future__ import annotations


class DeadlockError(RuntimeError):
    """Raised in every blocked thread of a test that can provably make no more progress."""


class HangError(RuntimeError):
    """Raised in a hung test's threads when pytest-concur gives up on it at its deadline."""


class PotentialDeadlockWarning(UserWarning):
    """Locks were taken in both orders (``concur_lock_order = warn``)."""


class WorkerTimeoutError(TimeoutError):
    """A worker did not finish within the timeout given to ``join``, ``result`` and the like.

    The worker is still running; waiting again, or cancelling it, is up to the test.
    """


class WorkerProcessTraceback(Exception):
    """The traceback of an exception raised in a worker process, as the worker formatted it.

    Set as the ``__cause__`` of the exception re-raised in the test: tracebacks do not
    cross processes, their text does.
    """

    def __str__(self) -> str:
        return str(self.args[0]).rstrip() if self.args else ""


for _public in (
    DeadlockError,
    HangError,
    PotentialDeadlockWarning,
    WorkerTimeoutError,
    WorkerProcessTraceback,
):
    _public.__module__ = "pytest_concur"
del _public
