"""What the test modules share to run pytest inside a test: one copy of each.

A test module imports these by name (``from _helpers import run_fresh``): pytest puts this
folder on ``sys.path`` for its ``conftest.py`` (rootdir-relative "prepend" imports, no
``__init__.py``). They take ``pytester`` as an argument, since it is a fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# The built-in backends, in the order the tests that hold for all of them run them.
BACKENDS = ("thread", "process", "asyncio")

# The outer limit on an inner run in a fresh interpreter: a regression that hangs the inner
# session fails its test here instead of hanging the suite.
TIMEOUT = 60

# A short leak grace period keeps the tests of what is left running fast; the tests of the
# grace period itself set their own.
FAST = "[pytest]\nconcur_leak_grace = 0.2\n"

# Inner runs whose output or outcomes depend on the order of the items keep the file's order
# even where pytest-randomly is installed.
NO_RANDOMLY = ("-p", "no:randomly")


def run_fresh(pytester: pytest.Pytester, *args: str, timeout: float = TIMEOUT) -> pytest.RunResult:
    """Run pytest in a fresh interpreter with a limit.

    For inner runs that fork, start children, leave threads behind, hang, or patch what
    this process must keep: none of it touches the outer session.
    """
    return pytester.runpytest_subprocess(*args, timeout=timeout)


def run_maybe_fresh(
    pytester: pytest.Pytester, fresh: bool, *args: str, timeout: float = TIMEOUT
) -> pytest.RunResult:
    """Run in a fresh interpreter when ``fresh`` says the run needs one, else inline
    (faster: no interpreter to start)."""
    if fresh:
        return run_fresh(pytester, *args, timeout=timeout)
    return pytester.runpytest(*args)


def runner(*first: str, timeout: float = TIMEOUT) -> Callable[..., pytest.RunResult]:
    """A module's ``run(pytester, *args)``: a fresh interpreter with the arguments ``first``
    (a module's safety net, e.g. ``--timeout=20``) before the test's own."""

    def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
        return run_fresh(pytester, *first, *args, timeout=timeout)

    return run


DOCS = Path(__file__).parent.parent / "docs"


def docs_example(page: str, after: str) -> str:
    """The first Python code block of ``docs/<page>`` after the line ``after``: tests run
    the documented examples themselves, so that the docs show what is tested."""
    text = (DOCS / page).read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```\n", start)]


def anyio_on_asyncio(pytester: pytest.Pytester) -> None:
    """Run the inner session's anyio tests on asyncio alone, as where trio is not installed
    (where it is, anyio parametrizes every test with it too), so that what a test counts is
    the same in every environment."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="module", params=["asyncio"])
        def anyio_backend(request):
            return request.param
        """
    )
