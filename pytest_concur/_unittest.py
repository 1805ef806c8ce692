"""``unittest.TestCase`` methods under the backends: one item per method and backend.

pytest collects a TestCase method as one item that unittest itself runs. When a backend is
selected for the class (its ``backend`` marker, else ``--concur-backends`` or the ini key),
the collection report of the class is rewritten (``pytest_make_collect_report``, so that
node ids such as ``test_x[thread]`` can be named on the command line) to hold one
:class:`TestCaseItem` per method and backend instead.

The design, and what it keeps:

* **The body is unittest's whole run of one method**: ``setUp``, the method, ``tearDown``
  and the cleanups (``addCleanup``), with ``asyncSetUp`` and friends for
  ``IsolatedAsyncioTestCase``, run by ``TestCase.run`` under the backend. What it reports
  to its result (:class:`_Outcome`) becomes the item's outcome as in a plain run: an error
  or failure is re-raised with unittest's own frames cut off, ``skipTest`` is a skip,
  ``expectedFailure`` an xfail, an unexpected success a failure. Failing ``subTest``
  blocks fail the item together, each named in the report.
* **pytest's share stays pytest's**: the item is a ``pytest.Function`` below the class's
  collector, so ``setUpClass``/``tearDownClass``, the class's ``@unittest.skip``, autouse
  fixtures and fixture methods of the class run as for the plain item, and the instance
  they see (``request.instance``) is the one the body runs.
* **One instance, one copy**: a TestCase instance runs one test at a time, so the item is
  serial in stress mode.
* **What cannot travel says so.** Under ``process`` the instance goes to the child: fork
  inherits it; spawn and forkserver pickle it, and an instance that cannot be pickled (an
  ``IsolatedAsyncioTestCase`` never can) fails the item naming the fix.
* Under ``asyncio`` a plain TestCase method is called inside the running loop, as a ``def``
  body is. An ``IsolatedAsyncioTestCase`` brings its own loop, which cannot run inside
  another: there its coroutines (``asyncSetUp``, the test, ``asyncTearDown``, async
  cleanups) run as tasks on the item's loop, while unittest's synchronous steps run in a
  helper thread that hands each coroutine to the loop (Python 3.11+).
"""

from __future__ import annotations

import functools
import sys
import traceback
import unittest
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _marker, _registry
from pytest_concur._state import BACKEND_NAME

if TYPE_CHECKING:
    import asyncio

# The TestCase method an item runs.
_METHOD = pytest.StashKey[str]()
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    # Only a class that collected: a module's .obj would import it again (and raise its
    # skip or error a second time, out of the collection's handling, on pytest 8.0).
    if not (report.passed and isinstance(collector, pytest.Class)):
        return report
    cls = getattr(collector, "obj", None)
    if isinstance(cls, type) and issubclass(cls, unittest.TestCase):
        report.result = [
            new for node in report.result for new in _per_backend(collector.config, node)
        ]
    return report


def _per_backend(config: pytest.Config, node: Any) -> list[Any]:
    """One :class:`TestCaseItem` per backend selected for a TestCase method; else ``node``."""
    registry = config.stash.get(_registry.REGISTRY, None)
    if not isinstance(node, pytest.Function) or registry is None:
        return [node]
    mark = node.get_closest_marker(_marker.MARKER)
    if mark is not None:
        selection: _marker.Selection | None = _marker.Selection(
            _marker.parse_marker(mark), "@pytest.mark.backend"
        )
    else:
        selection = _marker.default_selection(config)
    if selection is None:
        return [node]
    problem = _marker.check(selection, registry)
    if problem is not None:
        pytest.fail(f"In {node.name}: {problem}", pytrace=False)
    items = []
    for name in selection.names:
        # No originalname: pytest 9.2 would build the node id from it, without the backend.
        item = TestCaseItem.from_parent(node.parent, name=f"{node.name}[{name}]", callobj=node.obj)
        item.stash[_METHOD] = node.name
        item.add_marker(getattr(pytest.mark, f"concur_{name}"))
        item.add_marker(
            pytest.mark.concur_serial(reason="a unittest.TestCase instance runs one test at a time")
        )
        item.stash[BACKEND_NAME] = name
        items.append(item)
    return items


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # --concur-check-all watches a test that runs plainly around pytest_pyfunc_call, which
    # a TestCase method (unittest calls it) and a doctest never go through: give them the
    # same watch around their call phase.
    if not _called_by_their_own_runner(item):
        return (yield)
    from pytest_concur._checks import fixtures

    yield from fixtures.pytest_pyfunc_call(item)  # type: ignore[arg-type]
    return None


def _called_by_their_own_runner(item: pytest.Item) -> bool:
    if isinstance(item, pytest.DoctestItem):
        return True
    cls = getattr(item, "cls", None)
    return (
        isinstance(item, pytest.Function)
        and not isinstance(item, TestCaseItem)
        and isinstance(cls, type)
        and issubclass(cls, unittest.TestCase)
    )


class TestCaseItem(pytest.Function):
    """One method of a ``unittest.TestCase`` run under one backend."""

    # As pytest's own unittest items: the method's parameters are not fixtures.
    nofuncargs = True
    __test__ = False  # not a test class itself, whatever pytest looks for

    _case: unittest.TestCase | None = None

    @property
    def instance(self) -> Any:
        """The TestCase instance of this run (``request.instance`` of its fixtures)."""
        return self._case

    @property
    def _testcase(self) -> Any:
        # Where older pytest 8 releases (8.0 among them) look for a unittest item's instance (for
        # request.instance, and so setUpClass's fixture): the name their own items provide.
        return self._case

    def setup(self) -> None:
        cls = self.cls
        assert cls is not None
        case = self._case = cls(self.stash[_METHOD])
        backend = self.stash[BACKEND_NAME]
        isolated = isinstance(case, unittest.IsolatedAsyncioTestCase)
        run = run_on_running_loop if isolated and backend == "asyncio" else run_case
        # The body the backend runs, as pytest_concur.plugin hands it over: item.obj.
        self.obj = functools.partial(run, case)
        super().setup()

    def reportinfo(self) -> tuple[Any, int | None, str]:
        # Where the method is (self.obj is the body's runner once the item is set up).
        path, line, name = super().reportinfo()
        code = getattr(getattr(self.cls, self.stash[_METHOD], None), "__code__", None)
        return path, line if code is None else code.co_firstlineno - 1, name

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self._case = None

    def runtest(self) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.stash[BACKEND_NAME] == "process":
            _check_travels(self)
        super().runtest()


def _check_travels(item: TestCaseItem) -> None:
    """Fail, naming the fix, when the process backend cannot send the instance to its child."""
    __tracebackhide__ = True
    from pytest_concur._backends.process import START_METHOD_OPTION, resolve_auto, start_method

    method, why = start_method(item.config), ""
    if method == "auto":
        method, why = resolve_auto()
    if method == "fork":
        return  # the child inherits the instance
    import pickle  # here: a session without the process backend need not import it

    try:
        pickle.dumps(item._case)
    except Exception as exc:
        reason = f", {why}" if why else ""
        pytest.fail(
            f"the unittest.TestCase instance of {item.nodeid} cannot be sent to the child "
            f"process (start method {method}{reason}): {type(exc).__name__}: {exc}.\n"
            f"Fix: use {START_METHOD_OPTION}=fork so that the child inherits it, or leave "
            'the class out of the process backend: @pytest.mark.backend("thread", '
            '"asyncio") on the class.',
            pytrace=False,
        )


class _Outcome(unittest.TestResult):
    """What unittest reports of one run, kept to become the item's outcome."""

    def __init__(self) -> None:
        super().__init__()
        # (the subTest, or None for the test itself; the exception it ended with)
        self.problems: list[tuple[object, _ExcInfo]] = []
        self.skipped_because: str | None = None
        self.expected_failure: _ExcInfo | None = None
        self.unexpected_success = False

    def addError(self, test: Any, err: Any) -> None:
        self.problems.append((None, err))

    def addFailure(self, test: Any, err: Any) -> None:
        self.problems.append((None, err))

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        if err is not None:
            self.problems.append((subtest, err))

    def addSkip(self, test: Any, reason: str) -> None:
        if isinstance(test, unittest.TestCase) and not _is_subtest(test):
            self.skipped_because = reason

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        self.expected_failure = err

    def addUnexpectedSuccess(self, test: Any) -> None:
        self.unexpected_success = True

    def raise_outcome(self) -> None:
        """Raise what the plain run would have ended the item with; return if it passed."""
        __tracebackhide__ = True
        if self.problems:
            raise _failure(self.problems)
        if self.expected_failure is not None:
            pytest.xfail("")  # pytest's own unittest items give no reason either
        if self.unexpected_success:
            pytest.fail("Unexpected success", pytrace=False)
        if self.skipped_because is not None:
            raise pytest.skip.Exception(self.skipped_because, _use_item_location=True)


def run_case(case: unittest.TestCase) -> None:
    """Run one TestCase method as unittest does, and end as its outcome says."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    outcome = _Outcome()
    case.run(outcome)
    outcome.raise_outcome()


async def run_on_running_loop(case: unittest.IsolatedAsyncioTestCase) -> None:
    """Run an ``IsolatedAsyncioTestCase`` method with its coroutines on the running loop."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    if sys.version_info >= (3, 11) and hasattr(case, "_setupAsyncioRunner"):
        await _on_running_loop(case)
        return
    pytest.fail(  # pragma: no cover - exercised by the py310 tox env
        "an IsolatedAsyncioTestCase runs under the asyncio backend on Python 3.11 and "
        'later only; here, run it under the others: @pytest.mark.backend("thread", '
        '"process") on the class.',
        pytrace=False,
    )


async def _on_running_loop(case: unittest.IsolatedAsyncioTestCase) -> None:
    __tracebackhide__ = True
    import asyncio  # only here: a session of plain TestCases never needs it

    runner = _OnLoop(asyncio.get_running_loop())
    # The class makes an asyncio.Runner of its own in run(): hand it ours instead. These
    # two methods are the class's seam for its runner (3.11 to 3.14); the instance's own
    # attributes shadow them for this one run.
    vars(case).update(
        _setupAsyncioRunner=lambda: vars(case).update(_asyncioRunner=runner),
        _tearDownAsyncioRunner=lambda: None,
    )
    outcome = _Outcome()
    await asyncio.to_thread(case.run, outcome)
    outcome.raise_outcome()


class _OnLoop:
    """What ``IsolatedAsyncioTestCase`` asks of its runner, from a helper thread: each
    coroutine runs as a task on the item's loop, in the test's context."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Any, *, context: Any = None) -> Any:
        import concurrent.futures

        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def finish(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                done.cancel()
            elif task.exception() is not None:
                done.set_exception(task.exception())
            else:
                done.set_result(task.result())

        def start() -> None:
            if sys.version_info >= (3, 11):
                task = self._loop.create_task(coro, context=context)
            else:  # pragma: no cover - never: run_on_running_loop refuses 3.10
                task = self._loop.create_task(coro)
            task.add_done_callback(finish)

        self._loop.call_soon_threadsafe(start)
        return done.result()

    def close(self) -> None:
        pass


def _is_subtest(test: object) -> bool:
    return type(test).__name__ == "_SubTest"


def _failure(problems: list[tuple[object, _ExcInfo]]) -> BaseException:
    """The exception the item fails with: the first problem's, the others noted on it."""
    subtest, (_, exc, tb) = problems[0]
    exc = exc.with_traceback(_without_unittest_frames(tb))
    if len(problems) == 1 and subtest is None:
        return exc
    notes = [f"in {subtest}" if subtest is not None else "in the test itself"]
    for other, (kind, value, other_tb) in problems[1:]:
        where = f"in {other}" if other is not None else "in the test itself"
        text = "".join(traceback.format_exception(kind, value, _without_unittest_frames(other_tb)))
        notes.append(f"\nand {where}:\n{text.rstrip()}")
    if sys.version_info >= (3, 11):
        for note in notes:
            exc.add_note(note)
        return exc
    return pytest.fail.Exception(  # pragma: no cover - exercised by the py310 tox env
        "\n".join([repr(exc), *notes]), pytrace=False
    )


def _without_unittest_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without unittest's frames (its modules say ``__unittest``, as its own reports
    and pytest's unittest items skip them), so that a failure ends at the user's line."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_globals.get("__unittest"):
            kept.append(tb)
        tb = tb.tb_next
    chain = None
    for entry in reversed(kept):
        chain = TracebackType(chain, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return chain
