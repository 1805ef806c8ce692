"""The hooks pytest-concur adds to pytest.

They are registered from :func:`pytest_concur.plugin.pytest_addhooks`, so any installed
plugin or ``conftest.py`` can implement them like any other pytest hook. The built-in
backends are contributed through :func:`pytest_concur_add_backends` themselves, with
``trylast=True``, so they go through exactly the path a third-party backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import pytest

    from pytest_concur._backends.base import Backend, Check

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_concur_add_backends(config: pytest.Config) -> Sequence[Backend] | None:
    """Return the backends this plugin contributes.

    Called once per session, from ``pytest_sessionstart``, so implement it in an installed
    plugin, in a plugin registered during ``pytest_configure``, or in a ``conftest.py`` that
    pytest loads before the session starts (one in the rootdir or next to the test paths
    given on the command line).

    Each backend must satisfy :class:`pytest_concur.Backend`. Names must be unique across all
    implementations: a second backend with a name already taken is a usage error naming both
    plugins.

    :param config: The pytest config object.
    :returns: A sequence of backends, or ``None`` when this plugin adds none.
    """


@hookspec
def pytest_concur_add_checks(config: pytest.Config) -> Sequence[Check] | None:
    """Return the checks this plugin contributes.

    Called once per session, from ``pytest_sessionstart``, like
    :func:`pytest_concur_add_backends`. Every check watches every body that runs under a
    backend (see :class:`pytest_concur.Check`); the built-in checks (deadlock detection,
    leaks, background errors) come through this hook too, with ``trylast=True``.

    :param config: The pytest config object.
    :returns: A sequence of checks, or ``None`` when this plugin adds none.
    """


@hookspec
def pytest_concur_copy_setup(item: pytest.Item, worker_index: int, worker_count: int) -> None:
    """Prepare one copy of ``item``'s body, where that copy runs, right before it.

    Called once per copy of every body that runs under a backend: ``worker_count`` times
    in stress mode (``workers=N``), each time with that copy's ``worker_index``, and once,
    with index 0 and count 1, for a body that runs as a single copy. It runs in the copy's
    own thread (``thread``), in its own task (``asyncio``, and async bodies under
    ``thread``) or in its own child process (``process``), after the checks began to
    watch, and before the copies are let go together; so a thread-local, a context
    variable, a random seed or an environment variable set here is the copy's own.

    It is not called for tests that run plainly (without a backend), nor in a ``process``
    child started with ``spawn`` or ``forkserver``: such a child has no pytest config and
    no plugins. An item that has implementations and runs there gets a ``PytestWarning``
    saying so.

    Every implementation is called, as for ``pytest_runtest_setup``; ``conftest.py``
    implementations apply to the items of their directory. An exception fails that copy,
    with the hook's traceback in the message, and its body does not run;
    ``pytest.skip()`` skips the copy.

    :param item: The test item whose body is about to run.
    :param worker_index: Which copy this is, from 0.
    :param worker_count: How many copies of the body run at once.
    """


@hookspec
def pytest_concur_copy_teardown(item: pytest.Item, worker_index: int, worker_count: int) -> None:
    """Undo :func:`pytest_concur_copy_setup` for one copy, where it ran, right after the body.

    Called for each copy whose setup hook was called, whatever the body's outcome (and even
    when the setup hook failed: undo only what is there), in the same thread, task or
    child, before the checks end their watch. An exception fails a copy that passed or
    skipped; for a copy that failed, it is added to the failure.

    :param item: The test item whose body just ran.
    :param worker_index: Which copy this is, from 0.
    :param worker_count: How many copies of the body ran at once.
    """
