"""Leak checks at fixture teardown, and the body checks around every test (``--concur-check-all``).

Fixtures. A fixture may start threads, processes, tasks and pools for the tests that use
it; they must be over once it is torn down. A checked fixture is watched from the start of
its setup to the end of its teardown:

- its *lineage* (``threads.Lineage``) is the set of threads that act for it: the thread
  that runs its code, while that code runs, and every thread a member starts, whenever it
  does (a server's thread that starts a handler thread during a test hands it to the
  fixture). Its code runs in its setup and in its teardown: a finalizer added at the end
  of the setup runs right before the fixture's own teardown (finalizers run last in,
  first out), and ``pytest_fixture_post_finalizer`` runs right after it;
- what the lineage starts is recorded by the three leak checks' own recordings:
  ``threads.Lineage`` itself, ``tasks.record_for`` (tasks, and event loops that are not
  pytest-concur's own) and ``processes.record_for`` (children and process pools).

When the runtest phase that tore the fixture down ends (after every teardown that ran with
it: a cleanup fixture torn down later may stop what it started), the checks' own verdicts
judge what is still running after the grace period (``concur_leak_grace``), with the
fixture named ("fixture 'server' (conftest.py:12) left 1 thread running"), and clean it up
as they do for a body; its tasks are judged in ``pytest_fixture_post_finalizer``, right
after its own teardown, since the item's loop closes before the phase ends. The body's
threads that were still running when it returned wait for the same moment
(``_leak.later_for``) and are judged first. Fixtures of pytest itself and of pytest-concur
are not watched.

A fixture's value (``Lineage.own``) makes the fixture the owner of what the value's
methods start while tests use it (``threads.owner_of``): a body's recordings hand such
threads, pools and processes to the fixture's.

A fixture set up while another one's code runs (``request.getfixturevalue`` in a fixture)
owns what is started meanwhile: the fixtures whose code runs form a stack, and only the
top one's lineage has pytest's thread. Bodies keep their own recordings, which begin after
the fixtures are set up: what a fixture owns is never blamed on a test, and what a body
starts never on a fixture.

Which fixtures: those of tests that run under a backend, by name (a module-scoped fixture
is watched whichever test sets it up first), those set up while such a test runs or while
a watched fixture's code runs (``request.getfixturevalue``); with ``--concur-check-all``
every fixture.
Allow-lists: the ini keys, plus the ``concur_allow`` markers of the node of the fixture's
scope (the test for a function-scoped fixture, the module for a module-scoped one ...).

Where a verdict is reported. Raising from ``pytest_fixture_post_finalizer`` is not safe on
every pytest we support: pytest 8 calls it in the ``finally`` of ``FixtureDef.finish``,
before it drops the fixture's cached value, so an exception there would leave the torn-down
value cached for the next test (pytest-dev/pytest#14114), and it may call it more than once
per teardown (#5848; only the first call finds our watch). So verdicts are queued and
raised when the runtest phase that finalized the fixture ends: its teardown ("ERROR at
teardown of test_x"), or its setup when pytest tore a fixture down to set it up again with
another parameter. After the last test (``-x``, ``^C``), they are written to the terminal.

Every test. With ``--concur-check-all`` (or ``concur_check_all_tests = true``), every
check's watch begins right before pytest calls a test that runs plainly and ends right
after, in pytest's thread, and their reports fail it as they fail a backend test. It wraps
the rest of ``pytest_pyfunc_call``, whoever calls the function (pytest, pytest-asyncio,
anyio), rather than call it ourselves as ``base.run_watched`` would.

Invariant: the state of this module is touched under its lock; nothing here raises in
``pytest_fixture_setup`` before the fixture runs (pytest would be left with a fixture that
is neither set up nor finished).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur._primitives import allocate_lock as _real_lock
from pytest_concur._state import CURRENT_ITEM, LATER, UNWATCHED_MODULES, backend_of

if TYPE_CHECKING:
    from pytest_concur._checks._leak import LeakWatch, Owner, Recording
    from pytest_concur._checks.threads import Lineage

CHECK_ALL_OPTION = "--concur-check-all"
CHECK_ALL_INI = "concur_check_all_tests"

_STATE = pytest.StashKey["_Session"]()


def check_all(config: pytest.Config) -> bool:
    """Whether every test is checked (``--concur-check-all``, ``concur_check_all_tests``)."""
    return bool(config.getoption("concur_check_all", False) or config.getini(CHECK_ALL_INI))


@final
class _Fixture:
    """One fixture from its setup to its teardown, and what its lineage started."""

    def __init__(self, fixturedef: pytest.FixtureDef[Any], node: Any, grace: float) -> None:
        from pytest_concur._checks import _allow, processes, tasks, threads

        self.name = fixturedef.argname
        self.bad_marker: str | None = None
        try:
            allow = _allow.for_item(node)
        except pytest.fail.Exception as exc:  # reported at teardown: setup must not raise
            allow = _allow.from_ini(node.config)
            self.bad_marker = str(exc)
        owner = _owner(fixturedef)
        # Judged in the order the body's checks end: the pools and loops first (their
        # helper threads are theirs), the threads last.
        self.checks: list[tuple[LeakWatch, Recording]] = []
        # Judged already (``judge_tasks``): their reports, and their recordings to close.
        self.problems: list[str] = []
        self.closing: list[Recording] = []
        # Made even when the threads check is off: the others record what it does.
        self.lineage: Lineage = threads.Lineage()
        acting = self.lineage.acting
        try:
            if processes.NAME not in allow.checks_off:
                watch: LeakWatch = processes.ProcessesWatch(allow, grace, owner)
                recording = processes.record_for(acting)
                self.lineage.takers[processes.NAME] = recording
                self.checks.append((watch, recording))
            if tasks.NAME not in allow.checks_off:
                watch = tasks.TasksWatch(allow, grace, owner)
                self.checks.append((watch, tasks.record_for(acting)))
        except BaseException:
            self.close()  # nothing of ours stays installed
            raise
        if threads.NAME not in allow.checks_off:
            threads_watch = threads.ThreadsWatch(allow, grace, owner)
            # Judged outside any loop: a loop's default executor is its owner's to close.
            threads_watch.loop_pools_are_loops = True
            self.checks.append((threads_watch, self.lineage))

    def judge_tasks(self) -> None:
        """Judge its tasks now, right after its teardown, before ``judge`` judges the rest.

        A function-scoped async fixture's tasks run on the item's loop, which pytest-concur
        closes (cancelling what is left) before later teardowns end; and a task, as for a
        body, has no grace period: it could only go on running on a loop nobody runs.
        """
        from pytest_concur._checks.tasks import TasksWatch

        for watch, recording in list(self.checks):
            if isinstance(watch, TasksWatch):
                self.checks.remove((watch, recording))
                self.closing.append(recording)
                self.problems.extend(self._verdict(watch, recording))

    def _verdict(self, watch: LeakWatch, recording: Recording) -> list[str]:
        try:
            problem = watch.verdict(recording)
        except Exception as error:  # a broken check must not hide the others
            problem = f"check {type(watch).__qualname__} failed: {error!r}"
        return [problem] if problem else []

    def judge(self) -> str | None:
        """What the fixture left running, or None; cleans up; closes the recordings."""
        problems = [self.bad_marker] if self.bad_marker else []
        problems.extend(self.problems)
        try:
            for watch, recording in self.checks:
                problems.extend(self._verdict(watch, recording))
        finally:
            self.close()
        return "\n\n".join(problems) or None

    def close(self) -> None:
        for recording in [*reversed([r for _, r in self.checks]), *self.closing]:
            if recording is not self.lineage:
                recording.close()
        self.closing.clear()
        self.lineage.close()


def _owner(fixturedef: pytest.FixtureDef[Any]) -> Owner:
    from pytest_concur._checks._leak import Owner
    from pytest_concur._stacks import short_path

    # Where the fixture is defined, as pytest's --fixtures says it (its first line).
    code = getattr(inspect.unwrap(fixturedef.func), "__code__", None)
    where = f" ({short_path(code.co_filename)}:{code.co_firstlineno})" if code else ""
    return Owner(
        subject=f"fixture {fixturedef.argname!r}{where}",
        who="the fixture",
        until="in its teardown",
    )


@final
class _Session:
    """This session's fixture watches and the verdicts not yet reported."""

    def __init__(self, config: pytest.Config) -> None:
        self.lock = _real_lock()
        self.check_all = check_all(config)
        # Names of the fixtures that tests running under a backend use (set at collection).
        self.names: frozenset[str] = frozenset()
        self.live: dict[pytest.FixtureDef[Any], _Fixture] = {}
        # The fixtures whose own code runs, innermost last: the last one has the thread.
        self.acting: list[_Fixture] = []
        # Torn down, judged when the phase that tore them down ends (see _judge_finalized).
        self.finalized: list[_Fixture] = []
        self.reports: list[str] = []

    def push(self, fixture: _Fixture) -> None:
        with self.lock:
            below = self.acting[-1] if self.acting else None
            self.acting.append(fixture)
        if below is not None:
            below.lineage.leave()
        fixture.lineage.enter()

    def pop(self, fixture: _Fixture) -> None:
        with self.lock:
            if fixture not in self.acting:
                return
            was_top = self.acting[-1] is fixture
            self.acting.remove(fixture)
            below = self.acting[-1] if was_top and self.acting else None
        fixture.lineage.leave()
        if below is not None:
            below.lineage.enter()

    def take_reports(self) -> list[str]:
        with self.lock:
            reports, self.reports = self.reports, []
        return reports


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = _Session(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    # Fixtures never torn down (an interrupted session) must not leave our hooks behind,
    # least of all in pytester's inline runs, which share the process.
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    del config.stash[_STATE]
    with state.lock:
        left = state.finalized + list(state.live.values())
        state.live.clear()
        state.finalized.clear()
        state.acting.clear()
    for fixture in reversed(left):
        fixture.close()


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or state.check_all:
        return
    from pytest_concur._state import parametrized_backend as _backend_name

    names = frozenset(
        name
        for item in session.items
        if _backend_name(item) is not None
        for name in getattr(item, "fixturenames", ())
    )
    with state.lock:
        state.names = names


def _watched(state: _Session, fixturedef: pytest.FixtureDef[Any], config: pytest.Config) -> bool:
    module = str(getattr(fixturedef.func, "__module__", None) or "")
    if module.startswith(UNWATCHED_MODULES):
        return False
    with state.lock:
        if state.check_all or fixturedef.argname in state.names or state.acting:
            return True  # (a fixture that a watched one asks for owns what it starts)
    # One that a test under a backend asks for with request.getfixturevalue().
    item = config.stash.get(CURRENT_ITEM, None)
    return item is not None and backend_of(item) is not None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    state = request.config.stash.get(_STATE, None)
    if state is None or not _watched(state, fixturedef, request.config):
        return (yield)
    with state.lock:
        stale = state.live.pop(fixturedef, None)
    if stale is not None:  # pragma: no cover - set up again without a teardown between
        state.pop(stale)
        stale.close()
    from pytest_concur._checks._allow import grace

    try:
        fixture = _Fixture(fixturedef, request.node, grace(request.config))
    except Exception as exc:  # never raise before the fixture runs (see the docstring)
        with state.lock:
            state.reports.append(
                f"pytest-concur could not watch fixture {fixturedef.argname!r}: {exc!r}"
            )
        return (yield)
    with state.lock:
        state.live[fixturedef] = fixture
    state.push(fixture)
    try:
        value = yield
        fixture.lineage.own(value)  # what its objects start from now on is the fixture's
        return value
    finally:
        state.pop(fixture)
        # Runs right before the fixture's own teardown: its code acts for it again.
        request.addfinalizer(functools.partial(state.push, fixture))


def pytest_fixture_post_finalizer(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> None:
    state = request.config.stash.get(_STATE, None)
    if state is None:
        return
    with state.lock:
        fixture = state.live.pop(fixturedef, None)
    if fixture is None:
        return  # not watched, or pytest 8 calling again for the same teardown
    state.pop(fixture)
    try:
        fixture.judge_tasks()
    finally:
        with state.lock:
            state.finalized.append(fixture)


def _judge_finalized(state: _Session) -> None:
    """Judge the fixtures torn down so far, in the order they were, and queue the verdicts.

    Not right after a fixture's own teardown: the teardowns that run after it in the same
    phase (a fixture set up before it, one that stops every actor) may still stop what it
    started, and a fixture is only at fault for what is running once they all have run.
    """
    while True:
        with state.lock:
            if not state.finalized:
                return
            fixture = state.finalized.pop(0)
        try:
            report = fixture.judge()
        except Exception as exc:  # pragma: no cover - judge() already guards each check
            report = f"pytest-concur could not judge fixture {fixture.name!r}: {exc!r}"
        if report:
            with state.lock:
                state.reports.append(report)


def _judge_later(item: pytest.Item) -> None:
    """Judge what the body left running for the teardown to stop (``_leak.later_for``)."""
    state = item.config.stash.get(_STATE, None)
    later = item.stash.get(LATER, None)
    if state is None or not later:
        return
    verdicts, later[:] = list(later), []
    for verdict in verdicts:
        try:
            report = verdict()
        except Exception as exc:  # pragma: no cover - a broken check must not hide the others
            report = f"pytest-concur could not judge what the test left running: {exc!r}"
        if report:
            with state.lock:
                state.reports.append(report)


def _report_after_phase(item: pytest.Item) -> Generator[None, None, None]:
    """Around setup and teardown: raise the reports of fixtures finalized meanwhile."""
    # No __tracebackhide__: the reports print as their message alone (pytrace=False), and
    # with every frame hidden pytest would add that it hid them.
    try:
        yield
    except BaseException as exc:
        _judge_phase(item)
        _add_reports(item.config, exc)
        raise
    _judge_phase(item)
    _raise_reports(item.config)


def _judge_phase(item: pytest.Item) -> None:
    # The body's leftovers first: the test is named before its fixtures.
    _judge_later(item)
    state = item.config.stash.get(_STATE, None)
    if state is not None:
        _judge_finalized(state)


# Fixtures are finalized in both phases (a parametrized one before its next parameter's
# setup), and their reports are handled alike.
pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_report_after_phase)
pytest_runtest_teardown = pytest_runtest_setup


def _queued(config: pytest.Config) -> str | None:
    state = config.stash.get(_STATE, None)
    reports = state.take_reports() if state is not None else []
    return "\n\n".join(reports) or None


def _raise_reports(config: pytest.Config) -> None:
    """Fail the phase with the fixtures' verdicts queued during it (see the docstring)."""
    text = _queued(config)
    if text is not None:
        pytest.fail(text, pytrace=False)


def _add_reports(config: pytest.Config, exc: BaseException) -> None:
    """Add the fixtures' verdicts to the phase's own error."""
    text = _queued(config)
    if text is None:
        return
    if sys.version_info >= (3, 11):
        exc.add_note(f"\npytest-concur also found:\n{text}")
    else:  # pragma: no cover - exercised by the py310 tox env
        raise pytest.fail.Exception(f"{exc!r}\n\npytest-concur also found:\n{text}") from exc


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # After pytest's own sessionfinish, which tears down what the last test left set up.
    state = session.config.stash.get(_STATE, None)
    if state is not None:
        _judge_finalized(state)
    reports = state.take_reports() if state is not None else []
    if not reports:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "\n\n".join(reports)
    if reporter is None:
        print(text, file=sys.stderr)
        return
    reporter.write_sep("=", "pytest-concur: fixtures torn down after the last test", red=True)
    reporter.write_line(text)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    # No __tracebackhide__: a report prints as its message alone (pytrace=False), and with
    # every frame hidden pytest would add that it hid them. A failure of the test itself is
    # cut to the test function's frames as usual.
    state = pyfuncitem.config.stash.get(_STATE, None)
    if state is None or not state.check_all or backend_of(pyfuncitem) is not None:
        return (yield)
    from pytest_concur import _registry
    from pytest_concur._watching import _report

    checks = _registry.checks(pyfuncitem.config)
    watches = [watch for check in checks if (watch := check.watch(pyfuncitem)) is not None]
    for watch in watches:
        watch.begin()
    try:
        result = yield
    except BaseException as exc:
        _report(watches, exc)
        raise
    _report(watches, None)
    return result
