"""Reports of bodies that ran somewhere pytest cannot see the frames of.

A backend that runs the body elsewhere (another process) raises the body's exception here
and attaches pytest's rendering of the failure, made where the frames were. The plugin's
``pytest_runtest_makereport`` puts that rendering in the report of the call phase.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pytest

from pytest_concur import _lock_diagnosis
from pytest_concur._errors import DeadlockError, HangError

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


def add_section(report: pytest.TestReport, title: str, text: str) -> None:
    """Put ``text`` under the failure in ``report``, in a section named ``title``."""
    longrepr: Any = report.longrepr
    if hasattr(longrepr, "addsection"):
        longrepr.addsection(title, text)
    elif isinstance(longrepr, str):
        report.longrepr = f"{longrepr}\n\n{title}:\n{text}"


def add_stashed_section(
    item: pytest.Item, key: pytest.StashKey[str], report: pytest.TestReport, title: str
) -> None:
    """Take the text ``item`` keeps under ``key`` and put it under ``report``'s failure."""
    text = item.stash.get(key, None)
    if text is None:
        return
    del item.stash[key]
    if report.failed:
        add_section(report, title, text)


def end_at_the_wait(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """End the traceback of a DeadlockError or HangError at the user's waiting line.

    They are raised inside the wait (``Condition.wait``, ``Queue.get``, ``Future.result``
    ...): pytest would end the failure with the standard library's source, docstring and
    all, and name ``threading.py`` as its place. The frames of the waiting machinery
    after the user's last frame are dropped, for the error and for those it was raised
    while handling; the report names every waiter's stack.
    """
    seen: set[int] = set()
    exc: BaseException | None = excinfo.value
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (DeadlockError, HangError)):
            kept = _cut_after_the_user(exc.__traceback__)
            if exc is excinfo.value and kept is not None:
                excinfo.traceback = excinfo.traceback[:kept]
        exc = exc.__cause__ or exc.__context__


def _cut_after_the_user(tb: TracebackType | None) -> int | None:
    """Cut the chain after its last frame outside the machinery: how many are kept, or None.

    Cut in the chain itself: pytest rebuilds tracebacks from it when it cuts them to the
    test function. (``tb_next`` is writable since Python 3.7.)
    """
    raw: list[TracebackType] = []
    while tb is not None:
        raw.append(tb)
        tb = tb.tb_next
    end = len(raw)
    while end > 1 and _lock_diagnosis.is_machinery_file(raw[end - 1].tb_frame.f_code.co_filename):
        end -= 1
    if end == len(raw):
        return None
    raw[end - 1].tb_next = None
    return end
