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
