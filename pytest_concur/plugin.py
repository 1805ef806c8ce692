"""The ``pytest11`` entry point of pytest-concur: options, markers and the wiring of hooks.

This module stays cheap to import: what runs a body under a backend (threads,
multiprocessing, asyncio) is imported when the first test needs it, not by
``pytest --version``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _claim, _marker, _registry
from pytest_concur._items import MARKER_ERRORS
from pytest_concur._state import BACKEND_NAME, FIXTURE
from pytest_concur._state import parametrized_backend as _backend_name

if TYPE_CHECKING:
    from pytest_concur._workers._concur import Concur

_TRACKING_LOCKS = pytest.StashKey[bool]()
# Ends the session's lock tracking once (see _track_locks and pytest_collection_finish).
_UNTRACK_LOCKS = pytest.StashKey[Callable[[], None]]()

# The plugins whose hooks run for every item and have nothing to do for an item that runs
# plainly: a session in which no item runs under a backend unregisters them (see
# pytest_collection_finish). The summary's collector stays: it answers for the session.
_ITEMS = "concur-items"
_PER_ITEM_PLUGINS = (
    _ITEMS,
    "concur-summary",
    "concur-timeout",
    "concur-async-fixtures",
    "concur-unittest",
    "concur-fixture-checks",
    "concur-fixture-thread-errors",
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_concur import hookspecs

    pluginmanager.add_hookspecs(hookspecs)
    # The hooks around each item, registered right after this module (pytest calls this as
    # it registers us), in its place among the plugins: before the conftest files and the
    # plugins of later entry points, whose wrappers of the same hooks stay outside ours.
    from pytest_concur import _items

    if pluginmanager.get_plugin(_ITEMS) is None:
        pluginmanager.register(_items, _ITEMS)


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
    untracked = False

    def untrack() -> None:
        nonlocal untracked  # once: the installs of nested sessions (pytester) are a stack
        if not untracked:
            untracked = True
            _locks.uninstall()

    config.stash[_UNTRACK_LOCKS] = untrack
    # Run by _ensure_unconfigure, which pytest calls on every way out, a failed start too.
    config.add_cleanup(untrack)


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
    # Made now, even in a session without backends: a bad ini key of a check is a usage
    # error whichever tests a run selects.
    _registry.checks(config)
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


@pytest.fixture
def concur_backend() -> str | None:
    """The name of the backend this test runs under, or ``None`` outside pytest-concur."""
    # Items that run under a backend get this name parametrized with the backend's (see
    # pytest_generate_tests), so this body only runs for the others that ask for it. Not
    # autouse: every test of every session with the plugin installed would pay for it.
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
    except pytest.fail.Exception as exc:
        # Raised here it would be a collection error of the whole module: make it an
        # error of this test alone, at its setup (see pytest_runtest_setup).
        errors = metafunc.config.stash.setdefault(MARKER_ERRORS, {})
        errors[metafunc.definition.nodeid] = str(exc.msg or exc)
        return
    if FIXTURE not in metafunc.fixturenames:
        # Parametrizing a name requires that the function uses it. Named here for the
        # functions that run under a backend only; pytest prunes it again from the items
        # whose function does not ask for it, and their callspec keeps the backend's name,
        # which is all the plugin reads (_state.parametrized_backend).
        metafunc.fixturenames.append(FIXTURE)
    metafunc.parametrize(
        FIXTURE,
        [
            pytest.param(name, id=name, marks=getattr(pytest.mark, f"concur_{name}"))
            for name in selection.names
        ],
        scope="function",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """No item runs under a backend: the per-item hooks and the lock tracking go.

    What a plain session pays for the plugin is then its session hooks and the summary's
    collector; the locks made from here on are plain ones (they could only matter to a body
    run under a backend). Decided in each process that runs items (each xdist worker for
    its own collection).
    """
    config = session.config
    if _uses_backends(session):
        return
    pluginmanager = config.pluginmanager
    for name in _PER_ITEM_PLUGINS:
        plugin = pluginmanager.get_plugin(name)
        if plugin is not None:
            pluginmanager.unregister(plugin)
    untrack = config.stash.get(_UNTRACK_LOCKS, None)
    if untrack is not None:
        untrack()


def _uses_backends(session: pytest.Session) -> bool:
    """Whether any item needs the per-item hooks: it runs under a backend, its marker was
    rejected (it fails at setup), or the checks watch plain tests too."""
    config = session.config
    if config.stash.get(MARKER_ERRORS, None) or _check_all(config):
        return True
    return any(
        _backend_name(item) is not None or BACKEND_NAME in item.stash for item in session.items
    )


def _check_all(config: pytest.Config) -> bool:
    from pytest_concur._checks.fixtures import check_all

    return check_all(config)


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
