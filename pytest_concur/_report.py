"""Reports of bodies that ran somewhere pytest cannot see the frames of.

A backend that runs the body elsewhere (another process) raises the body's exception here
and attaches pytest's rendering of the failure, made where the frames were. The plugin's
``pytest_runtest_makereport`` puts that rendering in the report of the call phase.
"""

from __future__ import annotations

from typing import Any

import pytest

_LONGREPR = pytest.StashKey[tuple[BaseException, Any]]()


def attach_longrepr(item: pytest.Item, exc: BaseException, longrepr: Any) -> None:
    """Use ``longrepr`` in the report of ``item``'s call phase if it fails with ``exc``."""
    item.stash[_LONGREPR] = (exc, longrepr)


def apply_longrepr(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport
) -> None:
    """Swap in the attached rendering, if any, for the one made from the stand-in exception."""
    attached = item.stash.get(_LONGREPR, None)
    if attached is None or call.excinfo is None:
        return
    del item.stash[_LONGREPR]
    exc, longrepr = attached
    if call.excinfo.value is not exc or longrepr is None:
        return
    if report.failed or (report.skipped and not hasattr(report, "wasxfail")):
        report.longrepr = longrepr
