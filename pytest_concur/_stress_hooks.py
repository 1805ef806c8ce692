"""The copy hooks of stress mode: ``pytest_concur_copy_setup`` and ``_teardown`` around a copy.

:func:`with_copy_hooks` wraps one copy of a body (sync or async) so that, where the copy
runs (its thread, task or child), the setup hook runs first, then ``ready()`` (the wait for
the other copies, so that they are let go together however long their setups took), the
body, and the teardown hook, whatever the body's outcome. A hook that raises fails its copy
with a message that names the hook and where it raised (:func:`_hook_failure`); a skip or
an exit it asks for means what it means in a test. How the outcomes of the body and of the
teardown hook are ranked is :func:`_after_teardown`'s.

Looked up where the item's hooks can be (before the copies start); with no implementation
anywhere, the body itself comes back and a lone copy costs nothing.
"""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pluggy
import pytest

import pytest_concur
from pytest_concur._stress_verdict import _is_outcome, _with_problem

SETUP_HOOK = "pytest_concur_copy_setup"
TEARDOWN_HOOK = "pytest_concur_copy_teardown"

# Frames of these are left out of a failing copy hook's traceback: they are the machinery.
_MACHINERY = (
    os.path.join(os.path.dirname(pluggy.__file__), ""),
    os.path.join(os.path.dirname(pytest_concur.__file__), ""),
)


def with_copy_hooks(
    item: pytest.Item,
    index: int,
    count: int,
    function: Callable[..., Any],
    ready: Callable[[], object] | None = None,
) -> Callable[..., Any]:
    """``function`` as copy ``index`` of ``count``: setup hook, ``ready()``, body, teardown hook.

    ``ready`` waits for the other copies; it is called after the setup hook, so that the
    copies are let go together however long their setups took, and even when the setup
    hook failed (the others must not wait for this copy in vain). Resolve this where the
    item's hooks may be looked up (before the copies start); the wrapper may run anywhere.
    Without implementations of the hooks nor ``ready``, ``function`` itself comes back.
    """
    if not _has_copy_hooks(item.config.hook):
        # Nothing implements them anywhere: skip the item's own hook proxy, which pytest
        # builds from the conftest files of its path (the costly part of a lone copy).
        if ready is None:
            return function
        setup = teardown = None
    else:
        hooks: Any = item.ihook
        setup = hooks.pytest_concur_copy_setup
        teardown = hooks.pytest_concur_copy_teardown
        if not setup.get_hookimpls() and not teardown.get_hookimpls():
            if ready is None:
                return function
            setup = teardown = None

    def begin() -> BaseException | None:
        outcome = _call_hook(setup, SETUP_HOOK, item, index, count)
        if ready is not None:
            ready()
        return outcome

    def end(outcome: BaseException | None) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        problem = _call_hook(teardown, TEARDOWN_HOOK, item, index, count)
        if problem is not None:
            outcome = _after_teardown(outcome, problem)
        if outcome is not None:
            try:
                raise outcome
            finally:
                outcome = None  # no reference cycle through this frame

    if inspect.iscoroutinefunction(function):

        async def copy_async(**kwargs: Any) -> Any:
            __tracebackhide__ = True  # the plugin's frames are not the user's
            outcome = begin()
            result = None
            if outcome is None:
                try:
                    result = await function(**kwargs)
                except BaseException as exc:  # every outcome, for the teardown hook to see
                    outcome = exc
            end(outcome)
            return result

        return copy_async

    def copy(**kwargs: Any) -> Any:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        outcome = begin()
        result = None
        if outcome is None:
            try:
                result = function(**kwargs)
            except BaseException as exc:  # every outcome, for the teardown hook to see
                outcome = exc
        end(outcome)
        return result

    return copy


def _has_copy_hooks(hooks: Any) -> bool:
    """Whether the copy hooks have an implementation among ``hooks`` (a hook relay)."""
    return bool(
        hooks.pytest_concur_copy_setup.get_hookimpls()
        or hooks.pytest_concur_copy_teardown.get_hookimpls()
    )


def warn_hooks_not_called(item: pytest.Item, method: str) -> None:
    """Warn, if ``item`` has copy hooks, that a ``method`` child cannot call them."""
    if not _has_copy_hooks(item.ihook):
        return
    warning = pytest.PytestWarning(
        f"pytest-concur: {SETUP_HOOK} and {TEARDOWN_HOOK} are not called for tests under "
        f"the process backend started with {method}: the child has no pytest config nor "
        "plugins to call them. Use --concur-start-method=fork to have them called, or "
        "prepare each copy in the test itself (the worker_index fixture tells which copy "
        "it is)."
    )
    # Shown at the test, which is what it is about, rather than at our code.
    path, lineno, _ = item.reportinfo()
    warnings.warn_explicit(warning, type(warning), str(path), (lineno or 0) + 1)


def _call_hook(
    caller: Any, name: str, item: pytest.Item, index: int, count: int
) -> BaseException | None:
    """Call a copy hook; what the copy ends with if it raised (``None`` if it did not)."""
    if caller is None:
        return None
    try:
        caller(item=item, worker_index=index, worker_count=count)
    except (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception) as exc:
        return exc  # outcomes the hook asked for: they mean what they mean in a test
    except (KeyboardInterrupt, SystemExit) as exc:
        return exc
    except BaseException as exc:
        return _hook_failure(name, exc)
    return None


def _after_teardown(outcome: BaseException | None, problem: BaseException) -> BaseException:
    """What a copy ends with when its teardown hook raised ``problem`` after ``outcome``."""
    if outcome is None:
        return problem
    if isinstance(problem, pytest.fail.Exception):
        # A failure outranks the body's skip, and joins the body's own failure.
        return problem if _is_outcome(outcome) else _with_problem(outcome, str(problem))
    if _is_outcome(problem):
        return outcome  # a skip never hides what the body did
    return problem  # pytest.exit, ^C: they end the run, whatever the body did


def _hook_failure(name: str, error: BaseException) -> BaseException:
    """The failure of a copy whose hook raised ``error``: where, the hook's traceback, a fix."""
    from pytest_concur._stacks import short_path

    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(_MACHINERY)
    ]
    where = f" at {short_path(frames[0].filename)}:{frames[0].lineno}" if frames else ""
    consequence = (
        "so this copy's body did not run" if name == SETUP_HOOK else "after this copy's body"
    )
    lines = [f"pytest-concur: the {name} hook raised{where}, {consequence}:"]
    for frame in frames:
        lines.append(f"  {short_path(frame.filename)}:{frame.lineno} in {frame.name}")
        if frame.line:
            lines.append(f"    {frame.line}")
    lines.extend(
        "  " + line.rstrip() for line in traceback.format_exception_only(type(error), error)
    )
    lines.append(
        f"Fix that {name} implementation (a conftest.py or a plugin defines it): it is "
        "called for every copy of every test that runs under a backend, so return early "
        "where it does not apply."
    )
    return pytest.fail.Exception("\n".join(lines), pytrace=False)
