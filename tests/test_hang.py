"""Hangs that are not deadlocks: a failure at the deadline with a report, and the session goes on.

Each inner run is a subprocess with an outer timeout, so a regression fails here instead of
hanging the suite. Deadlines are sub-second.
"""

from __future__ import annotations

import sys

import pytest


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", *args, timeout=60)


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
        import multiprocessing, subprocess, sys, time
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
        [f"*--concur-timeout = {value!r}: expected a number of seconds (0 for no deadline)*"]
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


@pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM")
def test_a_hung_body_leaves_nothing_installed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import signal, threading, time, _thread
        import pytest

        ORIGINAL = (threading.Lock, threading.RLock, _thread.allocate_lock, threading.Thread.start)

        @pytest.mark.backend("thread", "asyncio")
        def test_times_out():
            time.sleep(30)

        def test_restored():
            now = (threading.Lock, threading.RLock, _thread.allocate_lock, threading.Thread.start)
            assert now == ORIGINAL
            assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
            assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        """
    )
    run(pytester, "-p", "no:timeout", "--concur-timeout=0.3").assert_outcomes(failed=2, passed=1)
