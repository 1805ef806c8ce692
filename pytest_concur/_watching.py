"""Running a body between its checks' watches: ``begin`` before it, ``end`` after it.

A leaf of the package: the contract (``_backends.base``), stress mode (``_stress``) and the
process backend's child (``_backends._child``) all run bodies this way, and import it
without importing one another.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_concur._backends.base import Watch


def run_watched(
    watches: Sequence[Watch],
    nodeid: str,
    function: Callable[..., Any],
    kwargs: Mapping[str, Any],
) -> None:
    """Run a sync body between its watches' ``begin`` and ``end``."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    for watch in watches:
        watch.begin()
    try:
        check_result(nodeid, function(**kwargs))
    except BaseException as exc:
        _report(watches, exc)
        raise
    _report(watches, None)


async def run_watched_async(
    watches: Sequence[Watch], function: Callable[..., Any], kwargs: Mapping[str, Any]
) -> None:
    """Await an async body between its watches' ``begin`` and ``end``."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._loop_deadlocks import note_body_task

    forget = note_body_task()
    for watch in watches:
        watch.begin()
    try:
        await function(**kwargs)
    except BaseException as exc:
        _report(watches, exc)
        raise
    finally:
        forget()
    _report(watches, None)


# The exception the body ended with, while its watches end (see body_error).
_BODY_ERROR: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar(
    "concur_body_error", default=None
)


def body_error() -> BaseException | None:
    """In a watch's ``end``: the exception the body raised, if it failed.

    For the built-in checks: what a deadlock or a hang left behind (the tasks it stuck)
    is in its report already, and is no separate leak.
    """
    return _BODY_ERROR.get()


def end_watches(watches: Sequence[Watch], exc: BaseException | None) -> list[str]:
    """End each watch, the last begun first: the problems they report."""
    problems = []
    token = _BODY_ERROR.set(exc)
    try:
        for watch in reversed(watches):
            try:
                problem = watch.end(exc is not None)
            except Exception as error:  # a broken check must not hide the body's outcome
                problem = f"check {type(watch).__qualname__} failed: {error!r}"
            if problem:
                problems.append(problem)
    finally:
        _BODY_ERROR.reset(token)
    return problems


def _report(watches: Sequence[Watch], exc: BaseException | None) -> None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    problems = end_watches(watches, exc)
    if not problems:
        return
    text = "\n\n".join(problems)
    if exc is None:
        pytest.fail(text, pytrace=False)
    if sys.version_info >= (3, 11):
        exc.add_note(f"\npytest-concur also found:\n{text}")
    else:  # pragma: no cover - exercised by the py310 tox env
        raise pytest.fail.Exception(f"{exc!r}\n\npytest-concur also found:\n{text}") from exc


def check_result(nodeid: str, result: object) -> None:
    """Warn as pytest does when a test body returns something other than ``None``."""
    if result is None:
        return
    if inspect.iscoroutine(result):
        result.close()  # never leave a coroutine unawaited behind us
    warnings.warn(
        pytest.PytestReturnNotNoneWarning(
            f"Test functions should return None, but {nodeid} returned {type(result)!r}.\n"
            "Did you mean to use `assert` instead of `return`?"
        ),
        stacklevel=3,
    )
