"""The ``concur`` fixture's body, and the check that judges a body's workers where it runs.

Where the workers nobody joined, or whose exception nobody retrieved, are judged (see
``_concur``):

- workers started by the body of a test that runs under a backend are judged where the
  body runs, right after it, by a check's watch (``WorkersCheck``): under the ``process``
  backend the body, and its workers, live in a child that pytest's fixture teardown never
  sees. The watch ends before the leak checks' (it is registered after them), so the test
  fails once, with the fixture's words;
- workers started anywhere else (plain tests, fixtures that use ``concur``) are judged at
  the fixture's teardown, which fails with an error at teardown.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import final

import pytest

from pytest_concur._checks import _allow
from pytest_concur._workers._concur import Concur

FIXTURE = "concur"


def fixture(request: pytest.FixtureRequest) -> Generator[Concur, None, None]:
    """The ``concur`` fixture's body (declared in ``plugin.py``)."""
    from pytest_concur._state import backend_of

    item = request.node
    backend = backend_of(item) if isinstance(item, pytest.Item) else None
    start_method = None
    if backend == "process":
        from pytest_concur._backends.process import start_method as configured

        start_method = configured(request.config)
    allow = (
        _allow.for_item(item) if isinstance(item, pytest.Item) else _allow.from_ini(request.config)
    )
    concur = Concur(backend, start_method, _allow.grace(request.config), allow)
    yield concur
    problem = concur.close()
    if problem:
        pytest.fail(problem, pytrace=False)


@final
class WorkersCheck:
    """Judges the workers a body started with the ``concur`` fixture, where the body runs."""

    name = "concur"
    description = (
        "workers started with the concur fixture are joined, and their exceptions seen, "
        "when the body ends"
    )

    def watch(self, item: pytest.Item) -> BodyWatch | None:
        concur = getattr(item, "funcargs", {}).get(FIXTURE)
        return BodyWatch(concur) if isinstance(concur, Concur) else None


@final
class BodyWatch:
    """One body's watch: pickles with the test's arguments, so it holds the same ``Concur``."""

    def __init__(self, concur: Concur) -> None:
        self._concur = concur

    def begin(self) -> None:
        self._concur.begin_body()

    def end(self, failed: bool) -> str | None:
        return self._concur.end_body()
