"""Leak checks: nothing a test body starts may outlive it unnoticed."""

from __future__ import annotations

import pytest
from _helpers import FAST, run_maybe_fresh

# Tests that leave threads or processes behind run pytest in a fresh interpreter, with a
# limit, so a leftover never touches this process and a hang never hangs the suite.
from _helpers import run_fresh as run


def test_leaked_thread_is_named_with_its_target_and_start_site(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        STOP = threading.Event()

        def poll_forever():
            STOP.wait()

        @pytest.mark.backend("{backend_name}")
        def test_leaks():
            threading.Thread(target=poll_forever, name="worker-1", daemon=True).start()

        def test_next():
            STOP.set()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 thread running",
            "  Thread 'worker-1' (target=poll_forever, daemon) started at "
            "test_leaked_thread_is_named_with_its_target_and_start_site.py:11 in test_leaks",
            "  Python cannot stop a thread from outside, so it is left running.*"
            'concur_allow(threads=[[]"worker-1"[]]).',
        ]
    )


def test_thread_that_ends_within_the_grace_period_is_not_a_leak(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import threading, time
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_finishes_late():
            threading.Thread(target=time.sleep, args=(0.05,), name="slow").start()
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_grace_period_is_the_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_leak_grace = 0\n")
    pytester.makepyfile(
        """
        import threading, time
        import pytest

        @pytest.mark.backend("thread")
        def test_finishes_late():
            threading.Thread(target=time.sleep, args=(0.3,), name="slow").start()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  Thread 'slow' (target=sleep*) started at *"])


def test_bad_grace_period_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_leak_grace = soon\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*concur_leak_grace = 'soon' is not a number of seconds; write e.g. *"]
    )


def test_a_clean_test_does_not_wait(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_leak_grace = 30\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "process", "asyncio")
        @pytest.mark.parametrize("n", range(5))
        def test_nothing(n):
            pass
        """
    )
    result = run(pytester, "--durations=0", "--durations-min=0.5")
    result.assert_outcomes(passed=15)
    result.stdout.no_fnmatch_line("*s call *test_nothing*")


def test_a_pool_made_before_the_test_is_left_alone(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # asgiref keeps such a pool in a class attribute: its worker starts when a test first
    # uses it, and is meant to serve every later test. Not the test's pool, not a leak;
    # and shutting it down would break the tests after.
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        from concurrent.futures import ThreadPoolExecutor
        import pytest

        SHARED = ThreadPoolExecutor(1, thread_name_prefix="shared")

        @pytest.mark.backend("{backend_name}")
        def test_first_use():
            assert SHARED.submit(abs, -1).result() == 1

        def test_still_serves():
            assert SHARED.submit(abs, -2).result() == 2
        """
    )
    run(pytester).assert_outcomes(passed=2)
    run(pytester, "--concur-check-all", "-p", "no:randomly").assert_outcomes(passed=2)


def test_thread_pool_left_open_is_shut_down(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        import pytest

        POOLS = []

        @pytest.mark.backend("{backend_name}")
        def test_leaves_pool_open():
            pool = ThreadPoolExecutor(2, thread_name_prefix="fetchers")
            POOLS.append(pool)
            pool.submit(abs, -1).result()

        def test_next_sees_no_workers():
            assert not [t for t in threading.enumerate() if t.name.startswith("fetchers")]
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 thread pool open",
            "  ThreadPoolExecutor 'fetchers' with 1 worker thread, created at "
            "test_thread_pool_left_open_is_shut_down.py:9 in test_leaves_pool_open, "
            "was never shut down",
            "  pytest-concur shut it down*",
        ]
    )


CORRECT_USE = """
import asyncio, multiprocessing, threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import pytest

pytestmark = pytest.mark.backend("{backend}")

def test_thread_pool_as_context_manager():
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]

def test_process_pool_as_context_manager():
    with ProcessPoolExecutor(2) as pool:
        assert list(pool.map(abs, [-1, -2])) == [1, 2]

def test_multiprocessing_pool_as_context_manager():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]

def test_joined_thread_and_process():
    thread = threading.Thread(target=abs, args=(-1,))
    thread.start()
    thread.join()
    process = multiprocessing.get_context("spawn").Process(target=abs, args=(-1,))
    process.start()
    process.join()
    assert process.exitcode == 0

async def test_gather_task_group_and_to_thread():
    assert await asyncio.gather(asyncio.sleep(0, 1), asyncio.to_thread(abs, -2)) == [1, 2]
    if hasattr(asyncio, "TaskGroup"):  # 3.11+
        async with asyncio.TaskGroup() as group:
            task = group.create_task(asyncio.sleep(0, 3))
        assert task.result() == 3
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, abs, -4) == 4

async def test_cancelled_and_awaited_task():
    task = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

def test_asyncio_run_in_a_sync_body():
    if "{backend}" != "asyncio":
        assert asyncio.run(asyncio.to_thread(abs, -5)) == 5
"""


def test_correct_use_of_pools_tasks_and_threads_is_not_a_leak(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(CORRECT_USE.format(backend=backend_name))
    run(pytester).assert_outcomes(passed=7)


@pytest.mark.parametrize("backend_name", ["thread", "asyncio"])
def test_thread_of_a_module_fixture_is_not_blamed_on_its_tests(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # Not under "process": the fixture's thread runs in the pytest process, not in the child.
    pytester.makepyfile(
        f"""
        import queue, threading
        import pytest

        @pytest.fixture(scope="module")
        def server():
            requests = queue.Queue()

            def serve():
                while (request := requests.get()) is not None:
                    # Handler threads of the fixture's own thread are the fixture's too.
                    threading.Thread(target=request.set).start()

            thread = threading.Thread(target=serve, name="server")
            thread.start()
            yield requests
            requests.put(None)
            thread.join()

        @pytest.mark.backend("{backend_name}")
        @pytest.mark.parametrize("n", range(3))
        def test_uses_server(server, n):
            done = threading.Event()
            server.put(done)
            assert done.wait(5)
        """
    )
    run(pytester).assert_outcomes(passed=3)


def test_pending_task_is_reported_and_cancelled(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        cancelled = []

        async def poll_forever():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        @pytest.mark.backend("{backend_name}")
        async def test_leaves_a_task():
            asyncio.create_task(poll_forever(), name="poller")
            await asyncio.sleep(0)
            if "{backend_name}" == "process":
                print("child saw", cancelled)

        @pytest.mark.backend("{backend_name}")
        async def test_next_is_clean():
            if "{backend_name}" != "process":
                assert cancelled == [True]
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 task pending",
            "  Task 'poller' (coroutine=poll_forever) created at "
            "test_pending_task_is_reported_and_cancelled.py:15 in test_leaves_a_task",
            "  pytest-concur cancelled it.*",
        ]
    )


def test_task_left_by_a_sync_body_under_asyncio_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.backend("asyncio")
        def test_schedules_and_forgets():
            asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    # (3.13.0 names a task made through a task factory 'None'.)
    result.stdout.fnmatch_lines(["  Task '*' (coroutine=sleep) created at *:6 in *"])


def test_unclosed_event_loop_is_reported_and_closed(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        LOOPS = []

        @pytest.mark.backend("{backend_name}")
        def test_opens_a_loop():
            LOOPS.append(asyncio.new_event_loop())

        def test_next_sees_it_closed():
            assert all(loop.is_closed() for loop in LOOPS)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 event loop open",
            "  *EventLoop created at test_unclosed_event_loop_is_reported_and_closed.py:8 in "
            "test_opens_a_loop",
        ]
    )


def test_leaked_child_processes_are_reported_and_stopped(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import multiprocessing, subprocess, sys, time
        import pytest

        PIDS = []

        @pytest.mark.backend("{backend_name}")
        def test_leaves_children():
            process = multiprocessing.get_context("spawn").Process(
                target=time.sleep, args=(60,), name="sleeper"
            )
            process.start()
            popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            PIDS.extend([process.pid, popen.pid])

        def test_next_sees_them_gone():
            import os
            for pid in PIDS:
                with pytest.raises(OSError):  # reaped, so no such process
                    os.kill(pid, 0)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 2 child processes running",
            "  Process 'sleeper' (pid *, target=sleep) started at "
            "test_leaked_child_processes_are_reported_and_stopped.py:11 in test_leaves_children",
            "  Process *import time; time.sleep(60)* (pid *) started at "
            "test_leaked_child_processes_are_reported_and_stopped.py:12 in test_leaves_children",
            "  pytest-concur stopped them (SIGTERM, then SIGKILL after 1 s).*",
        ]
    )


def test_process_pools_left_open_are_terminated(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        f"""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        import pytest

        POOLS = []

        @pytest.mark.backend("{backend_name}")
        def test_leaves_pools_open():
            context = multiprocessing.get_context("spawn")
            pool = context.Pool(2)
            executor = ProcessPoolExecutor(1, mp_context=context)
            POOLS.extend([pool, executor])
            assert pool.apply(abs, (-1,)) == executor.submit(abs, -1).result() == 1

        def test_next_sees_no_children():
            assert multiprocessing.active_children() == []
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 2 process pools open",
            "  Pool with 2 worker processes created at *.py:10 in test_leaves_pools_open "
            "was never closed",
            "  ProcessPoolExecutor with 1 worker process created at *.py:11 in "
            "test_leaves_pools_open was never shut down",
            "  pytest-concur terminated them.*",
        ]
    )
    # Their helper threads are the pools', not reported on their own.
    result.stdout.no_fnmatch_line("*left * thread*")


def test_pool_whose_terminate_gets_stuck_does_not_hang_the_session(
    pytester: pytest.Pytester,
) -> None:
    # A worker killed while it holds the lock the pool's workers share leaves
    # Pool.terminate() waiting for that lock forever.
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import multiprocessing, os, signal, time
        import pytest

        @pytest.mark.backend("thread")
        def test_leaves_a_broken_pool():
            pool = multiprocessing.get_context("fork").Pool(1)
            assert pool.apply(abs, (-1,)) == 1
            time.sleep(0.1)  # the worker waits for its next task, holding the queue's lock
            os.kill(pool._pool[0].pid, signal.SIGKILL)
            time.sleep(0.1)

        def test_next():
            pass
        """
    )
    result = run(pytester, "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 process pool open",
            "  Pool with 1 worker process created at *.py:6 in test_leaves_a_broken_pool "
            "was never closed",
            "  its terminate() got stuck*pytest-concur killed its worker processes",
        ]
    )


def test_leak_report_is_added_to_a_failing_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.backend("thread")
        def test_fails_and_leaks():
            threading.Thread(target=threading.Event().wait, name="stuck", daemon=True).start()
            assert 1 == 2
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       assert 1 == 2",
            "*pytest-concur also found:*",
            "*pytest-concur: the test left 1 thread running",
        ]
    )


def test_plain_tests_are_not_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading

        def test_plain_leak():
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        """
    )
    run(pytester).assert_outcomes(passed=1)


# -- allow-lists ---------------------------------------------------------------------------

ALLOWED = """
import asyncio, subprocess, sys, threading
import pytest

STOP = threading.Event()

def start_metrics():
    threading.Thread(target=STOP.wait, name="reporter", daemon=True).start()

@pytest.mark.backend("thread")
@pytest.mark.concur_allow(threads=["metrics-*"])
def test_by_thread_name():
    threading.Thread(target=STOP.wait, name="metrics-1", daemon=True).start()

@pytest.mark.backend("thread")
@pytest.mark.concur_allow(threads=["*.wait"])
def test_by_thread_target():
    threading.Thread(target=STOP.wait, name="w", daemon=True).start()

@pytest.mark.backend("thread")
@pytest.mark.concur_allow(started_by=["start_metrics"])
def test_by_the_function_that_started_it():
    start_metrics()

@pytest.mark.backend("asyncio")
@pytest.mark.concur_allow(tasks=["heartbeat"])
async def test_task_by_name():
    asyncio.create_task(asyncio.sleep(3600), name="heartbeat")

@pytest.mark.backend("thread")
@pytest.mark.concur_allow(checks_off=["threads", "processes"])
def test_checks_off():
    threading.Thread(target=STOP.wait, daemon=True).start()

@pytest.mark.backend("thread")
def test_not_allowed():
    threading.Thread(target=STOP.wait, name="other", daemon=True).start()

def test_last():
    STOP.set()
"""


def test_allow_marker_by_name_target_starter_and_check(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(ALLOWED)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*test_not_allowed*FAILED*"])


def test_allow_ini_keys_apply_to_every_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        concur_leak_grace = 0.2
        concur_allow_threads =
            metrics-*
        concur_allow_processes =
            sleep*
        concur_checks_off = tasks
        """
    )
    pytester.makepyfile(
        """
        import asyncio, subprocess, threading
        import pytest

        @pytest.mark.backend("thread")
        def test_allowed_by_ini():
            threading.Thread(target=threading.Event().wait, name="metrics-7", daemon=True).start()
            subprocess.Popen(["sleep", "0.5"])

        @pytest.mark.backend("asyncio")
        async def test_tasks_check_off():
            asyncio.create_task(asyncio.sleep(3600))
        """
    )
    run(pytester).assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        pytest.param(
            '"threads"',
            "In test_x[[]thread[]]: @pytest.mark.concur_allow takes keyword arguments only, "
            "got ('threads',). Write e.g. *",
            id="positional",
        ),
        pytest.param(
            'thread=["x"]',
            "In test_x[[]thread[]]: @pytest.mark.concur_allow got an unknown keyword 'thread'; "
            "the keywords are: threads, tasks, processes, started_by, checks_off.",
            id="unknown-keyword",
        ),
        pytest.param(
            "threads=[1]",
            "In test_x[[]thread[]]: @pytest.mark.concur_allow threads= takes a list of strings, "
            "got [[]1[]]. Write e.g. *",
            id="not-strings",
        ),
        pytest.param(
            'checks_off=["thread"]',
            "In test_x[[]thread[]]: @pytest.mark.concur_allow checks_off names an unknown check "
            "'thread'; the checks are: threads, tasks, processes, blocked_loop, futures, callbacks.",
            id="unknown-check",
        ),
    ],
)
def test_bad_allow_marker_names_the_fix(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.concur_allow({marker})
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([message])


def test_unknown_check_in_ini_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_checks_off = thread\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*unknown check 'thread' in concur_checks_off; the checks are: threads, tasks, "
            "processes, blocked_loop, futures, callbacks."
        ]
    )


def test_threads_the_body_starts_are_what_they_are_in_a_plain_run(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # Under the thread backend the body runs in a thread of ours: a thread it starts
    # inherits that thread's daemon flag, which must be the main thread's (not a daemon).
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        def check():
            t = threading.Thread(target=lambda: None)
            assert not t.daemon
            t.start()
            t.join()

        @pytest.mark.backend("{backend_name}")
        def test_body():
            check()

        @pytest.mark.backend("{backend_name}", workers=2)
        def test_copies():
            check()
        """
    )
    # Every thread is joined: inline, but for the process backend, which forks.
    run_maybe_fresh(pytester, backend_name == "process").assert_outcomes(passed=2)


def test_a_manager_left_running_is_named_with_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import multiprocessing
        import pytest

        KEPT = []

        @pytest.mark.backend("thread")
        def test_keeps_a_manager():
            KEPT.append(multiprocessing.Manager())
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the test left 1 child process running",
            "  Process 'SyncManager-*' (pid *, target=BaseManager._run_server) started at *:8*",
            "*Shut down every multiprocessing manager (manager.shutdown(), or with "
            "multiprocessing.Manager() as manager: ...)*",
        ]
    )


LIBRARY = """
import asyncio, multiprocessing, threading, time

STOP = threading.Event()

class Cache:
    def __init__(self):
        self._thread = threading.Thread(target=STOP.wait, name="sweeper")
        self._thread.start()

class Pool:
    async def open(self):
        self._task = asyncio.ensure_future(asyncio.sleep(100))

class Farm:
    def start(self):
        self._child = multiprocessing.Process(target=time.sleep, args=(60,), name="farmer")
        self._child.start()
"""


def test_leak_reports_name_the_test_line_that_built_or_called_the_library(
    pytester: pytest.Pytester,
) -> None:
    # The start call is the library's; the line that tells one leak from another is the
    # test's (or its fixture's) that built the object or called the method. (Methods are
    # named by qualname from 3.11 on: "*__init__" stands for Cache.__init__.)
    pytester.makeini(FAST)
    pytester.makepyfile(library=LIBRARY)
    pytester.makeconftest(
        """
        import pytest
        import library

        @pytest.fixture
        def cache():
            return library.Cache()
        """
    )
    pytester.makepyfile(
        """
        import pytest
        import library

        @pytest.mark.backend("thread")
        def test_cache_in_body():
            library.Cache()

        @pytest.mark.backend("thread")
        def test_cache_of_a_fixture(cache):
            pass

        @pytest.mark.backend("asyncio")
        async def test_pool():
            pool = library.Pool()
            await pool.open()

        @pytest.mark.backend("thread")
        def test_farm():
            library.Farm().start()

        @pytest.mark.backend("thread")
        def test_started_by_the_test_itself():
            import threading
            threading.Thread(target=library.STOP.wait, name="own").start()
        """
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*Thread 'sweeper' (target=Event.wait) started at library.py:8 in *__init__ "
            "(object made at conftest.py:6 in cache)",
            "*Thread 'sweeper' (target=Event.wait) started at library.py:8 in *__init__ "
            "(object made at test_leak_reports_*.py:6 in test_cache_in_body)",
            "*Task * created at library.py:12 in *open "
            "(called from test_leak_reports_*.py:15 in test_pool)",
            "*'farmer'*started at library.py:17 in *start "
            "(called from test_leak_reports_*.py:19 in test_farm)",
        ]
    )
    # Started by the test's own line: nothing to add.
    result.stdout.fnmatch_lines(
        ["*Thread 'own' (target=Event.wait) started at test_leak*.py:24 in*"]
    )
    assert "(called from" not in "".join(
        line for line in result.stdout.lines if "Thread 'own'" in line
    )
