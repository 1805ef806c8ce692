"""What the three leak checks (threads, tasks, processes) share: the check and watch shells.

Each check records what the body starts while it runs (a ``Recording``: installed in
``begin``, removed by ``close``) and judges it when the body ends (``verdict``). The shells
here do the rest the same way for all three: the per-test allow-list, turning a check off,
and always closing the recording.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, final

import pytest

from pytest_concur._checks import _allow
from pytest_concur._state import LATER, UNWATCHED_MODULES


@final
@dataclasses.dataclass(frozen=True)
class Owner:
    """Whose leftovers a verdict reports, in the words of its messages.

    ``subject`` opens the headline ("the test left 1 thread running"), ``who`` and
    ``until`` finish the advice ("Await every task the test creates ... before the test
    returns"). Fixtures are judged with the same verdicts (see ``fixtures.py``).
    """

    subject: str = "the test"
    who: str = "the test"
    until: str = "before the test returns"


TEST = Owner()


def later_for(item: pytest.Item) -> list[Callable[[], str | None]] | None:
    """Where a body's leftovers wait for the item's teardown, or None to judge them now.

    A fixture torn down after the body (a cleanup fixture that stops every actor, a
    teardown that joins what the test started) may still stop what the body left running:
    those leftovers are judged once the whole teardown is over. A test whose fixtures have
    no teardown is judged right after its body, as its failure.
    """
    if not _has_teardown(item):
        return None
    later = item.stash.get(LATER, None)
    if later is None:
        later = item.stash[LATER] = []
    return later


def _has_teardown(item: pytest.Item) -> bool:
    info: Any = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name, fixturedefs in info.name2fixturedefs.items():
        for fixturedef in fixturedefs:
            function = inspect.unwrap(fixturedef.func)
            module = str(getattr(function, "__module__", None) or "")
            if module.startswith(UNWATCHED_MODULES):
                if name.startswith("_xunit_setup"):  # teardown_method() and its kin
                    return True
                continue
            code = getattr(function, "__code__", None)
            if (
                inspect.isgeneratorfunction(function)
                or inspect.isasyncgenfunction(function)
                or (code is not None and "addfinalizer" in code.co_names)
            ):
                return True
    return False


class Recording(Protocol):
    def close(self) -> None:
        """Undo what recording installed (wrappers, hooks); called once, always."""


class LeakWatch:
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def __init__(self, allow: _allow.Allow, grace: float, owner: Owner = TEST) -> None:
        self.allow = allow
        self.grace = grace
        self.owner = owner
        self._state: Recording | None = None

    def record(self) -> Recording:
        """Start recording what the body starts."""
        raise NotImplementedError

    def verdict(self, state: Recording) -> str | None:
        """A report of what was left behind or went wrong, or None; cleans up what it can."""
        raise NotImplementedError

    def begin(self) -> None:
        self._state = self.record()

    def end(self, failed: bool) -> str | None:
        state, self._state = self._state, None
        if state is None:
            return None
        try:
            return self.verdict(state)
        finally:
            state.close()


class LeakCheck:
    """A check that makes one ``watch_type`` watch per body, unless the test turned it off."""

    name: str
    description: str
    watch_type: ClassVar[type[LeakWatch]]

    def __init__(self, config: pytest.Config) -> None:
        self._grace = _allow.grace(config)

    def watch(self, item: pytest.Item) -> LeakWatch | None:
        allow = _allow.for_item(item)
        if self.name in allow.checks_off:
            return None
        return self.watch_type(allow, self._grace)
