"""Hangs that are not deadlocks: a failure at the deadline with a report, and the session goes on.

Each inner run is a subprocess with an outer timeout, so a regression fails here instead of
hanging the suite. Deadlines are sub-second.
"""

from __future__ import annotations

import os
import sys

import pytest
from _helpers import NO_RANDOMLY, runner

run = runner(*NO_RANDOMLY)


BUSY = """
import threading, time
import pytest

@pytest.mark.backend({backend!r})
@pytest.mark.timeout(0.5)
def test_busy():
    lock = threading.Lock()

    def spin():
        with lock:
            while True:
                time.sleep(0)

    threading.Thread(target=spin, name="spinner", daemon=True).start()
    time.sleep(0.05)
    with lock:
        pass

def test_next():
    pass
"""


def test_busy_thread_fails_at_the_deadline_with_every_stack(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(BUSY.format(backend=backend_name))
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>0.5s, the pytest-timeout setting): pytest-concur found no deadlock, but "
            f"test_busy[[]{backend_name}[]] under the {backend_name} backend did not finish*",
        ]
    )
    if backend_name == "process":
        # The child's own report, made when asked: its threads, what they hold.
        result.stdout.fnmatch_lines(
            [
                "Child processes:",
                "  pid *: * [[]state *[]]",
                "    Threads (most recent call last):",
                "      Thread 'MainThread' (the test body):",
                '          File "*test_busy_thread_fails*.py", line 16, in test_busy',
                "        waits for Lock created at *:7 in test_busy, held by 'spinner'*",
                "      Thread 'spinner' (started by the test, daemon):",
                '          File "*test_busy_thread_fails*.py", line 12, in spin',
                "        holds Lock created at *:7 in test_busy",
            ]
        )
        assert "Captured stderr call" not in result.stdout.str()  # not printed twice
    else:
        result.stdout.fnmatch_lines(
            [
                "Threads (most recent call last):",
                "  Thread * (the test body*):",
                '      File "*test_busy_thread_fails*.py", line 16, in test_busy',
                "        with lock:",
                "    waits for Lock created at test_busy_thread_fails*.py:7 in test_busy, "
                "held by 'spinner'*",
                "  Thread 'spinner' (started by the test, daemon):",
                '      File "*test_busy_thread_fails*.py", line 12, in spin',
                "    holds Lock created at test_busy_thread_fails*.py:7 in test_busy",
            ]
        )
    # pytest's and pytest-concur's own frames are not where the test stands.
    assert "/pluggy/" not in result.stdout.str()
    assert "/_pytest/" not in result.stdout.str()
    assert "/pytest_concur/" not in result.stdout.str()


def test_pending_tasks_are_shown_with_their_await_chain(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        async def fetch():
            await asyncio.sleep(3600)

        @pytest.mark.backend("asyncio")
        @pytest.mark.timeout(0.5)
        async def test_waits_long():
            task = asyncio.create_task(fetch(), name="fetcher")
            await task

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>0.5s*",
            "Tasks of event loop *:",
            "  task * (test_waits_long) awaits task 'fetcher'",
            "    at test_pending_tasks*.py:11 in test_waits_long",
            "  task 'fetcher' (fetch) awaits asyncio sleep()",
            "    at test_pending_tasks*.py:5 in fetch",
            "  Await chain of task 'fetcher':",
            '    File "*test_pending_tasks*.py", line 5, in fetch',
        ]
    )


def test_children_of_the_test_are_shown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import atexit, multiprocessing, subprocess, sys, time
        import pytest

        def child_work():
            time.sleep(3600)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(1)
        @pytest.mark.concur_allow(checks_off=["processes"])
        def test_children():
            ctx = multiprocessing.get_context("fork")
            worker = ctx.Process(target=child_work, name="mp-child", daemon=True)
            worker.start()
            sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            # The deadline ends the session before the finally below runs: do not leave
            # the sleeper behind for an hour.
            atexit.register(sleeper.kill)
            try:
                time.sleep(30)
            finally:
                worker.kill()
                sleeper.kill()
                sleeper.wait()
                worker.join()
        """
    )
    result = run(pytester, "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["Child processes:"])
    # The forked child answers the dump signal (it inherited the handler); on 3.14+ any
    # Python child is read from outside.
    result.stdout.fnmatch_lines(['*File "*test_children_of*.py", line 5*in child_work'])
    result.stdout.fnmatch_lines(
        ["  pid *: *python* -c import time; time.sleep(3600) [[]state *[]]"]
    )


def test_a_child_stuck_on_a_full_pipe_names_the_users_line(pytester: pytest.Pytester) -> None:
    # The classic: wait() on a child whose stdout pipe nobody reads. The Popen's lock is
    # made in subprocess's __init__, which pytest-concur's hook calls for the user: the
    # report must name the user's line, not the hook's.
    pytester.makepyfile(
        """
        import subprocess, sys
        import pytest

        @pytest.mark.backend("thread")
        def test_pipe_full():
            code = "import sys; sys.stdout.write('x' * 1000000)"
            child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
            child.wait()
        """
    )
    result = run(pytester, "--concur-timeout=0.5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*holds Lock created at *subprocess.py:* in __init__ (from "
            "test_a_child_stuck_on_a_full_pipe_names_the_users_line.py:7)",
            "Child processes:",
        ]
    )
    assert "_patches.py" not in result.stdout.str()


def test_a_process_the_body_forked_is_not_called_the_test_body(
    pytester: pytest.Pytester,
) -> None:
    # A fork keeps the forking thread's ident, and the child inherits the report handler:
    # its main thread must not be labelled as the body, which runs in its parent.
    pytester.makepyfile(
        """
        import multiprocessing, time
        import pytest

        def work():
            time.sleep(30)

        @pytest.mark.backend("process")
        def test_forks():
            child = multiprocessing.get_context("fork").Process(target=work)
            child.start()
            child.join()
        """
    )
    result = run(pytester, "--concur-timeout=1", "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["Child processes:", "*Thread 'MainThread' (the test body):"])
    assert result.stdout.str().count("(the test body)") == 1


def test_default_deadline_without_pytest_timeout(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_timeout = 0.5\n")
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        def test_sleeps():
            time.sleep(30)

        def test_next():
            pass
        """
    )
    result = run(pytester, "-p", "no:timeout")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>0.5s, concur_timeout = 0.5)*"])
    assert result.duration < 25  # not the 30 s the bodies sleep


def test_option_overrides_the_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_timeout = 100\n")
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread")
        def test_sleeps():
            time.sleep(30)
        """
    )
    result = run(pytester, "--concur-timeout=0.3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout (>0.3s, concur_timeout = 0.3)*"])


def test_pytest_timeout_setting_wins_over_the_default(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_timeout = 0.2\n")
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(20)
        def test_takes_a_while():
            time.sleep(0.6)
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_zero_means_no_deadline(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_timeout = 0\n")
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread")
        def test_takes_a_while():
            time.sleep(0.3)
        """
    )
    run(pytester, "-p", "no:timeout").assert_outcomes(passed=1)


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_bad_timeout_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--concur-timeout={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*--concur-timeout={value}: expected a number of seconds, 0 or more (0 for no deadline)*"]
    )


def test_exactly_one_of_pytest_timeout_and_pytest_concur_acts(pytester: pytest.Pytester) -> None:
    # pytest-timeout's thread method ends the whole process at its deadline. For a backend
    # test it must not act: ours does, and the session goes on to the next test.
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread")
        def test_sleeps():
            time.sleep(30)

        def test_next():
            pass
        """
    )
    result = run(pytester, "--timeout=0.5", "--timeout-method=thread")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>0.5s, the pytest-timeout setting)*"])
    assert "Timeout +++" not in result.stdout.str()  # pytest-timeout's own dump


def test_plain_tests_are_left_to_pytest_timeout(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        def test_plain():
            time.sleep(30)
        """
    )
    result = run(pytester, "--timeout=0.5", "--timeout-method=signal")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout*0.5s*"])
    assert "pytest-concur found no deadlock" not in result.stdout.str()


def test_fixture_that_hangs_in_setup_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.fixture
        def slow():
            time.sleep(30)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.5)
        def test_uses_slow(slow):
            pass

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>0.5s*",
            "  Thread 'MainThread'*:",
            '      File "*test_fixture_that_hangs*.py", line 6, in slow',
        ]
    )


def test_report_is_in_junit_xml(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BUSY.format(backend="thread"))
    result = run(pytester, "--junitxml=report.xml")
    result.assert_outcomes(failed=1, passed=1)
    xml = (pytester.path / "report.xml").read_text()
    assert "pytest-concur found no deadlock" in xml
    assert "holds Lock created at" in xml


STUCK_FOREVER = """
import os, threading, time
import pytest

READ_END, WRITE_END = os.pipe()  # nobody ever writes

@pytest.mark.backend("asyncio")
def test_{name}():
    # Not a daemon, blocked in C code where no exception can reach it.
    threading.Thread(target=os.read, args=(READ_END, 1), name="reader").start()
    {rest}

def test_next():
    pass
"""


@pytest.mark.parametrize(
    ("name", "rest", "outcomes"),
    [
        pytest.param("hangs", "time.sleep(30)", {"failed": 1, "passed": 1}, id="after-a-hang"),
        pytest.param("leaks", "pass", {"failed": 1, "passed": 1}, id="after-a-leak"),
    ],
)
def test_stuck_non_daemon_thread_does_not_keep_the_session_alive(
    pytester: pytest.Pytester, name: str, rest: str, outcomes: dict[str, int]
) -> None:
    pytester.makepyfile(STUCK_FOREVER.format(name=name, rest=rest))
    result = run(pytester, "--timeout=0.5", "--junitxml=report.xml")
    result.assert_outcomes(**outcomes)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stderr.fnmatch_lines(
        [
            "pytest-concur: 1 thread(s) left by the tests are still blocked ('reader') and "
            "would keep the interpreter from exiting; exiting without waiting for them."
        ]
    )
    assert (pytester.path / "report.xml").exists()


def test_a_body_stuck_in_c_does_not_keep_the_session_alive(pytester: pytest.Pytester) -> None:
    # The thread backend's body thread is not a daemon (threads it starts must not be
    # daemons either). Given up on at its deadline while blocked in C code, it must not
    # hold the interpreter at exit (it is let go, or guarded: see _shutdown).
    pytester.makepyfile(
        """
        import os, threading
        import pytest

        READ_END, WRITE_END = os.pipe()  # nobody ever writes

        @pytest.mark.backend("thread")
        def test_stuck():
            assert not threading.current_thread().daemon
            os.read(READ_END, 1)

        def test_next():
            pass
        """
    )
    result = run(pytester, "--concur-timeout=0.5")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.duration < 30


@pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM")
def test_a_hung_body_leaves_nothing_installed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import signal, threading, time, _thread
        import pytest

        ORIGINAL = (threading.Lock, threading.RLock, _thread.allocate_lock)

        @pytest.mark.backend("thread", "asyncio")
        def test_times_out():
            time.sleep(30)

        def test_restored():
            from pytest_concur import _patches

            now = (threading.Lock, threading.RLock, _thread.allocate_lock)
            assert now == ORIGINAL
            assert _patches.listening() == []
            assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
            assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        """
    )
    run(pytester, "-p", "no:timeout", "--concur-timeout=0.3").assert_outcomes(failed=2, passed=1)


# -- where the deadline strikes ------------------------------------------------------------


def test_deadline_during_the_checks_puts_everything_back(pytester: pytest.Pytester) -> None:
    # Under the asyncio backend the checks end in the main thread: the threads check waits
    # there for a thread that outlives the body. The deadline passes during that wait; it
    # must not cut the checks' cleanup in half (the lock tracking stayed installed).
    pytester.makepyfile(
        """
        import threading, time, _thread
        import pytest

        ORIGINAL = (threading.Lock, threading.RLock, _thread.allocate_lock)

        @pytest.mark.backend("asyncio")
        @pytest.mark.timeout(0.3)
        def test_leaves_a_thread_behind():
            threading.Thread(target=time.sleep, args=(0.7,), name="late").start()

        def test_restored():
            from pytest_concur import _locks

            from pytest_concur import _patches

            now = (threading.Lock, threading.RLock, _thread.allocate_lock)
            assert now == ORIGINAL
            assert _patches.listening() == []
            assert _locks.TRACKER is None
        """
    )
    result = run(pytester)
    outcomes = result.parseoutcomes()
    assert (outcomes.get("failed"), outcomes.get("passed")) == (1, 1), outcomes
    # On a busy machine the leak check's wait for "late" can fall in the teardown instead,
    # which then gets a deadline of its own: one more error there, never a broken next test.
    assert outcomes.get("errors", 0) <= 1, outcomes
    result.stdout.fnmatch_lines(["*Timeout (>0.3s, the pytest-timeout setting)*"])
    assert "it runs None" not in result.stdout.str()  # the main thread, between steps


def test_deadline_between_steps_is_not_an_internal_error(pytester: pytest.Pytester) -> None:
    # The deadline passes while a reporting hook runs, outside setup, call and teardown: a
    # failure raised there would end the whole session with an INTERNALERROR.
    pytester.makeconftest(
        """
        import time

        def pytest_runtest_logreport(report):
            if report.when == "call" and "slow_report" in report.nodeid:
                time.sleep(0.6)  # uploads the result, say
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        def test_slow_report():
            pass

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_slow_report*", "*Timeout (>0.3s*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_deadline_in_teardown_outside_a_finalizer_waits_for_the_step_end(
    pytester: pytest.Pytester,
) -> None:
    # Struck in a hook wrapper around the teardown (pytest's own bookkeeping, say), the
    # failure would skip the finalizers and break every later test's setup.
    pytester.makeconftest(
        """
        import time
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_teardown(item):
            if "slow" in item.name:
                time.sleep(0.8)
            return (yield)
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def shared():
            yield

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        def test_slow(shared):
            pass

        def test_next(shared):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_slow*", "*Timeout (>0.3s*"])
    assert "not torn down properly" not in result.stdout.str()


def test_teardown_gets_a_deadline_after_the_test_hung(pytester: pytest.Pytester) -> None:
    # What hung the body often stalls its fixtures' cleanup too: without a deadline of its
    # own, the teardown would hang the session after the test's failure was reported.
    pytester.makepyfile(
        """
        import threading, time
        import pytest

        NEVER = threading.Event()  # made before the test: a wait nobody ends

        @pytest.fixture
        def server():
            yield
            NEVER.wait()

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        def test_hangs(server):
            time.sleep(30)

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, errors=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_hangs*",
            "Timeout (>0.3s, the pytest-timeout setting, given again to the teardown after the "
            "deadline passed): *",
            "  Thread 'MainThread':",
            '      File "*test_teardown_gets*.py", line 9, in server',
        ]
    )


def test_default_deadline_covers_the_teardown_of_a_failed_test(pytester: pytest.Pytester) -> None:
    # pytest-timeout cancels its timer at every failure (for pdb's post-mortem); the
    # concur_timeout deadline covers setup, call and teardown whatever happened.
    pytester.makepyfile(
        """
        import threading
        import pytest

        NEVER = threading.Event()

        @pytest.fixture
        def server():
            yield
            NEVER.wait()

        @pytest.mark.backend("thread")
        def test_fails(server):
            assert False

        def test_next():
            pass
        """
    )
    result = run(pytester, "--concur-timeout=0.3")
    result.assert_outcomes(failed=1, errors=1, passed=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_fails*", "*concur_timeout = 0.3*"])


# -- letting go ------------------------------------------------------------------------------


def test_hang_error_landing_later_is_not_blamed_on_another_test(pytester: pytest.Pytester) -> None:
    # A thread blocked in C code gets its HangError when it runs Python code again, here in
    # the next test: the exception must not reach pytest's thread-exception warning there.
    pytester.makepyfile(
        """
        import sys, threading, time
        import pytest
        from pytest_concur import _locks

        # A wait in C code, which HangError cannot end: a plain lock, as those made before
        # the plugin was loaded are (a lock made here would be tracked).
        GO_ON = _locks._real_allocate_lock()
        GO_ON.acquire()
        # Python 3.11 under a tracer (coverage): no HangError is sent (see _hang).
        SENT = sys.version_info[:2] != (3, 11) or sys.gettrace() is None

        def worker():
            GO_ON.acquire()
            while True:
                time.sleep(0.01)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        @pytest.mark.concur_allow(threads=["worker"])
        def test_hangs():
            threading.Thread(target=worker, name="worker", daemon=True).start()
            time.sleep(30)

        def test_next():
            GO_ON.release()
            [thread] = [t for t in threading.enumerate() if t.name == "worker"]
            thread.join(10)
            assert not thread.is_alive() or not SENT  # HangError ended it
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(failed=1, passed=1)


def test_async_body_waiting_in_select_is_let_go(pytester: pytest.Pytester) -> None:
    # Under the thread backend an async body runs its loop in the body's thread; waiting in
    # select() it runs no Python code for HangError to land in. Left running, the loop
    # could not be closed by the teardown.
    pytester.makepyfile(
        """
        import asyncio, socket
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        async def test_reads():
            left, right = socket.socketpair()
            left.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_recv(left, 1)  # nobody writes
            finally:
                left.close()
                right.close()

        def test_next():
            pass
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>0.3s*", "  task * (test_reads) awaits *"])
    assert "Cannot close a running event loop" not in result.stdout.str()


def test_traced_session_survives_a_thread_stuck_in_c_code(pytester: pytest.Pytester) -> None:
    # On Python 3.11 an exception sent to a thread blocked in C code made every traced
    # thread spin for ever (coverage traces them all): the session hung at the deadline.
    pytester.makeconftest(
        """
        import sys, threading

        def tracer(frame, event, arg):
            return None  # like a coverage tracer, present in every thread

        sys.settrace(tracer)
        threading.settrace(tracer)
        """
    )
    pytester.makepyfile(STUCK_FOREVER.format(name="hangs", rest="time.sleep(30)"))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--timeout=0.3", timeout=30)
    result.assert_outcomes(failed=1, passed=1)


def test_stuck_pool_worker_does_not_keep_the_session_alive(pytester: pytest.Pytester) -> None:
    # concurrent.futures joins its pools' workers at exit, daemons included (the workers a
    # body of the thread backend starts are daemons). Its exit callback may be registered
    # after ours (on first use of a pool, after another test left a thread stuck): ours
    # must still run first.
    pytester.makepyfile(
        """
        import os, threading, time
        import pytest

        READ_END, WRITE_END = os.pipe()  # nobody ever writes

        @pytest.mark.backend("asyncio")
        @pytest.mark.timeout(0.3)
        def test_a_thread():
            threading.Thread(target=os.read, args=(READ_END, 1), name="reader").start()
            time.sleep(30)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        def test_b_pool():
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1, thread_name_prefix="pool")
            pool.submit(os.read, READ_END, 1).result()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stderr.fnmatch_lines(
        ["pytest-concur: 2 thread(s) left by the tests are still blocked ('*', '*')*"]
    )
    assert "pool_0" in result.stderr.str()


# -- debuggers -------------------------------------------------------------------------------


def test_debugger_in_the_body_thread_holds_the_deadline(pytester: pytest.Pytester) -> None:
    # breakpoint() in the body's thread: the person at the prompt takes longer than the
    # deadline; the main thread, which the deadline interrupts, is not traced itself.
    path = pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.3)
        def test_debugged():
            x = 1
            breakpoint()
            assert x == 1

        def test_next():
            pass
        """
    )
    result = pytester.run(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:randomly",
        str(path),
        stdin=b"p __import__('time').sleep(0.8)\nc\n",
        timeout=60,
    )
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("options", "outcomes"),
    [
        pytest.param((), {"passed": 1}, id="detected"),
        pytest.param(("--timeout-disable-debugger-detection",), {"failed": 1}, id="disabled"),
    ],
)
def test_pycharm_debugger_holds_the_deadline(
    pytester: pytest.Pytester, options: tuple[str, ...], outcomes: dict[str, int]
) -> None:
    # PyCharm's debugger traces from a module of its _pydevd_bundle package; pytest-timeout's
    # --timeout-disable-debugger-detection turns the detection off.
    pytester.makepyfile(
        **{
            "_pydevd_bundle/__init__": "",
            "_pydevd_bundle/pydevd_trace_dispatch": """
                def trace_dispatch(frame, event, arg):
                    return trace_dispatch
            """,
        }
    )
    pytester.makepyfile(
        """
        import sys, time
        import pytest
        from _pydevd_bundle.pydevd_trace_dispatch import trace_dispatch

        @pytest.mark.backend("asyncio")
        @pytest.mark.timeout(0.3)
        def test_stepped_through():
            sys.settrace(trace_dispatch)
            try:
                time.sleep(0.8)  # a person looks at the variables
            finally:
                sys.settrace(None)
        """
    )
    run(pytester, *options).assert_outcomes(**outcomes)


# -- the report ------------------------------------------------------------------------------


def test_process_backend_children_are_reported_under_forkserver(pytester: pytest.Pytester) -> None:
    # A forkserver's children share its command line; they are the test's, not the harness.
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("process", workers=2)
        @pytest.mark.timeout(5)  # both children must be up: a forkserver start takes ~1 s
        def test_sleeps():
            time.sleep(30)
        """
    )
    result = run(pytester, "--concur-start-method=forkserver")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "Child processes:",
            "  pid *: *multiprocessing.forkserver* [[]state *[]]",
            "    Threads (most recent call last):",
            "      Thread 'MainThread' (the test body):",
            '          File "*test_process_backend_children*.py", line 7, in test_sleeps',
            "  pid *: *multiprocessing.forkserver* [[]state *[]]",
        ]
    )
    output = result.stdout.str()
    assert "Captured stderr call" not in output  # not printed again after the report
    # How the child was started is not where it stands.
    assert os.path.join("multiprocessing", "forkserver.py") not in output


def test_report_under_xdist_shows_no_harness_frames(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread", "process", "asyncio")
        @pytest.mark.timeout(0.5)
        def test_sleeps():
            time.sleep(30)
        """
    )
    result = run(pytester, "-n", "2")
    result.assert_outcomes(failed=3)
    output = result.stdout.str()
    assert output.count("line 7, in test_sleeps") >= 3
    for harness in ("execnet", f"xdist{os.sep}", '"<string>"', "not a threading.Thread"):
        assert harness not in output


def test_report_shows_alike_threads_once_and_long_stacks_in_part(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading, time, _thread
        import pytest

        HELD = threading.Event()  # made before the test: an untracked wait

        def wait_here():
            HELD.wait()

        def ping(n):
            return pong(n - 1) if n else HELD.wait()

        def pong(n):
            return ping(n - 1)

        def spin():
            while True:
                time.sleep(0.01)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.5)
        def test_many():
            for i in range(60):
                threading.Thread(target=wait_here, name=f"waiter-{i:02}", daemon=True).start()
            threading.Thread(target=ping, args=(200,), name="deep", daemon=True).start()
            _thread.start_new_thread(spin, ())
            time.sleep(30)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  60 threads alike, 'waiter-00', 'waiter-01', 'waiter-02' and 57 more "
            "(started by the test, daemon):",
            '      File "*test_report_shows*.py", line 7, in wait_here',
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "  Thread 'deep' (started by the test, daemon):",
            '      File "*test_report_shows*.py", line 10, in ping',
            "      ... (* calls not shown) ...",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "  Thread <thread *> (not a threading.Thread: started by C code or _thread):",
            '      File "*test_report_shows*.py", line 17, in spin',
        ]
    )
    assert result.stdout.str().count("line 7, in wait_here") == 1
    assert result.stdout.str().count("in pong") < 40


def test_the_cleanup_a_deadline_waits_for_is_all_found() -> None:
    # The deadline is put off while these run (see _timeout._CLEANUP): a renamed function
    # would silently lose that protection.
    import importlib

    from pytest_concur import _timeout

    for module_name in _timeout._CLEANUP:
        importlib.import_module(module_name)
    expected = sum(len(names) for names in _timeout._CLEANUP.values())
    assert len(_timeout._cleanup_codes()) == expected


EARLIER_THREADS = """
import threading, time
import pytest

SEEN = []

@pytest.mark.backend("thread")
def test_leaves():
    SEEN.append("leaves")
    lock = threading.Lock()
    lock.acquire()
    threading.Thread(target=lock.acquire, name="stuck-earlier", daemon=True).start()

@pytest.mark.backend("thread")
@pytest.mark.timeout(0.3)
def test_gives_up():
    time.sleep(1.5)  # let go at the deadline, it ends only when the sleep returns

@pytest.mark.backend("process")
@pytest.mark.timeout(0.3)
def test_hangs_in_child():
    time.sleep(30)

@pytest.mark.backend("process")
def test_forks_regardless():
    # Under fork the child has the parent's memory (SEEN was filled by an earlier test);
    # under forkserver it imports the module afresh.
    assert SEEN == ["leaves"]

@pytest.mark.backend("thread")
def test_outlives_the_earlier_body():
    deadline = time.monotonic() + 20
    while any(t.name == "concur-test_gives_up[thread]" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
"""


def test_threads_of_earlier_tests_are_labelled_and_change_no_later_outcome(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(EARLIER_THREADS)
    result = run(pytester, "-W", "error::pytest.PytestUnhandledThreadExceptionWarning")
    result.assert_outcomes(failed=3, passed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*_ test_gives_up[[]thread[]] _*",
            "*Thread 'stuck-earlier' (left running by an earlier test, daemon):",
            "*_ test_hangs_in_child[[]process[]] _*",
            "*Thread 'concur-test_gives_up[[]thread[]]' (left running by an earlier test):",
            "*Thread 'stuck-earlier' (left running by an earlier test, daemon):",
        ]
    )
    # Not a word of the earlier threads in the later tests' verdicts: no HangError of theirs
    # blamed on whichever test ran when it landed, no switch to forkserver.
    assert "HangError" not in out
    assert "forkserver" not in out
    assert "PytestUnhandledThreadExceptionWarning" not in out


def test_a_test_forks_alone_as_after_an_earlier_leak(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(EARLIER_THREADS)
    run(pytester, "-k", "forks_regardless").assert_outcomes(failed=1)  # SEEN is empty alone
    result = run(pytester, "-k", "leaves or forks_regardless")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["FAILED *test_leaves[[]thread[]]*"])
