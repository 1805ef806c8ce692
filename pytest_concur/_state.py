"""Stash keys shared by the plugin's modules, and the one question they all ask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable  # noqa: F401 (in LATER's quoted type)

# The item whose protocol is running, for hooks that only get a request or a fixturedef.
CURRENT_ITEM = pytest.StashKey["pytest.Item | None"]()
# Items that run under a backend, stashed with their backend's name at setup.
BACKEND_NAME = pytest.StashKey[str]()
# The runner of the item's backend, from the backend's start to the end of its teardown.
RUNNER = pytest.StashKey[Any]()
# Verdicts on what a body left running, put off until the item's teardown is over (see
# ``_checks._leak.later_for``): run, in order, once every fixture torn down with the item
# is finalized.
LATER = pytest.StashKey["list[Callable[[], str | None]]"]()
# Modules whose fixtures the leak checks never judge: pytest's own and ours.
UNWATCHED_MODULES = ("_pytest.", "pytest_concur.")
# The parameter that carries the backend's name (also a fixture a test may ask for).
FIXTURE = "concur_backend"

# How many test protocols this process has begun (pytester's inner runs included): what
# tells "an earlier test" from this one, for threads that outlive the test that made them.
# Only the main thread counts up; a reader in another thread sees one value or the next.
_items_begun = 0


def item_began() -> None:
    global _items_begun
    _items_begun += 1


def items_begun() -> int:
    return _items_begun


def backend_of(item: pytest.Item) -> str | None:
    """The backend ``item`` runs under, or ``None`` when it runs plainly (from its setup on)."""
    return item.stash.get(BACKEND_NAME, None)


def parametrized_backend(item: pytest.Item) -> str | None:
    """The backend ``item`` was parametrized with at collection, or ``None``.

    The same answer as :func:`backend_of`, before the item's setup has stashed it (after
    collection, in a deadline set by another plugin before setup).
    """
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    name = callspec.params.get(FIXTURE)
    return name if isinstance(name, str) else None
