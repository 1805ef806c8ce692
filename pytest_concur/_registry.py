"""The session's backends, gathered once from ``pytest_concur_add_backends``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, final

import pytest

if TYPE_CHECKING:
    from pytest_concur._backends.base import Backend, Check

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

REGISTRY = pytest.StashKey["BackendRegistry"]()
CHECKS = pytest.StashKey["tuple[Check, ...]"]()


@final
class BackendRegistry(Mapping[str, "Backend"]):
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
    from pytest_concur._backends.base import Backend  # the contract, for isinstance

    results = config.hook.pytest_concur_add_backends(config=config)
    backends = _gather(results, "backend", Backend, "start(item)", identifier=True)
    return BackendRegistry(backends)


def checks(config: pytest.Config) -> tuple[Check, ...]:
    """The session's checks, gathered at its start (``plugin.pytest_sessionstart``)."""
    found = config.stash.get(CHECKS, None)
    if found is None:
        found = config.stash[CHECKS] = collect_checks(config)
    return found


def collect_checks(config: pytest.Config) -> tuple[Check, ...]:
    """Ask every plugin for its checks and check them; raise a usage error on a bad one."""
    from pytest_concur._backends.base import Check

    results = config.hook.pytest_concur_add_checks(config=config)
    return tuple(_gather(results, "check", Check, "watch(item)", identifier=False).values())


def _gather(
    results: list[Sequence[Any] | None],
    kind: str,
    protocol: type,
    method: str,
    *,
    identifier: bool,
) -> dict[str, Any]:
    """The objects the hook's implementations returned, by name, checked.

    pluggy returns results newest plugin first and ``trylast`` ones last; reversed, the
    built-ins come first and third-party ones follow in the order they registered.
    """
    found: dict[str, Any] = {}
    for objects in reversed(results):
        for obj in objects or ():
            origin = type(obj).__module__
            name = getattr(obj, "name", None)
            if not isinstance(obj, protocol) or not isinstance(name, str):
                raise pytest.UsageError(
                    f"pytest-concur: pytest_concur_add_{kind}s returned {obj!r} (from "
                    f"{origin}), which is not a {kind}: it needs a str 'name', a str "
                    f"'description' and a '{method}' method (see pytest_concur."
                    f"{protocol.__name__})."
                )
            if identifier and not _NAME.match(name):
                raise pytest.UsageError(
                    f"pytest-concur: {origin} registers a {kind} named {name!r}; a {kind} "
                    "name must be a Python identifier (letters, digits and '_')."
                )
            if name in found:
                raise pytest.UsageError(
                    f"pytest-concur: {kind} {name!r} is registered twice, by "
                    f"{type(found[name]).__module__} and by {origin}; rename one of them."
                )
            found[name] = obj
    return found
