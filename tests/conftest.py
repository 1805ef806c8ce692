from __future__ import annotations

# Imported here, in the outer process, so that pytester's inline runs (which drop the
# modules they imported when they end) never unload and re-import them: re-importing the
# single-phase C extension behind multiprocessing.synchronize on 3.10 left it with a
# garbage SEM_VALUE_MAX once, in CI. And the checks hook classes of these modules once
# (pytest_concur/_patches.py): a module imported afresh by a later inline run would have a
# class of its own, while concurrent.futures keeps handing out the first one.
import asyncio.base_events  # noqa: F401
import concurrent.futures.process
import concurrent.futures.thread  # noqa: F401
import importlib
import multiprocessing.pool
import multiprocessing.synchronize  # noqa: F401
import pkgutil
import subprocess  # noqa: F401
from collections.abc import Callable

import pytest
from _helpers import BACKENDS

import pytest_concur

# The same holds for pytest-concur's own modules, which the plugin imports only once a
# session needs them: one first imported by an inline run would be dropped when the run
# ends while its package keeps the attribute, and the next run would mix two copies of it
# (pickle then refuses the process backend's outcome: "not the same object").
for _module in pkgutil.walk_packages(pytest_concur.__path__, "pytest_concur."):
    importlib.import_module(_module.name)

pytest_plugins = ["pytester"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each built-in backend in turn, for tests that hold for all of them."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _isolate_inner_runs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep pytest-asyncio out of pytester's inner runs unless a test asks for it.

    It is installed for the interplay tests, and in every other inner run it would only
    add its configuration nag.
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS when it starts
        monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:asyncio -W default")
        # Under CI, pytest neither truncates summary lines nor assertion diffs; inner runs
        # should print what a developer's terminal shows, wherever this suite runs.
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("BUILD_NUMBER", raising=False)


def _outcomes_of(reprec: pytest.HookRecorder) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for report in reprec.getreports("pytest_runtest_logreport"):
        assert isinstance(report, pytest.TestReport)
        if report.when != "call" and report.failed:
            outcomes[report.nodeid] = "error"
        elif report.when == "call" or (report.when == "setup" and report.skipped):
            xfail = hasattr(report, "wasxfail")
            outcome = {"passed": "xpassed", "skipped": "xfailed"} if xfail else {}
            outcomes.setdefault(report.nodeid, outcome.get(report.outcome, report.outcome))
    return outcomes


@pytest.fixture
def outcomes_of() -> Callable[[pytest.HookRecorder], dict[str, str]]:
    """Each item's outcome in an inline run, by node id: passed, failed, skipped, xfailed,
    xpassed or error (a failed setup or teardown), to compare two runs item by item."""
    return _outcomes_of
