"""A body as a job for another interpreter, and its outcome back: the parent's side.

The ``process`` backend is built from these pieces, and a third-party backend that runs
bodies somewhere else (a fresh ``python``, a subinterpreter, another machine) uses the same
ones through the public API:

1. :func:`pack_jobs` turns a :class:`~pytest_concur.BodyCall` into one picklable job per
   copy of the body (bytes): the test function by reference, its fixture values and
   parameters, the checks' watches, how pytest renders failures here, and what a fresh
   interpreter needs to import the test and conftest modules the way pytest did. A value
   that does not pickle fails the test with a message that names it and the fix.
2. :func:`pytest_concur.run_job` (in ``_child``, the other side's module) runs one job
   where it is called, inside the checks' watches, and returns its outcome as bytes.
3. :func:`raise_outcomes` turns the copies' outcomes into the item's verdict here: a pass
   returns; a failure, skip or xfail is raised as the body raised it, with pytest's
   rendering of the failure made on the other side, where the frames were.

Invariant: the job's wire format and the outcome's are ``_child``'s :class:`Job` and
:class:`Outcome`, whichever side packs and runs them, so there is one implementation of
each step, and the ``process`` backend proves the public one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_concur._backends.base import BodyCall

if TYPE_CHECKING:
    from pytest_concur._backends import _child


class ChildFailure(Exception):
    """Stands in for an exception raised in the child that could not be sent back as is."""


# -- packing ---------------------------------------------------------------------------


def pack_jobs(call: BodyCall, *, where: str = "the other interpreter") -> list[bytes]:
    """One picklable job per copy of ``call``'s body, for :func:`pytest_concur.run_job`.

    There are ``call.workers`` of them (one for a body that runs as a single copy); each
    carries its copy's own ``worker_index`` and ``tmp_path``. Run them all, at once for
    stress mode to mean anything, and hand their outcomes, in the same order, to
    :func:`raise_outcomes`. A job may run in any interpreter of the same Python with the
    same packages installed: it makes the test and conftest modules that pytest imported
    here importable there, asserts rewritten as here. The ``pytest_concur_copy_setup`` and
    ``_teardown`` hooks are not called there (it has no pytest config nor plugins).

    ``where`` names the destination in the error for a value that cannot be pickled
    (``"a subinterpreter"``): that error fails the test, naming the fixture or parameter
    and the fix.
    """
    from pytest_concur import _stress
    from pytest_concur._backends import _child

    config = call.item.config
    job = new_job(call)
    job.warning_filters = picklable_filters()
    boot = _child.Bootstrap(
        sys_path=list(sys.path),
        cwd=os.getcwd(),
        modules=pytest_imported_modules(config),
        stdout_path=None,
        stderr_path=None,
    )
    packed = []
    for copy in copies(job, call.workers, _stress.copies_kwargs):
        data = pickle_job(copy, call, where=where)
        packed.append(pickle.dumps((_child.JOB_TAG, boot, data)))
    return packed


def new_job(call: BodyCall) -> _child.Job:
    """The job for ``call``'s body, as a single copy, rendering failures as pytest here does."""
    from pytest_concur._backends import _child

    item = call.item
    config = item.config
    return _child.Job(
        function=call.function,
        kwargs=dict(call.kwargs),
        nodeid=item.nodeid,
        tbstyle=str(config.getoption("tbstyle", "auto")),
        showlocals=bool(config.getoption("showlocals", False)),
        fulltrace=bool(config.getoption("fulltrace", False)),
        verbosity=config.get_verbosity(),
        watches=list(call.watches),
        uses_recwarn="recwarn" in getattr(item, "fixturenames", ()),
    )


def copies(
    job: _child.Job, count: int, copies_kwargs: Callable[[Any, int], list[dict[str, Any]]]
) -> list[_child.Job]:
    """``count`` copies of ``job``, each with its own index, ``worker_index`` and ``tmp_path``.

    The copies' directories are made here, before any copy starts (see _stress).
    """
    arguments = copies_kwargs(job.kwargs, count)
    return [
        dataclasses.replace(job, kwargs=arguments[index], copy_index=(index, count))
        for index in range(count)
    ]


def pickle_job(
    job: _child.Job,
    call: BodyCall,
    *,
    where: str,
    fix: str = "",
    function_fix: str = "The other side imports the test by module and name, so it must be "
    "defined at module or class level: move the test function to module level.",
) -> bytes:
    """Pickle ``job`` for a fresh interpreter, failing the test on the first value that cannot go.

    ``where`` says where it was going; ``fix`` is a way out of an unpicklable value besides
    making it picklable and other backends (ending in ``", or "``); ``function_fix`` is
    what to do about a test function that does not pickle.
    """
    params = getattr(getattr(call.item, "callspec", None), "params", {})
    for name, value in job.kwargs.items():
        problem = _pickle_problem(value)
        if problem is None:
            continue
        # A direct parameter is the value itself; an indirect one went through a fixture.
        kind = "parameter" if name in params and params[name] is value else "fixture"
        pytest.fail(
            f"{kind} {name!r} of {call.item.nodeid} cannot be sent to {where}: pickling "
            f"{_short_repr(value)} failed with {problem}.\n"
            f"Fix: make the {kind} value picklable, {fix or 'or '}run this test under other "
            'backends, e.g. @pytest.mark.backend("thread", "asyncio").',
            pytrace=False,
        )
    try:
        return pickle.dumps(job)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    pytest.fail(
        f"the test function of {call.item.nodeid} cannot be sent to {where}: {problem}.\n"
        f"{function_fix}",
        pytrace=False,
    )


def _pickle_problem(value: object) -> str | None:
    try:
        pickle.dumps(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def picklable_filters() -> list[Any]:
    """This process's warning filters that can be sent along (a fresh interpreter has none)."""
    kept = []
    for entry in warnings.filters:
        try:
            pickle.dumps(entry)
        except Exception:
            continue
        kept.append(entry)
    return kept


def pytest_imported_modules(config: pytest.Config) -> dict[str, tuple[str, bool]]:
    """Test and conftest modules the child must load by path, asserts rewritten as here."""
    root = str(config.rootpath)
    found: dict[str, tuple[str, bool]] = {}
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if not filename or not filename.endswith(".py"):
            continue
        loader = getattr(getattr(module, "__spec__", None), "loader", None)
        rewritten = type(loader).__name__ == "AssertionRewritingHook"
        if rewritten or (filename.startswith(root) and "site-packages" not in filename):
            found[name] = (filename, rewritten)
    return found


# -- the outcomes back -----------------------------------------------------------------


def raise_outcomes(call: BodyCall, outcomes: Sequence[bytes | None]) -> None:
    """The verdict on ``call``'s body from its copies' outcomes, as :func:`run_job` made them.

    Give one outcome per job of :func:`pack_jobs`, in the same order, ``None`` for a copy
    that ended without one (its interpreter crashed or was killed). What the copies printed
    under ``--capture=sys`` and the warnings they raised are replayed here first. Then it
    returns if the body passed, and otherwise raises as the body did: ``pytest.skip``,
    ``pytest.xfail`` and ``pytest.fail`` anew, any other exception as itself when it
    pickled (a stand-in with its type and message when not), each with the traceback
    pytest rendered on the other side. In stress mode the copies' outcomes are combined
    into one, as for the built-in backends.
    """
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._backends import _child

    if len(outcomes) != call.workers:
        raise ValueError(
            f"raise_outcomes got {len(outcomes)} outcomes for the {call.workers} jobs of "
            f"{call.item.nodeid}: give one per job of pack_jobs, None for one that ended "
            "without an outcome."
        )
    loaded: list[_child.Outcome | None] = []
    for data in outcomes:
        outcome = None if data is None else pickle.loads(data)
        if outcome is not None and not isinstance(outcome, _child.Outcome):
            raise TypeError(f"raise_outcomes got {type(outcome).__name__}, not run_job's outcome")
        loaded.append(outcome)
    nodeid = call.item.nodeid

    def lost(index: int) -> str:
        which = f"copy {index} of {len(outcomes)} of " if len(outcomes) > 1 else ""
        return (
            f"{which}{nodeid} ended before it reported an outcome: its interpreter crashed "
            "or was stopped."
        )

    verdict(call.item, loaded, lost=lost, lost_key=lambda index: ("crash", "", ""))


def verdict(
    item: pytest.Item,
    outcomes: Sequence[_child.Outcome | None],
    *,
    lost: Callable[[int], str],
    lost_key: Callable[[int], tuple[str, str, str]],
) -> None:
    """Return or raise for ``item`` from its copies' outcomes.

    ``lost(i)`` is the failure message for copy ``i`` that sent no outcome, and
    ``lost_key(i)`` what tells its crash apart from other copies' in stress mode.
    """
    __tracebackhide__ = True  # the plugin's frames are not the user's
    if len(outcomes) == 1:
        outcome = outcomes[0]
        if outcome is None:
            fail_lost(lost(0))
        replay(outcome)
        if not outcome.passed:
            raise_outcome(outcome, item)
        return
    _combine(item, outcomes, lost, lost_key)


def fail_lost(message: str) -> NoReturn:
    # Not hidden from tracebacks: pytest notes when every entry is hidden, even for a
    # failure without a traceback.
    pytest.fail(message, pytrace=False)


def _combine(
    item: pytest.Item,
    outcomes: Sequence[_child.Outcome | None],
    lost: Callable[[int], str],
    lost_key: Callable[[int], tuple[str, str, str]],
) -> None:
    """One verdict from the copies' outcomes (see pytest_concur._stress.combine)."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._report import attach_longrepr
    from pytest_concur._stress import combine

    errors: list[BaseException | None] = []
    reprs: list[Any] = []
    keys: list[tuple[str, str, str]] = []
    for index, outcome in enumerate(outcomes):
        reprs.append(None)
        keys.append(("", "", ""))
        if outcome is not None:
            replay(outcome)
            if outcome.passed:
                errors.append(None)
                continue
            reprs[-1] = outcome.longrepr
            keys[-1] = (outcome.type_name, outcome.message, outcome.site)
        else:
            reprs[-1] = lost(index)
            keys[-1] = lost_key(index)
        try:
            if outcome is None:
                fail_lost(lost(index))
            raise_outcome(outcome, item)
        except BaseException as exc:
            errors.append(exc)
    error = combine(
        item,
        errors,
        key=lambda i: keys[i],
        render=lambda i: str(reprs[i]),
    )
    if error is None:
        return
    index = next(i for i, e in enumerate(errors) if e is error)
    longrepr = reprs[index]
    if isinstance(error, pytest.skip.Exception) and isinstance(longrepr, tuple):
        longrepr = (*longrepr[:2], f"Skipped: {error.msg}")
    attach_longrepr(item, error, longrepr)
    raise error


def replay(outcome: _child.Outcome) -> None:
    """Give the child's warnings and sys-captured output to this process's pytest."""
    forward(outcome.stdout, sys.stdout)
    forward(outcome.stderr, sys.stderr)
    if outcome.graphs:
        from pytest_concur import _locks

        _locks.note_graphs(outcome.graphs)
    for message, category_bytes, filename, lineno in outcome.warnings:
        category: type[Warning] = UserWarning
        if category_bytes is not None:
            with contextlib.suppress(Exception):
                category = pickle.loads(category_bytes)
        try:
            warning = category(message)
        except Exception:
            warning = UserWarning(f"{category.__name__}: {message}")
        warnings.warn_explicit(warning, type(warning), filename, lineno)


def raise_outcome(outcome: _child.Outcome, item: pytest.Item) -> None:
    """Raise, here, the exception a failed copy ended with, with its rendering attached."""
    from pytest_concur._backends import _child
    from pytest_concur._report import attach_longrepr

    exc: BaseException | None = None
    if outcome.pytest_outcome is not None:
        try:
            _child.raise_pytest_outcome(*outcome.pytest_outcome)
        except BaseException as raised:
            attach_longrepr(item, raised, outcome.longrepr)
            raise
    if outcome.exception is not None:
        try:
            exc = pickle.loads(outcome.exception)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = ChildFailure(f"{outcome.type_name}: {outcome.message}")
    attach_longrepr(item, exc, outcome.longrepr)
    raise exc


def forward(text: str, stream: Any) -> None:
    """Write what a child printed to this process's ``stream`` (pytest's capture)."""
    if not text:
        return
    if type(stream).__name__ == "TeeCaptureIO":
        # --capture=tee-sys: the child already echoed it to the terminal; capture it only.
        super(type(stream), stream).write(text)
    else:
        stream.write(text)
    stream.flush()
