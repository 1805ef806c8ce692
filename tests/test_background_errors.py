"""Background errors: an error nobody looked at fails the test that caused it, not a later one."""

from __future__ import annotations

import pytest

TIMEOUT = 60


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=TIMEOUT)


def test_exception_in_a_thread_fails_the_test_with_its_traceback(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        def parse():
            raise ValueError("bad record 7")

        @pytest.mark.backend("{backend_name}")
        def test_starts_a_failing_thread():
            worker = threading.Thread(target=parse, name="worker-1")
            worker.start()
            worker.join()

        @pytest.mark.backend("{backend_name}")
        def test_next_is_not_blamed():
            pass
        """
    )
    result = run(pytester, "-W", "error::pytest.PytestUnhandledThreadExceptionWarning")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: an exception was raised in thread 'worker-1' started at "
            "test_exception_in_a_thread_fails_the_test_with_its_traceback.py:10 in "
            "test_starts_a_failing_thread (nobody joined it to see it)",
            "Traceback (most recent call last):",
            '  File "*test_exception_in_a_thread_fails_the_test_with_its_traceback.py", '
            "line 5, in parse",
            "ValueError: bad record 7",
        ]
    )
    result.stdout.no_fnmatch_line("*PytestUnhandledThreadExceptionWarning*")


def test_exception_in_a_thread_that_ends_in_the_grace_period_is_caught(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading, time
        import pytest

        def late():
            time.sleep(0.05)
            raise KeyError("late")

        @pytest.mark.backend("thread")
        def test_does_not_join():
            threading.Thread(target=late, name="late").start()

        @pytest.mark.backend("thread")
        def test_next_is_not_blamed():
            time.sleep(0.2)
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*test_does_not_join*FAILED*", "*test_next_is_not_blamed*PASSED*"])
    result.stdout.fnmatch_lines(["KeyError: 'late'"])


def test_task_exception_never_retrieved_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        async def fetch():
            raise ConnectionError("refused")

        @pytest.mark.backend("{backend_name}")
        async def test_fire_and_forget():
            asyncio.create_task(fetch(), name="fetcher")
            await asyncio.sleep(0.01)

        @pytest.mark.backend("{backend_name}")
        async def test_retrieved_is_fine():
            task = asyncio.create_task(fetch())
            await asyncio.sleep(0.01)
            assert isinstance(task.exception(), ConnectionError)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: task 'fetcher' (coroutine=fetch) created at "
            "test_task_exception_never_retrieved_fails_the_test.py:9 in test_fire_and_forget "
            "raised an exception that nobody retrieved",
            "Traceback (most recent call last):",
            "*line 5, in fetch",
            "ConnectionError: refused",
        ]
    )
    result.stdout.no_fnmatch_line("*Task exception was never retrieved*")


def test_coroutine_never_awaited_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        async def save():
            pass

        @pytest.mark.backend("{backend_name}")
        def test_forgets_await():
            save()

        @pytest.mark.backend("{backend_name}")
        async def test_async_forgets_await():
            save()
            await asyncio.sleep(0)
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "pytest-concur: coroutine 'save' was never awaited, created at "
            "test_coroutine_never_awaited_fails_the_test.py:9 in test_forgets_await",
            "pytest-concur: coroutine 'save' was never awaited, created at "
            "test_coroutine_never_awaited_fails_the_test.py:13 in test_async_forgets_await",
        ]
    )
    result.stdout.no_fnmatch_line("*RuntimeWarning*")


def test_child_process_error_nobody_checked_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import multiprocessing
        import pytest

        def migrate():
            raise RuntimeError("schema mismatch")

        @pytest.mark.backend("{backend_name}")
        def test_unchecked():
            process = multiprocessing.get_context("spawn").Process(target=migrate, name="migrator")
            process.start()
            process.join()

        @pytest.mark.backend("{backend_name}")
        def test_checked():
            process = multiprocessing.get_context("spawn").Process(target=migrate)
            process.start()
            process.join()
            assert process.exitcode == 1
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: child Process 'migrator' (pid *, target=migrate) started at "
            "test_child_process_error_nobody_checked_fails_the_test.py:10 in test_unchecked "
            "exited with code 1 and nobody checked its exitcode",
            "Traceback (most recent call last):",
            "*line 5, in migrate",
            "RuntimeError: schema mismatch",
        ]
    )


def test_command_that_failed_unwaited_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, sys, time
        import pytest

        @pytest.mark.backend("thread")
        def test_never_waits():
            subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            time.sleep(0.5)

        @pytest.mark.backend("thread")
        def test_waits():
            popen = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            assert popen.wait() == 3
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: child Process *raise SystemExit(3)* (pid *) started at "
            "*.py:6 in test_never_waits exited with code 3 and nobody waited for it",
        ]
    )


def test_exception_in_a_thread_the_test_did_not_start_is_left_to_pytest(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def background():
            go = threading.Event()

            def boom():
                go.wait()
                raise ValueError("fixture's thread")

            thread = threading.Thread(target=boom)
            thread.start()
            yield go, thread
            thread.join()

        @pytest.mark.backend("thread")
        def test_uses_fixture_thread(background):
            go, thread = background
            go.set()
            thread.join()
        """
    )
    result = run(pytester, "-W", "default")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PytestUnhandledThreadExceptionWarning*"])
    result.stdout.no_fnmatch_line("*pytest-concur: *")  # no finding of its own


def test_a_threads_traceback_shows_no_frame_of_pytest_concur(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # An RLock released by a thread that does not own it raises in the lock's release:
    # C code for a plain RLock, pytest-concur's tracked lock while the body runs. The
    # traceback must read as it would without the plugin.
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_releases_in_another_thread():
            lock = threading.RLock()
            lock.acquire()
            closer = threading.Thread(target=lock.release, name="closer")
            closer.start()
            closer.join()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: an exception was raised in thread 'closer'*",
            "RuntimeError: cannot release un-acquired lock",
        ]
    )
    result.stdout.no_fnmatch_line("*pytest_concur/_*")
