"""The built-in checks, contributed through the same hook as third-party ones."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pytest_concur._backends.base import Check


@pytest.hookimpl(trylast=True)
def pytest_concur_add_checks(config: pytest.Config) -> Sequence[Check]:
    from pytest_concur._checks import _allow, _where
    from pytest_concur._checks.blocked_loop import BlockedLoopCheck
    from pytest_concur._checks.callbacks import CallbacksCheck
    from pytest_concur._checks.deadlock import DeadlockCheck
    from pytest_concur._checks.futures import FuturesCheck
    from pytest_concur._checks.processes import ProcessesCheck
    from pytest_concur._checks.tasks import TasksCheck
    from pytest_concur._checks.threads import ThreadsCheck
    from pytest_concur._workers._check import WorkersCheck

    _allow.from_ini(config)  # a bad ini key is a usage error now, not in the first test
    _where.set_test_files(config.getini("python_files"))  # the reports' test lines
    # Watches begin in this order and end in the reverse one. The deadlock check goes first:
    # its Thread.start stands in for the real one, so the leak checks' wrappers go on top of
    # it, and it unblocks deadlocked threads before the leak checks look for leftovers.
    return [
        DeadlockCheck(config),
        ThreadsCheck(config),
        TasksCheck(config),
        ProcessesCheck(config),
        # After the leak checks, so it ends before them: the workers of the concur fixture
        # are judged (and stopped) by it, and the leak checks leave them alone.
        WorkersCheck(),
        # Background errors: they only look at what the body made, and clean up nothing.
        FuturesCheck(),
        CallbacksCheck(),
        # Last, so it begins closest to the body: the others' setup is not timed as its step.
        BlockedLoopCheck(config),
    ]
