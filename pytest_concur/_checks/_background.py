"""What the background-error checks (``futures``, ``callbacks``) share: the check and watch.

Each records, from ``begin`` to ``end``, the errors that nobody saw (a ``Recording``) and
reports those that no ``started_by`` pattern allows, each with the site it was made or
scheduled at. They clean up nothing: what they record is already over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import pytest

from pytest_concur._checks import _allow
from pytest_concur._checks._where import Site


class Error(Protocol):
    @property
    def site(self) -> Site:
        """Where the thing that failed was made or scheduled."""


class Recording(Protocol):
    def close(self) -> Sequence[Any]:
        """Stop recording (called once, always); the errors nobody saw, oldest first."""


class BackgroundWatch:
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    def __init__(self, started_by: tuple[str, ...]) -> None:
        self.started_by = started_by
        self._recording: Recording | None = None

    def record(self) -> Recording:
        raise NotImplementedError

    def report(self, errors: Sequence[Any]) -> str:
        raise NotImplementedError

    def begin(self) -> None:
        self._recording = self.record()

    def end(self, failed: bool) -> str | None:
        recording, self._recording = self._recording, None
        if recording is None:
            return None
        allow = _allow.Allow(started_by=self.started_by)
        errors = [e for e in recording.close() if not allow.allows("started_by", (), e.site)]
        return self.report(errors) if errors else None


class BackgroundCheck:
    """A check that makes one ``watch_type`` watch per body, unless the test turned it off."""

    name: str
    description: str
    watch_type: ClassVar[type[BackgroundWatch]]

    def watch(self, item: pytest.Item) -> BackgroundWatch | None:
        allow = _allow.for_item(item)
        if self.name in allow.checks_off:
            return None
        return self.watch_type(allow.started_by)
