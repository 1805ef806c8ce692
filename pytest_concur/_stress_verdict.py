"""One verdict from the outcomes of stress mode's copies (:func:`combine`).

``pytest.exit`` and ^C win; then a failure of any copy fails the item (a skip elsewhere
never hides it); only when no copy failed does a skip or an xfail decide. Identical
failures (same type, message and line, :func:`failure_key`) are shown once, with the
indexes of the copies that hit them; each different failure is shown once too, in a
section under the first (:func:`add_section`, called when the item's report is made).
:func:`_with_problem` joins a problem a check found about a copy to that copy's outcome.

The process backend calls :func:`combine` too, with keys and renderings of its children's
failures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Sequence

import pytest

from pytest_concur import _report

SECTION = "pytest-concur: copies"

_SECTION_TEXT = pytest.StashKey[str]()


def combine(
    item: pytest.Item,
    errors: Sequence[BaseException | None],
    *,
    key: Callable[[int], Hashable] | None = None,
    render: Callable[[int], str] | None = None,
) -> BaseException | None:
    """The exception the item ends with, given each copy's (``None`` for a pass).

    ``key(i)`` tells failures apart (default: type, message and the line it was raised
    at); ``render(i)`` is copy ``i``'s failure as text (default: pytest's rendering). The
    summary of all copies goes in a section of the report (see :func:`add_section`).
    """
    __tracebackhide__ = True  # the plugin's frames are not the user's
    count = len(errors)
    key = key or (lambda i: failure_key(errors[i]))
    render = render or (lambda i: _render(item, errors[i]))
    for error in errors:
        if isinstance(error, (pytest.exit.Exception, KeyboardInterrupt, SystemExit)):
            return error
    failed = [i for i, e in enumerate(errors) if e is not None and not _is_outcome(e)]
    outcomes = [i for i, e in enumerate(errors) if e is not None and _is_outcome(e)]
    passed = [i for i, e in enumerate(errors) if e is None]
    if not failed and not outcomes:
        return None
    lines: list[str] = []
    if failed:
        groups: dict[Hashable, list[int]] = {}
        for i in failed:
            groups.setdefault(key(i), []).append(i)
        first, *others = groups.values()
        lines.append(f"{_copies(first, count)} failed with the error above")
        for group in others:
            lines.append(f"{_copies(group, count)} failed with another error:")
            lines.extend("    " + line for line in render(group[0]).splitlines())
        primary: BaseException | None = errors[first[0]]
    else:
        primary = errors[outcomes[0]]
    kinds: dict[str, list[int]] = {}
    for i in outcomes:
        kinds.setdefault(_outcome_text(errors[i]), []).append(i)
    for text, group in kinds.items():
        lines.append(f"{_copies(group, count)} {text}")
    if passed:
        lines.append(f"{_copies(passed, count)} passed")
    assert primary is not None
    if not failed:
        # Skipped or xfailed: the reason says which copies (no section is shown for those).
        if len(kinds) > 1 or passed:
            reason = getattr(primary, "msg", None) or str(primary)
            primary.msg = f"{reason} ({'; '.join(lines)})"  # type: ignore[attr-defined]
        return primary
    item.stash[_SECTION_TEXT] = "\n".join(lines)
    return primary


def add_section(item: pytest.Item, report: pytest.TestReport) -> None:
    """Put the summary of the copies under the failure in ``report``, if there is one."""
    _report.add_stashed_section(item, _SECTION_TEXT, report, SECTION)


def failure_key(error: BaseException | None) -> Hashable:
    """What makes two failures the same: type, message, and the line that raised."""
    if error is None:
        return None
    tb = error.__traceback__
    site = ""
    while tb is not None:
        site = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return (type(error).__qualname__, str(error), site)


def _render(item: pytest.Item, error: BaseException | None) -> str:
    assert error is not None
    excinfo = pytest.ExceptionInfo.from_exception(error)
    try:
        return str(item.repr_failure(excinfo))
    except Exception:  # pragma: no cover - never lose a failure to its rendering
        return excinfo.exconly()


def _is_outcome(error: BaseException) -> bool:
    return isinstance(error, (pytest.skip.Exception, pytest.xfail.Exception))


def _outcome_text(error: BaseException | None) -> str:
    kind = "xfailed" if isinstance(error, pytest.xfail.Exception) else "skipped"
    return f"{kind}: {getattr(error, 'msg', None) or error}"


def _copies(indexes: Sequence[int], count: int) -> str:
    word = "copy" if len(indexes) == 1 else "copies"
    return f"{word} {', '.join(map(str, indexes))} of {count}"


def _with_problem(error: BaseException | None, text: str) -> BaseException:
    """A copy's outcome with a problem found about it: the failure, or a note on it."""
    if error is None:
        return pytest.fail.Exception(text, pytrace=False)
    if sys.version_info >= (3, 11):
        error.add_note(f"\npytest-concur also found:\n{text}")
        return error
    else:  # pragma: no cover - exercised by the py310 tox env
        failure = pytest.fail.Exception(f"{error!r}\n\npytest-concur also found:\n{text}")
        failure.__cause__ = error
        return failure
