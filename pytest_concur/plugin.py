"""The ``pytest11`` entry point of pytest-concur: options, markers and the wiring of hooks.

This module stays cheap to import: what runs a body under a backend (threads,
multiprocessing, asyncio) is imported when the first test needs it, not by
``pytest --version``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _claim, _marker, _registry
from pytest_concur._state import BACKEND_NAME, CURRENT_ITEM, FIXTURE, item_began
from pytest_concur._state import parametrized_backend as _backend_name

if TYPE_CHECKING:
    from pytest_concur._workers._concur import Concur

_RUNNER = pytest.StashKey[Any]()
# Functions whose backend marker was rejected, by nodeid: the message their items fail with.
_MARKER_ERRORS = pytest.StashKey[dict[str, str]]()
_TRACKING_LOCKS = pytest.StashKey[bool]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_concur import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("concur", "concurrency testing (pytest-concur)")
    group.addoption(
        _marker.OPTION,
        dest="concur_backends",
        metavar="NAMES",
        default=None,
        help="Run every test that has no @pytest.mark.backend of its own under each of these "
        "backends, e.g. thread,process,asyncio. Overrides the concur_backends ini key.",
    )
    group.addoption(
        "--concur-start-method",
        dest="concur_start_method",
        choices=("auto", "fork", "forkserver", "spawn"),
        default=None,
        help="How the process backend starts its child. auto (the default): fork while the "
        "test process runs a single thread, else forkserver (spawn on macOS).",
    )
    group.addoption(
        _marker.WORKERS_OPTION,
        dest="concur_workers",
        metavar="N",
        default=None,
        help="Stress mode: run N copies of each backend test's body at the same time (a "
        "test's own @pytest.mark.backend(..., workers=M) runs M). Overrides the "
        "concur_workers ini key.",
    )
    group.addoption(
        "--concur-timeout",
        dest="concur_timeout",
        metavar="SECONDS",
        default=None,
        help="Deadline of each test that runs under a backend when pytest-timeout sets none "
        "for it (0: none); at the deadline the test fails with a report of every thread, "
        "task and child process. Overrides the concur_timeout ini key (default 120).",
    )
    group.addoption(
        "--concur-claim",
        dest="concur_claim",
        metavar="PLUGINS",
        default=None,
        help="Run under the backends the async tests these plugins would run: asyncio "
        "(pytest-asyncio), anyio, or both (asyncio,anyio). Overrides the concur_claim ini key.",
    )
    parser.addini(
        "concur_claim",
        "Async plugins whose tests pytest-concur runs under the backends: asyncio, anyio "
        "(separated by commas or spaces); empty leaves their tests to them.",
        default="",
    )
    # Schedule exploration (pytest_concur/_explore).
    group.addoption(
        _marker.EXPLORE_OPTION,
        dest="concur_explore",
        metavar="N",
        default=None,
        help="Explore schedules: run the body of every test that runs under a backend up to "
        "N times, each under another seeded order of its asyncio tasks, until one fails "
        "(tests with @pytest.mark.backend(..., explore=M) try M). Overrides the "
        "concur_explore ini key.",
    )
    group.addoption(
        "--concur-seed",
        dest="concur_seed",
        metavar="SEED",
        default=None,
        help="Base seed of the explored schedules (default: a random one, shown in the "
        "header); each test derives its own from it and its node id.",
    )
    group.addoption(
        "--concur-replay",
        dest="concur_replay",
        metavar="TOKEN",
        default=None,
        help="Rerun exactly the schedule a failure named with this replay token, or 'last': "
        "the last failing schedule of each test, from pytest's cache.",
    )
    parser.addini(
        _marker.EXPLORE_INI,
        "Schedules to explore for each backend test's body (default 0: none).",
        default="",
    )
    parser.addini(
        "concur_timeout",
        "Seconds a test that runs under a backend may take when pytest-timeout sets no "
        "timeout for it (default 120; 0 for none).",
        default="",
    )
    parser.addini(
        _marker.WORKERS_INI,
        "Copies of each backend test's body to run at the same time (stress mode; default 1).",
        default="",
    )
    parser.addini(
        "concur_serial_fixtures",
        "Fixtures that make a test run as a single copy in stress mode (names separated by "
        "spaces).",
        type="args",
        default=[],
    )
    parser.addini(
        _marker.INI,
        "Backends for every test without a backend marker (names separated by commas or "
        "spaces); empty leaves such tests alone.",
        default="",
    )
    parser.addini(
        "concur_lock_order",
        "Locks taken in both orders during a backend test: fail (default), warn or off.",
        default="fail",
    )
    parser.addini(
        "concur_session_locks",
        "Track the locks made anywhere in the session (fixtures, imports, conftest.py) for "
        "deadlock detection (default true); false: only those made while a body runs.",
        type="bool",
        default=True,
    )
    parser.addini(
        "concur_start_method",
        "Start method of the process backend: auto (default), fork, forkserver or spawn.",
        default="",
    )
    # The leak checks' keys (pytest_concur/_checks/_allow.py reads them; declared here so
    # that pytest --version does not import the checks).
    allowed = {
        "threads": "Threads (by name or target) that no test is failed for leaving running",
        "tasks": "Tasks (by name or coroutine) that no test is failed for leaving pending",
        "processes": "Child processes (by name, target or command) that no test is failed for "
        "leaving running",
        "started_by": "Functions (name or module.name) whose threads, tasks and processes no "
        "test is failed for leaving running",
    }
    for kind, what in allowed.items():
        parser.addini(
            f"concur_allow_{kind}",
            f"{what}: fnmatch patterns, one per line.",
            type="linelist",
            default=[],
        )
    parser.addini(
        "concur_checks_off",
        "Checks to turn off for every test (names separated by spaces): threads, tasks, "
        "processes, blocked_loop, futures, callbacks.",
        type="args",
        default=[],
    )
    parser.addini(
        "concur_leak_grace",
        "Seconds a thread or process that a test started may go on after the test's body "
        "returns before it is reported as left running (default 1.0).",
        default="1.0",
    )
    group.addoption(
        "--concur-report",
        dest="concur_report",
        metavar="FILE",
        default=None,
        help="Write what pytest-concur saw (each backend test's outcome and findings, the "
        "counts per backend) to FILE as JSON, for CI tools; the schema is in docs/report.md.",
    )
    group.addoption(
        "--concur-html",
        dest="concur_html",
        metavar="FILE",
        default=None,
        help="Write a self-contained HTML page of what pytest-concur saw to FILE: the "
        "summary, each finding with its stacks folded, and the wait-for graph of each "
        "deadlock and lock-order inversion.",
    )
    # Checks around every test and every fixture (pytest_concur/_checks/fixtures.py).
    group.addoption(
        "--concur-check-all",
        dest="concur_check_all",
        action="store_true",
        default=False,
        help="Run pytest-concur's checks (deadlocks, leaks, background errors) around every "
        "test, not only those that run under a backend, and check every fixture's leftovers "
        "at its teardown. Same as the concur_check_all_tests ini key.",
    )
    parser.addini(
        "concur_check_all_tests",
        "Run pytest-concur's checks around every test and every fixture, not only those of "
        "tests that run under a backend (default false).",
        type="bool",
        default=False,
    )
    # Read by pytest_concur/_checks/blocked_loop.py (declared here: see the leak checks' keys).
    parser.addini(
        "concur_blocked_loop",
        "Seconds one task step or callback may hold a test's event loop before the test "
        "fails (default 0.1; 0 turns the check off).",
        default="0.1",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Before the first conftest.py is imported, so that its locks are tracked too.
    _track_locks(early_config)


def _track_locks(config: pytest.Config) -> None:
    """Make the locks created from now on tracked ones, until the config's cleanup."""
    if config.stash.get(_TRACKING_LOCKS, False):
        return
    config.stash[_TRACKING_LOCKS] = True
    # Before the command line is parsed whole, only the known arguments are.
    args = getattr(config, "known_args_namespace", None) or config.option
    if getattr(args, "help", False) or getattr(args, "version", False):
        return  # nothing runs: --help and --version need no tracked locks
    if not config.getini("concur_session_locks"):
        return  # each body's tracking replaces the factories for its span only
    from pytest_concur import _locks

    _locks.install()
    # Run by _ensure_unconfigure, which pytest calls on every way out, a failed start too.
    config.add_cleanup(_locks.uninstall)


def pytest_configure(config: pytest.Config) -> None:
    _track_locks(config)  # a plugin registered after the initial conftests were loaded
    config.addinivalue_line(
        "markers",
        "backend(*names, workers=1, explore=0): run this test once under each named "
        "pytest-concur backend, as separate items test[name] (built in: thread, process, "
        "asyncio); workers=N runs N copies of the body at once in each; explore=N runs the "
        "body under up to N seeded schedules of its tasks, until one fails.",
    )
    config.addinivalue_line(
        "markers",
        "concur_serial(reason=None): run this test as a single copy even in pytest-concur's "
        "stress mode (workers=N, --concur-workers): it is not safe to run in several at once.",
    )
    config.addinivalue_line(
        "markers",
        "concur_allow(threads=[...], tasks=[...], processes=[...], started_by=[...], "
        "checks_off=[...]): let this test leave running the threads, tasks and processes "
        "whose name or target matches a pattern (fnmatch) or that a matching function "
        "started; checks_off turns pytest-concur's checks off (threads, tasks, processes, "
        "blocked_loop, futures, callbacks).",
    )
    config.addinivalue_line(
        "markers",
        "concur_blocked_loop(seconds): how long one task step or callback may hold this "
        "test's event loop before the test fails (default: the concur_blocked_loop ini key, "
        "0.1); 0 turns the check off.",
    )
    from pytest_concur import _async_fixtures, _backends, _checks, _summary, _timeout

    config.pluginmanager.register(_summary, "concur-summary")
    config.pluginmanager.register(_summary.Collector(config), _summary.COLLECTOR)
    if config.getoption("concur_html", None):
        from pytest_concur import _html

        config.pluginmanager.register(_html, "concur-html")

    config.pluginmanager.register(_timeout, "concur-timeout")
    config.pluginmanager.register(_backends, "concur-builtin-backends")
    config.pluginmanager.register(_checks, "concur-builtin-checks")
    config.pluginmanager.register(_async_fixtures, "concur-async-fixtures")
    # Registered after the async plugins, whose items its collection wrapper takes over.
    config.pluginmanager.register(_claim, "concur-claim")
    from pytest_concur import _unittest

    config.pluginmanager.register(_unittest, "concur-unittest")
    # After the async fixtures: its setup wrapper must see the fixture's own function.
    from pytest_concur._checks import fixtures as _fixture_checks

    config.pluginmanager.register(_fixture_checks, "concur-fixture-checks")
    from pytest_concur._checks import fixture_threads

    config.pluginmanager.register(fixture_threads, "concur-fixture-thread-errors")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # The checks hook a few library methods once, for the session: put them back (see
    # _patches), so that a process that goes on (pytester's inline runs) has them as it had.
    hooks = sys.modules.get("pytest_concur._patches")
    if hooks is not None:
        hooks.uninstall()


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    registry = _registry.collect(config)
    config.stash[_registry.REGISTRY] = registry
    config.stash[_registry.CHECKS] = _registry.collect_checks(config)
    for name, backend in registry.items():
        config.addinivalue_line(
            "markers",
            f"concur_{name}: set on items that run under the {name!r} backend "
            f"({backend.description}); select them with -m concur_{name}.",
        )
    _marker.default_workers(config)  # a bad --concur-workers is a usage error up front
    _marker.default_explore(config)  # and so is a bad --concur-explore
    if _explore_asked(config):
        from pytest_concur._explore import session as explore_session

        explore_session(config)  # and a bad --concur-seed or --concur-replay
    from pytest_concur import _timeout

    _timeout.default(config)  # and so is a bad --concur-timeout
    default = _marker.default_selection(config)
    if default is not None:
        problem = _marker.check(default, registry)
        if problem is not None:
            raise pytest.UsageError(f"pytest-concur: {problem}")


def pytest_report_header(config: pytest.Config) -> str | None:
    if not _explore_asked(config):
        return None
    from pytest_concur._explore import header

    return header(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    # pytest-xdist: every worker explores from the controller's base seed.
    if _explore_asked(node.config):
        from pytest_concur._explore import WORKERINPUT_SEED, session

        node.workerinput[WORKERINPUT_SEED] = session(node.config).seed


def _explore_asked(config: pytest.Config) -> bool:
    """Whether an option or the ini key asks for exploring schedules or replaying one."""
    return any(
        config.getoption(dest) is not None
        for dest in ("concur_explore", "concur_seed", "concur_replay")
    ) or bool(str(config.getini(_marker.EXPLORE_INI) or "").strip())


@pytest.fixture(autouse=True)
def concur_backend() -> str | None:
    """The name of the backend this test runs under, or ``None`` outside pytest-concur."""
    # Items that run under a backend get this fixture parametrized with the name, so this
    # body only runs for the others.
    return None


@pytest.fixture
def worker_index() -> int:
    """Which copy of the body this is, from 0, in stress mode (``workers=N``); else 0.

    Each copy's test function gets its own value. Fixtures are set up once and shared by
    the copies, so a fixture that asks for ``worker_index`` gets 0.
    """
    return 0


@pytest.fixture
def concur(request: pytest.FixtureRequest) -> Generator[Concur, None, None]:
    """Workers of the test's own backend, joined before it ends (see docs/workers.md).

    ``concur.start(fn, *args, **kwargs)`` runs ``fn`` in a thread, a task (``asyncio``) or a
    child process (``process``) and returns a ``Worker`` to join; ``concur.expect_clean()``
    fails if the code in its block leaves a thread, task or process running.
    """
    from pytest_concur._workers import _check

    yield from _check.fixture(request)


@pytest.fixture
def worker_count(request: pytest.FixtureRequest) -> int:
    """How many copies of the body run at once (``workers=N``); 1 outside stress mode."""
    if _backend_name(request.node) is None:
        return 1
    from pytest_concur._stress import copies

    return copies(request.node, count_serial=False)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    registry = metafunc.config.stash.get(_registry.REGISTRY, None)
    if registry is None:  # pragma: no cover - collection without a session
        return
    try:
        selection = _marker.select(metafunc.definition, registry)
        if selection is None:
            return
        if FIXTURE not in metafunc.fixturenames:
            pytest.fail(
                f"{metafunc.definition.name} asks for backends but does not use "
                f"pytest-concur's autouse {FIXTURE!r} fixture: a conftest.py overrides it "
                "without autouse=True.",
                pytrace=False,
            )
    except pytest.fail.Exception as exc:
        # Raised here it would be a collection error of the whole module: make it an
        # error of this test alone, at its setup (see pytest_runtest_setup).
        errors = metafunc.config.stash.setdefault(_MARKER_ERRORS, {})
        errors[metafunc.definition.nodeid] = str(exc.msg or exc)
        return
    metafunc.parametrize(
        FIXTURE,
        [
            pytest.param(name, id=name, marks=getattr(pytest.mark, f"concur_{name}"))
            for name in selection.names
        ],
        scope="function",
    )


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str | None:
    # Say which async tests the backends left to another plugin, rather than let
    # --concur-backends look like it did something it did not.
    if _marker.default_selection(config) is None:
        return None
    lines = [
        f"pytest-concur: {count} async test(s) left to {plugin}, which runs them"
        f"{_claim.summary_hint(config, plugin)}"
        for plugin, count in _marker.left_to_others(config).items()
    ]
    return "\n".join(lines) or None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    config = item.config
    config.stash[CURRENT_ITEM] = item
    item_began()
    try:
        return (yield)
    finally:
        config.stash[CURRENT_ITEM] = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    name = _backend_name(item)
    if name is not None:
        item.stash[BACKEND_NAME] = name
    errors = item.config.stash.get(_MARKER_ERRORS, None)
    if errors and isinstance(item, pytest.Function):
        # Every item of a function whose marker was rejected (it may have other parameters).
        message = errors.get(f"{item.parent.nodeid}::{item.originalname}" if item.parent else "")
        if message is not None:
            pytest.fail(message, pytrace=False)
    if name is not None and (
        _marker.explore(item) or item.config.getoption("concur_replay") is not None
    ):
        from pytest_concur._explore import prepare

        prepare(item)  # before the fixtures make the item's loop


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    name = pyfuncitem.stash.get(BACKEND_NAME, None)
    if name is None:
        return None
    from pytest_concur._backends.base import BodyCall
    from pytest_concur._stress import copies

    config = pyfuncitem.config
    backend = config.stash[_registry.REGISTRY][name]

    def make_call() -> BodyCall:
        watches = [check.watch(pyfuncitem) for check in config.stash[_registry.CHECKS]]
        return BodyCall(
            item=pyfuncitem,
            function=pyfuncitem.obj,
            kwargs=_body_kwargs(pyfuncitem),
            run_coroutine=functools.partial(_run_on_item_loop, pyfuncitem),
            watches=[watch for watch in watches if watch is not None],
            workers=copies(pyfuncitem),
        )

    call = make_call()
    runner = pyfuncitem.stash[_RUNNER] = backend.start(pyfuncitem)
    if "pytest_concur._explore" in sys.modules:
        from pytest_concur._explore import exploring, run

        if exploring(pyfuncitem):
            run(pyfuncitem, runner, call, make_call)  # each run with fresh watches
            return True
    runner.run(call)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    if call.excinfo is not None and "pytest_concur._locks" in sys.modules:
        from pytest_concur._report import end_at_the_wait

        end_at_the_wait(call.excinfo)  # a deadlock or a hang, under a backend or not
    report = yield
    if call.when == "call" and BACKEND_NAME in item.stash:
        from pytest_concur._report import apply_longrepr

        apply_longrepr(item, call, report)
        from pytest_concur._stress import add_section

        add_section(item, report)
        if "pytest_concur._explore" in sys.modules:
            from pytest_concur._explore import add_section as add_schedule_section

            add_schedule_section(item, report)
    return report


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        if "pytest_concur._shutdown" in sys.modules:
            from pytest_concur import _shutdown

            # The status the process exits with, should stuck threads make us end it early.
            _shutdown.note_exit_status(int(session.exitstatus))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if "pytest_concur._explore" in sys.modules:
        from pytest_concur._explore import summary

        for line in summary(config):
            terminalreporter.write_line(line)
    if "pytest_concur._stress" not in sys.modules:
        return  # no test ran under a backend
    from pytest_concur._stress import serial_summary

    for line in serial_summary(config):
        terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    try:
        yield
    finally:
        if BACKEND_NAME in item.stash:
            _close(item)


def _run_on_item_loop(item: pytest.Item, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the item's own loop, made on first use: a sync body never needs one."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._item_loops import item_loop

    return item_loop(item).run(coro)


def _close(item: pytest.Item) -> None:
    runner = item.stash.get(_RUNNER, None)
    try:
        if runner is not None:
            del item.stash[_RUNNER]
            runner.close()
    finally:
        # No module, no loop: a session of sync bodies need not import asyncio to say so.
        loops = sys.modules.get("pytest_concur._item_loops")
        if loops is not None:
            loops.close_item_loop(item)


def _body_kwargs(item: pytest.Function) -> dict[str, Any]:
    """The fixture values and parameters the test function itself takes."""
    funcargs = item.funcargs
    function = item.obj
    if inspect.ismethod(function):  # a method's items are bound to instances of their own
        names = _parameter_names(function.__func__)[1:]
    else:
        names = _parameter_names(function)
    return {name: funcargs[name] for name in names if name in funcargs}


@functools.lru_cache(maxsize=4096)
def _parameter_names(function: Callable[..., Any]) -> tuple[str, ...]:
    """The names ``function`` takes by keyword: read once per test function, not per item."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins and the like
        return ()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
