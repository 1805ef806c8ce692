"""The session's backends, gathered once from ``pytest_concur_add_backends``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import final

import pytest

from pytest_concur._backends.base import Backend, Check

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

REGISTRY = pytest.StashKey["BackendRegistry"]()
CHECKS = pytest.StashKey["tuple[Check, ...]"]()


@final
class BackendRegistry(Mapping[str, Backend]):
    """The backends known to this session, by name, in registration order."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = dict(backends)

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    def describe(self) -> str:
        """The names, sorted, for error messages."""
        return ", ".join(sorted(self._backends)) or "(none registered)"


def collect(config: pytest.Config) -> BackendRegistry:
    """Ask every plugin for its backends and check them; raise a usage error on a bad one."""
    found: dict[str, Backend] = {}
    # pluggy returns results newest plugin first and ``trylast`` ones last; reversed, the
    # built-ins come first and third-party backends follow in the order they registered.
    for backends in reversed(config.hook.pytest_concur_add_backends(config=config)):
        for backend in backends or ():
            origin = type(backend).__module__
            name = getattr(backend, "name", None)
            if not isinstance(backend, Backend) or not isinstance(name, str):
                raise pytest.UsageError(
                    f"pytest-concur: pytest_concur_add_backends returned {backend!r} "
                    f"(from {origin}), which is not a backend: it needs a str 'name', a str "
                    "'description' and a 'start(item)' method (see pytest_concur.Backend)."
                )
            if not _NAME.match(name):
                raise pytest.UsageError(
                    f"pytest-concur: {origin} registers a backend named {name!r}; a backend "
                    "name must be a Python identifier (letters, digits and '_')."
                )
            if name in found:
                raise pytest.UsageError(
                    f"pytest-concur: backend {name!r} is registered twice, by "
                    f"{type(found[name]).__module__} and by {origin}; rename one of them."
                )
            found[name] = backend
    return BackendRegistry(found)


def collect_checks(config: pytest.Config) -> tuple[Check, ...]:
    """Ask every plugin for its checks and check them; raise a usage error on a bad one."""
    found: dict[str, Check] = {}
    for checks in reversed(config.hook.pytest_concur_add_checks(config=config)):
        for check in checks or ():
            origin = type(check).__module__
            name = getattr(check, "name", None)
            if not isinstance(check, Check) or not isinstance(name, str):
                raise pytest.UsageError(
                    f"pytest-concur: pytest_concur_add_checks returned {check!r} (from "
                    f"{origin}), which is not a check: it needs a str 'name', a str "
                    "'description' and a 'watch(item)' method (see pytest_concur.Check)."
                )
            if name in found:
                raise pytest.UsageError(
                    f"pytest-concur: check {name!r} is registered twice, by "
                    f"{type(found[name]).__module__} and by {origin}; rename one of them."
                )
            found[name] = check
    return tuple(found.values())
