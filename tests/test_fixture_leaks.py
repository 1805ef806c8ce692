"""Fixture leaks: what a fixture starts must be over once it is torn down; --concur-check-all."""

from __future__ import annotations

import pytest
from _helpers import FAST, run_fresh, run_maybe_fresh

# Inner runs that leave threads or processes behind run in a fresh interpreter, with a
# limit (_helpers.run_fresh), so a leftover never touches this process and a hang never
# hangs the suite.

# A conftest.py whose fixtures start things; the line numbers below are part of the tests.
SERVERS = """
import threading
import pytest

STOP = threading.Event()


@pytest.fixture
def server():
    thread = threading.Thread(target=STOP.wait, args=(10,), name="srv", daemon=True)
    thread.start()
    yield thread.name  # picklable: the process backend sends it to the child


@pytest.fixture
def tidy_server():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,), name="tidy")
    thread.start()
    yield thread.name
    stop.set()
    thread.join()
"""


def run(pytester: pytest.Pytester, *args: str, fresh: bool = False) -> pytest.RunResult:
    """Run inline, or in a fresh interpreter with a limit when the run forks or starts
    children (the threads the inner tests leave are daemons that their last test stops)."""
    return run_maybe_fresh(pytester, fresh, *args)


def test_thread_a_fixture_leaves_running_is_an_error_at_its_teardown(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini(FAST)
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(
        f"""
        import pytest
        from conftest import STOP

        @pytest.mark.backend("{backend_name}")
        def test_uses_server(server):
            assert server == "srv"

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester, fresh=backend_name == "process")
    # The test itself passed: the fixture, not the test, left the thread.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*ERROR at teardown of test_uses_server[[]{backend_name}[]]*",
            "pytest-concur: fixture 'server' (conftest.py:7) left 1 thread running",
            "  Thread 'srv' (target=Event.wait, daemon) started at conftest.py:10 in server",
            "  Python cannot stop a thread from outside, so it is left running. Make the "
            "fixture stop and join it in its teardown, or allow it: "
            '@pytest.mark.concur_allow(threads=[[]"srv"[]]).',
        ]
    )


def test_fixture_that_stops_its_thread_in_teardown_is_clean(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}")
        @pytest.mark.parametrize("n", range(2))
        def test_uses_server(tidy_server, n):
            assert tidy_server == "tidy"
        """
    )
    run(pytester, fresh=backend_name == "process").assert_outcomes(passed=2)


def test_module_fixture_is_judged_once_at_module_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        test_a="""
        import threading
        import pytest

        STOP = threading.Event()

        @pytest.fixture(scope="module")
        def feed():
            threading.Thread(target=STOP.wait, args=(10,), name="feed", daemon=True).start()

        @pytest.mark.backend("thread", "asyncio")
        @pytest.mark.parametrize("n", range(2))
        def test_reads_feed(feed, n):
            pass
        """,
        test_b="""
        import test_a

        def test_next():
            test_a.STOP.set()
        """,
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_reads_feed[[]asyncio-1[]] PASSED*",
            "*test_reads_feed[[]asyncio-1[]] ERROR*",
            "*ERROR at teardown of test_reads_feed[[]asyncio-1[]]*",
            "pytest-concur: fixture 'feed' (test_a.py:6) left 1 thread running",
        ]
    )
    assert result.stdout.str().count("left 1 thread running") == 1


def test_fixture_that_another_asks_for_owns_what_it_starts(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import threading
        import pytest

        STOP = threading.Event()

        @pytest.fixture
        def inner():
            threading.Thread(target=STOP.wait, args=(10,), name="inner", daemon=True).start()

        @pytest.fixture
        def outer(request):
            request.getfixturevalue("inner")
            threading.Thread(target=STOP.wait, args=(10,), name="outer", daemon=True).start()

        @pytest.mark.backend("thread")
        def test_nested(outer):
            pass

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "pytest-concur: fixture 'outer' (*.py:10) left 1 thread running",
            "  Thread 'outer' (target=Event.wait, daemon) started at *.py:13 in outer",
            "pytest-concur: fixture 'inner' (*.py:6) left 1 thread running",
            "  Thread 'inner' (target=Event.wait, daemon) started at *.py:8 in inner",
        ]
    )


def test_fixture_torn_down_for_its_next_parameter_fails_the_next_setup(
    pytester: pytest.Pytester,
) -> None:
    # pytest tears a parametrized module fixture down while it sets up the next test.
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import threading
        import pytest

        STOP = threading.Event()

        @pytest.fixture(scope="module", params=["a", "b"])
        def feed(request):
            name = f"feed-{request.param}"
            threading.Thread(target=STOP.wait, args=(10,), name=name, daemon=True).start()

        @pytest.mark.backend("thread")
        def test_reads(feed):
            pass

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_reads[[]b-thread[]]*",
            "pytest-concur: fixture 'feed' (*.py:6) left 1 thread running",
            "  Thread 'feed-a' (target=Event.wait, daemon) started at *.py:9 in feed",
        ]
    )


@pytest.mark.parametrize("backend_name", ["thread", "asyncio"])
def test_what_a_fixtures_thread_starts_during_a_test_is_the_fixtures(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # The handler and the child start while the body runs, from the fixture's thread: they
    # are the fixture's, not the test's, though the test asked for them.
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import queue, subprocess, sys, threading
        import pytest

        STOP = threading.Event()

        @pytest.fixture
        def server():
            requests = queue.Queue()

            def serve():
                while (request := requests.get()) is not None:
                    threading.Thread(target=STOP.wait, args=(10,), name="handler", daemon=True).start()
                    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
                    request.set()

            thread = threading.Thread(target=serve, name="server")
            thread.start()
            yield requests
            requests.put(None)
            thread.join()

        @pytest.mark.backend("{backend_name}")
        def test_asks_for_a_handler(server):
            done = threading.Event()
            server.put(done)
            assert done.wait(5)

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester, fresh=True)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*ERROR at teardown of test_asks_for_a_handler[[]{backend_name}[]]*",
            "pytest-concur: fixture 'server' (*.py:6) left 1 child process running",
            "  Process *python* -c 'import time; time.sleep(30)'* (pid *) started at *.py:13 "
            "in *serve",
            "*",
            "pytest-concur: fixture 'server' (*.py:6) left 1 thread running",
            "  Thread 'handler' (target=Event.wait, daemon) started at *.py:12 in *serve",
        ]
    )


def test_child_processes_a_fixture_leaves_running_are_stopped(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import multiprocessing, subprocess, sys, time
        import pytest

        CHILDREN = []

        @pytest.fixture
        def children():
            process = multiprocessing.get_context("spawn").Process(
                target=time.sleep, args=(30,), name="sleeper"
            )
            process.start()
            command = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            CHILDREN.extend([process, command])
            yield

        @pytest.mark.backend("thread")
        def test_uses_children(children):
            pass

        def test_next_sees_them_stopped():
            assert not CHILDREN[0].is_alive()
            assert CHILDREN[1].poll() is not None
        """
    )
    result = run(pytester, fresh=True)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: fixture 'children' (*.py:6) left 2 child processes running",
            "  Process 'sleeper' (pid *, target=sleep) started at *.py:11 in children",
            "  Process *python* -c 'import time; time.sleep(30)'* (pid *) started at *.py:12 in "
            "children",
            "  pytest-concur stopped them (SIGTERM, then SIGKILL after 1 s). Join or wait for "
            "every process the fixture starts, *",
        ]
    )


def test_thread_pool_a_fixture_never_shuts_down_is_shut_down(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        import pytest

        POOLS = []

        @pytest.fixture
        def pool():
            pool = ThreadPoolExecutor(2, thread_name_prefix="fetchers")
            pool.submit(abs, -1).result()
            POOLS.append(pool)  # kept, not returned: the process backend pickles values

        @pytest.mark.backend("{backend_name}")
        def test_uses_pool(pool):
            pass

        def test_next_sees_no_workers():
            assert not [t for t in threading.enumerate() if t.name.startswith("fetchers")]
        """
    )
    result = run(pytester, fresh=backend_name == "process")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: fixture 'pool' (*.py:7) left 1 thread pool open",
            "  ThreadPoolExecutor 'fetchers' with 1 worker thread, created at *.py:9 in "
            "pool, was never shut down",
        ]
    )


def test_task_an_async_fixture_leaves_pending_is_reported_and_cancelled(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        CANCELLED = []

        async def tick():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                CANCELLED.append(True)
                raise

        @pytest.fixture
        async def ticker():
            asyncio.create_task(tick(), name="ticker")
            yield

        @pytest.mark.backend("{backend_name}")
        async def test_uses_ticker(ticker):
            pass

        def test_next_sees_it_cancelled():
            assert CANCELLED == [True]
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*ERROR at teardown of test_uses_ticker[[]{backend_name}[]]*",
            "pytest-concur: fixture 'ticker' (*.py:13) left 1 task pending",
            "  Task 'ticker' (coroutine=tick) created at *.py:15 in ticker",
            "  pytest-concur cancelled it. Await every task the fixture creates *, or cancel "
            "it and await it in its teardown.",
        ]
    )


def test_async_fixture_that_cancels_its_task_is_clean(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, contextlib
        import pytest

        @pytest.fixture
        async def ticker():
            task = asyncio.create_task(asyncio.sleep(3600))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        @pytest.mark.backend("thread", "asyncio")
        async def test_uses_ticker(ticker):
            await asyncio.sleep(0)
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)


ALLOWED = """
import threading
import pytest

STOP = threading.Event()

@pytest.fixture
def server():
    threading.Thread(target=STOP.wait, args=(10,), name="srv", daemon=True).start()

@pytest.mark.backend("thread")
{marker}
def test_uses_server(server):
    pass

def test_next():
    STOP.set()
"""


@pytest.mark.parametrize(
    "marker",
    [
        '@pytest.mark.concur_allow(threads=["srv"])',
        '@pytest.mark.concur_allow(started_by=["server"])',
        '@pytest.mark.concur_allow(checks_off=["threads"])',
    ],
    ids=["threads", "started_by", "checks_off"],
)
def test_marker_on_the_test_allows_its_function_fixtures_leftovers(
    pytester: pytest.Pytester, marker: str
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(ALLOWED.format(marker=marker))
    run(pytester).assert_outcomes(passed=2)


def test_ini_allow_list_applies_to_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST + "concur_allow_threads = srv\n")
    pytester.makepyfile(ALLOWED.format(marker=""))
    run(pytester).assert_outcomes(passed=2)


def test_module_marker_allows_a_module_fixtures_leftovers(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import threading
        import pytest

        pytestmark = pytest.mark.concur_allow(threads=["feed"])
        STOP = threading.Event()

        @pytest.fixture(scope="module")
        def feed():
            threading.Thread(target=STOP.wait, args=(10,), name="feed", daemon=True).start()

        @pytest.mark.backend("thread")
        def test_reads_feed(feed):
            pass

        def test_next():
            STOP.set()
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_fixture_teardown_error_and_leak_are_both_reported(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(
        """
        import pytest
        from conftest import STOP

        @pytest.fixture
        def broken(server):
            yield
            raise RuntimeError("teardown broke")

        @pytest.mark.backend("thread")
        def test_uses_broken(broken):
            pass

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "E       RuntimeError: teardown broke",
            "*pytest-concur also found:",
            "*pytest-concur: fixture 'server' (conftest.py:7) left 1 thread running",
        ]
    )


def test_fixture_torn_down_after_the_last_test_is_reported_on_the_terminal(
    pytester: pytest.Pytester,
) -> None:
    # After pytest.exit(), pytest tears the module's fixtures down when the session ends,
    # outside any test.
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture(scope="module")
        def feed():
            stop = threading.Event()
            threading.Thread(target=stop.wait, args=(10,), name="feed", daemon=True).start()

        @pytest.mark.backend("thread")
        def test_uses_feed(feed):
            pass

        def test_stops_the_session(feed):
            pytest.exit("enough")
        """
    )
    result = run(pytester, fresh=True)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*= pytest-concur: fixtures torn down after the last test =*",
            "pytest-concur: fixture 'feed' (*.py:4) left 1 thread running",
            "  Thread 'feed' (target=Event.wait, daemon) started at *.py:7 in feed",
        ]
    )


def test_fixtures_of_plain_tests_are_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(
        """
        import threading
        from conftest import STOP

        def test_uses_server(server):
            threading.Thread(target=STOP.wait, args=(10,), daemon=True).start()

        def test_next():
            STOP.set()
        """
    )
    run(pytester).assert_outcomes(passed=2)


# -- --concur-check-all ---------------------------------------------------------------


PLAIN = """
import threading
import pytest
from conftest import STOP

def test_leaks_a_thread():
    threading.Thread(target=STOP.wait, args=(10,), name="stray", daemon=True).start()

def test_clean():
    thread = threading.Thread(target=abs, args=(-1,))
    thread.start()
    thread.join()

def test_thread_raises():
    def fail():
        raise ValueError("bad record 7")
    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join()

def test_uses_server(server):
    pass

def test_next():
    STOP.set()
"""


@pytest.mark.parametrize(
    ("args", "ini"),
    [(["--concur-check-all"], ""), ([], "concur_check_all_tests = true\n")],
    ids=["option", "ini"],
)
def test_check_all_checks_plain_tests_and_their_fixtures(
    pytester: pytest.Pytester, args: list[str], ini: str
) -> None:
    pytester.makeini(FAST + ini)
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(PLAIN)
    result = run(pytester, "-v", *args)
    result.assert_outcomes(passed=3, failed=2, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_leaks_a_thread FAILED*",
            "*::test_clean PASSED*",
            "*::test_thread_raises FAILED*",
            "*::test_uses_server ERROR*",
            "pytest-concur: the test left 1 thread running",
            "  Thread 'stray' (target=Event.wait, daemon) started at *.py:6 in test_leaks_a_thread",
            "*pytest-concur: an exception was raised in thread 'worker' started at *.py:17 in "
            "test_thread_raises*",
            "ValueError: bad record 7",
            "pytest-concur: fixture 'server' (conftest.py:7) left 1 thread running",
        ]
    )


def test_without_check_all_plain_tests_are_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makeconftest(SERVERS)
    pytester.makepyfile(PLAIN)
    # pytest's own hook reports the thread's exception as a warning, as without the plugin.
    result = run(pytester, "-W", "ignore::pytest.PytestUnhandledThreadExceptionWarning")
    result.assert_outcomes(passed=5)


def test_check_all_finds_locks_taken_in_both_orders_in_a_plain_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading

        def test_inverts():
            a, b = threading.Lock(), threading.Lock()
            with a, b:
                pass
            with b, a:
                pass
        """
    )
    result = pytester.runpytest("--concur-check-all")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*potential deadlock: two locks are taken in both orders*"])


def test_check_all_leaves_pytest_asyncio_and_anyio_tests_working(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_asyncio")
    pytest.importorskip("anyio")
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio, threading
        import pytest
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def resource():
            task = asyncio.create_task(asyncio.sleep(0))
            yield 1
            await task

        @pytest.mark.asyncio
        async def test_marked(resource):
            assert resource == 1
            assert await asyncio.to_thread(abs, -2) == 2

        @pytest.mark.asyncio
        async def test_leaks_a_thread():
            threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        async def test_anyio():
            await asyncio.sleep(0)
        """
    )
    result = run_fresh(pytester, "-v", "--concur-check-all")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_marked PASSED*",
            "*::test_leaks_a_thread FAILED*",
            "*::test_anyio PASSED*",
            "pytest-concur: the test left 1 thread running",
        ]
    )


def test_check_all_sees_the_tasks_of_pytest_asyncio_and_anyio_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their loops are made by their fixtures, before the watch; the tasks the test body
    # creates on them are still the test's (not the runner's own, nor a fixture's).
    pytest.importorskip("pytest_asyncio")
    pytest.importorskip("anyio")
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio
        import pytest
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def background():
            task = asyncio.create_task(asyncio.sleep(0.01))
            yield task
            await task

        @pytest.mark.asyncio
        async def test_leaves_a_task():
            asyncio.create_task(asyncio.sleep(10), name="forgotten")

        @pytest.mark.asyncio(loop_scope="module")
        async def test_leaves_a_task_on_a_module_loop():
            asyncio.create_task(asyncio.sleep(10), name="forgotten-too")

        @pytest.mark.asyncio
        async def test_loses_an_exception():
            async def boom():
                raise ValueError("lost")
            asyncio.create_task(boom())
            await asyncio.sleep(0.01)

        @pytest.mark.asyncio
        async def test_awaits_its_tasks(background):
            await asyncio.gather(asyncio.create_task(asyncio.sleep(0)), background)

        @pytest.fixture(scope="module")
        def anyio_backend():
            return "asyncio"

        @pytest.fixture(scope="module")
        async def shared_runner(anyio_backend):
            yield

        @pytest.mark.anyio
        async def test_anyio_leaves_a_task(shared_runner):
            asyncio.create_task(asyncio.sleep(10), name="anyio-forgotten")

        @pytest.mark.anyio
        async def test_anyio_awaits_its_task(shared_runner):
            await asyncio.create_task(asyncio.sleep(0))
        """
    )
    result = run_fresh(pytester, "-v", "--concur-check-all")
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_leaves_a_task FAILED*",
            "*::test_leaves_a_task_on_a_module_loop FAILED*",
            "*::test_loses_an_exception FAILED*",
            "*::test_awaits_its_tasks PASSED*",
            "*::test_anyio_leaves_a_task FAILED*",
            "*::test_anyio_awaits_its_task PASSED*",
            "  Task 'forgotten' (coroutine=sleep) created at test_*.py:* in test_leaves_a_task",
            "  Task 'forgotten-too' (coroutine=sleep) created at *",
            "  Task 'anyio-forgotten' (coroutine=sleep) created at *",
            "*task 'Task-*' (coroutine=*boom) created at * raised an exception that nobody*",
        ]
    )


def test_check_all_sees_a_blocked_loop_of_pytest_asyncio_and_anyio_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_asyncio")
    pytest.importorskip("anyio")
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.asyncio
        async def test_blocks():
            await asyncio.sleep(0)
            time.sleep(0.3)

        @pytest.mark.asyncio
        async def test_does_not_block():
            await asyncio.sleep(0.3)

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        async def test_anyio_blocks():
            time.sleep(0.3)
        """
    )
    result = run_fresh(pytester, "-v", "--concur-check-all")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_blocks FAILED*",
            "*::test_does_not_block PASSED*",
            "*::test_anyio_blocks FAILED*",
            # The step of pytest-asyncio's task for the test (on 3.10 the C task's step is
            # named as a callback, Task.__step).
            "*held the event loop for * s*",
            "    blocked at *.py:7 in test_blocks: time.sleep(0.3)",
            # anyio runs the test inside its runner task: the step is that task's.
            "  task '*' running TestRunner.*() held the event loop for * s in one step*",
            "    blocked at *.py:19 in test_anyio_blocks: time.sleep(0.3)",
        ]
    )
