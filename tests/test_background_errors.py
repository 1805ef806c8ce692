"""Background errors: an error nobody looked at fails the test that caused it, not a later one."""

from __future__ import annotations

import pytest
from _helpers import run_fresh as run


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


def test_a_child_the_test_stopped_may_exit_with_a_code_of_its_own(
    pytester: pytest.Pytester,
) -> None:
    # Pool libraries (pebble) stop their workers with terminate(); the worker's SIGTERM
    # handler exits with the signal's number. That exit status was asked for.
    pytester.makepyfile(
        """
        import multiprocessing, os, signal, time
        import pytest

        def worker(ready):
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(signum))
            ready.set()
            time.sleep(60)

        @pytest.mark.backend("thread")
        def test_stops_its_worker():
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Event()
            process = ctx.Process(target=worker, args=(ready,), name="worker")
            process.start()
            assert ready.wait(30)
            process.terminate()
            process.join()
        """
    )
    run(pytester).assert_outcomes(passed=1)


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


def test_exception_in_a_fixtures_thread_while_the_test_runs_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # Sockets, so that the body can talk to the fixture's threads from a child process too:
    # the server raises on the body's request; the watcher closes the body's second
    # connection once the server's thread is over (its excepthook has run by then).
    pytester.makepyfile(
        f"""
        import socket, threading
        import pytest

        def listener():
            sock = socket.create_server(("127.0.0.1", 0))
            return sock, sock.getsockname()[1]

        @pytest.fixture
        def server():
            serving, serve_port = listener()
            watching, watch_port = listener()

            def serve():
                conn, _ = serving.accept()
                with conn:
                    conn.recv(16)
                raise ValueError("bad request")

            worker = threading.Thread(target=serve, name="server")

            def watch():
                conn, _ = watching.accept()
                worker.join()
                conn.close()

            watcher = threading.Thread(target=watch, name="watcher")
            worker.start()
            watcher.start()
            yield serve_port, watch_port
            worker.join()
            watcher.join()
            serving.close()
            watching.close()

        def ask(ports):
            serve_port, watch_port = ports
            with socket.create_connection(("127.0.0.1", watch_port)) as done:
                with socket.create_connection(("127.0.0.1", serve_port)) as request:
                    request.sendall(b"GET")
                assert done.recv(1) == b""  # the server's thread is over

        @pytest.mark.backend("{backend_name}")
        def test_asks_the_server(server):
            ask(server)

        @pytest.mark.backend("{backend_name}")
        @pytest.mark.concur_allow(checks_off=["threads"])
        def test_turned_off(server):
            ask(server)
        """
    )
    result = run(pytester, "-W", "default")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: an exception was raised in thread 'server', which a fixture "
            "started at *.py:27 in server, while the test ran",
            "Traceback (most recent call last):",
            "*line 17, in serve",
            "ValueError: bad request",
        ]
    )
    # Turned off, it is pytest's again, as a warning.
    result.stdout.fnmatch_lines(["*PytestUnhandledThreadExceptionWarning*"])


def test_exception_in_a_fixtures_thread_fails_a_plain_test_under_check_all(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import queue, threading
        import pytest

        @pytest.fixture
        def worker():
            jobs = queue.Queue()

            def work():
                jobs.get()
                raise KeyError("job 7")

            thread = threading.Thread(target=work, name="jobs")
            thread.start()
            yield jobs, thread
            thread.join()

        def test_submits(worker):
            jobs, thread = worker
            jobs.put(7)
            thread.join()
        """
    )
    result = run(
        pytester, "--concur-check-all", "-W", "error::pytest.PytestUnhandledThreadExceptionWarning"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: an exception was raised in thread 'jobs', which a fixture started "
            "at *.py:13 in worker, while the test ran",
            "KeyError: 'job 7'",
        ]
    )


def test_exception_in_a_fixtures_thread_outside_the_call_is_left_to_pytest(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def background():
            thread = threading.Thread(target=lambda: 1 / 0, name="setup-time")
            thread.start()
            thread.join()  # raised during the fixture's setup: not the test's doing
            yield

        @pytest.mark.backend("thread")
        def test_uses_it(background):
            pass
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


def test_a_futures_exception_nobody_retrieved_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import concurrent.futures
        import pytest

        def resize(path):
            raise OSError(f"cannot read {{path}}")

        @pytest.mark.backend("{backend_name}")
        def test_fire_and_forget():
            with concurrent.futures.ThreadPoolExecutor() as pool:
                pool.submit(resize, "a.png")

        @pytest.mark.backend("{backend_name}")
        def test_next_is_not_blamed():
            pass
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 1 future made by the test raised an exception that nobody retrieved",
            "  Future made at test_a_futures_exception_nobody_retrieved_fails_the_test.py:10 "
            "in test_fire_and_forget raised:",
            "Traceback (most recent call last):",
            "*line 5, in resize",
            "OSError: cannot read a.png",
            "  An executor keeps a task's exception in its future*",
        ]
    )
    result.stdout.fnmatch_lines(["*test_next_is_not_blamed*PASSED*"])


def test_a_process_pools_lost_exception_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import concurrent.futures, multiprocessing
        import pytest

        def check(n):
            raise ValueError(f"bad input {n}")

        @pytest.mark.backend("thread")
        def test_forgets():
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                pool.submit(check, 3)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  Future made at *.py:11 in test_forgets raised:",
            "ValueError: bad input 3",
        ]
    )


def test_a_futures_exception_that_is_looked_at_is_no_error(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # Every way of looking (later in the test too), and what is no exception to look at.
    pytester.makepyfile(
        f"""
        import asyncio, concurrent.futures, threading
        import pytest

        def fail():
            raise ValueError("seen")

        @pytest.mark.backend("{backend_name}")
        def test_looks_later():
            with concurrent.futures.ThreadPoolExecutor() as pool:
                futures = [pool.submit(fail) for _ in range(4)]
                concurrent.futures.wait(futures)
            with pytest.raises(ValueError):
                futures[0].result()
            assert isinstance(futures[1].exception(), ValueError)
            futures[2].add_done_callback(lambda f: None)
            for future in concurrent.futures.as_completed(futures[3:]):
                assert future.exception() is not None

        @pytest.mark.backend("{backend_name}")
        def test_map_raises_the_first():
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                with pytest.raises(ValueError):
                    list(pool.map(lambda _: fail(), range(6)))

        @pytest.mark.backend("{backend_name}")
        def test_cancelled():
            started, go = threading.Event(), threading.Event()
            def busy():
                started.set()
                go.wait()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(busy)
                started.wait()
                waiting = pool.submit(fail)
                assert waiting.cancel()
                go.set()

        @pytest.mark.backend("{backend_name}")
        async def test_asyncio_reads_its_executor_futures():
            loop = asyncio.get_running_loop()
            with pytest.raises(ValueError):
                await asyncio.to_thread(fail)
            with pytest.raises(ValueError):
                await loop.run_in_executor(None, fail)
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=4)


def test_run_coroutine_threadsafe_future_nobody_read_fails_the_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, concurrent.futures, threading
        import pytest

        async def handle():
            raise ConnectionResetError("peer gone")

        @pytest.mark.backend("thread")
        def test_submits_to_a_loop_thread():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever)
            thread.start()
            future = asyncio.run_coroutine_threadsafe(handle(), loop)
            concurrent.futures.wait([future])  # waits, but never reads it
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["  Future made at *.py:12 in test_submits_to_a_loop_thread raised:", "*peer gone"]
    )


def test_a_lost_futures_exception_obeys_the_allow_lists(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import concurrent.futures
        import pytest

        def fail():
            raise ValueError("ignored on purpose")

        def spawn_and_forget(pool):
            pool.submit(fail)

        @pytest.mark.backend("thread")
        @pytest.mark.concur_allow(checks_off=["futures"])
        def test_off():
            with concurrent.futures.ThreadPoolExecutor() as pool:
                pool.submit(fail)

        @pytest.mark.backend("thread")
        @pytest.mark.concur_allow(started_by=["spawn_and_forget"])
        def test_allowed_by_who_made_it():
            with concurrent.futures.ThreadPoolExecutor() as pool:
                spawn_and_forget(pool)
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_an_exception_in_a_loop_callback_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        def flush(buffer):
            raise BrokenPipeError("flush failed")

        def on_done(future):
            raise LookupError("no such key")

        @pytest.mark.backend("{backend_name}")
        async def test_call_soon():
            asyncio.get_running_loop().call_soon(flush, [])
            await asyncio.sleep(0.01)

        @pytest.mark.backend("{backend_name}")
        async def test_done_callback():
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(on_done)
            future.set_result(None)
            await asyncio.sleep(0.01)

        @pytest.mark.backend("{backend_name}")
        async def test_next_is_not_blamed():
            await asyncio.sleep(0.01)
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 1 exception reached only the event loop's exception handler "
            "(asyncio would have logged it and gone on)",
            "  callback flush (defined at test_an_exception_in_a_loop_callback_fails_the_test.py"
            ":4), scheduled at *.py:12 in test_call_soon, raised:",
            "Traceback (most recent call last):",
            "*line 5, in flush",
            "BrokenPipeError: flush failed",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "  done-callback on_done (defined at *.py:7) of an asyncio Future (its future was "
            "completed at *.py:19 in test_done_callback), raised:",
            "*line 8, in on_done",
            "LookupError: no such key",
        ]
    )
    result.stdout.fnmatch_lines(["*test_next_is_not_blamed*PASSED*"])
    result.stdout.no_fnmatch_line("*Exception in callback*")


def test_a_call_later_callback_in_a_sync_bodys_own_loop_fails_the_test(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    # A loop the body makes is followed in any thread: this one runs in a thread of its own.
    pytester.makepyfile(
        f"""
        import asyncio, threading
        import pytest

        def tick():
            raise ZeroDivisionError("tick")

        async def main():
            asyncio.get_running_loop().call_later(0.001, tick)
            await asyncio.sleep(0.05)

        @pytest.mark.backend("{backend_name}")
        def test_runs_a_loop_in_a_thread():
            thread = threading.Thread(target=asyncio.run, args=(main(),))
            thread.start()
            thread.join()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  callback tick (defined at *.py:4), scheduled at *.py:8 in main, raised:",
            "ZeroDivisionError: tick",
        ]
    )


def test_an_asyncio_future_dropped_with_its_exception_fails_the_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.backend("asyncio")
        async def test_drops_it():
            future = asyncio.get_running_loop().create_future()
            future.set_exception(TimeoutError("upstream"))
            del future
            await asyncio.sleep(0)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  an asyncio Future: Future exception was never retrieved, raised:",
            "TimeoutError: upstream",
        ]
    )


def test_loop_exceptions_the_test_handles_or_gathers_are_no_error(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        def fail():
            raise ValueError("handled")

        async def afail():
            fail()

        @pytest.mark.backend("{backend_name}")
        async def test_own_handler():
            seen = []
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda loop, context: seen.append(context))
            try:
                loop.call_soon(fail)
                await asyncio.sleep(0.01)
            finally:
                loop.set_exception_handler(None)
            assert isinstance(seen[0]["exception"], ValueError)

        @pytest.mark.backend("{backend_name}")
        async def test_gather_return_exceptions():
            results = await asyncio.gather(afail(), afail(), return_exceptions=True)
            assert all(isinstance(r, ValueError) for r in results)

        @pytest.mark.backend("{backend_name}")
        async def test_gather_raises_the_first():
            with pytest.raises(ValueError):
                await asyncio.gather(afail(), afail(), afail())
            await asyncio.sleep(0.01)

        @pytest.mark.backend("{backend_name}")
        async def test_cancelled_callback_and_future():
            loop = asyncio.get_running_loop()
            loop.call_later(0.001, fail).cancel()
            future = loop.create_future()
            future.cancel()
            del future
            await asyncio.sleep(0.01)

        @pytest.mark.backend("{backend_name}")
        @pytest.mark.concur_allow(checks_off=["callbacks"])
        async def test_off():
            asyncio.get_running_loop().call_soon(fail)
            await asyncio.sleep(0.01)
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=5)


def test_loop_callback_errors_fail_plain_tests_under_check_all(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, concurrent.futures

        def fail():
            raise ValueError("plain")

        def test_future():
            with concurrent.futures.ThreadPoolExecutor() as pool:
                pool.submit(fail)

        def test_callback():
            async def main():
                asyncio.get_running_loop().call_soon(fail)
                await asyncio.sleep(0.01)
            asyncio.run(main())
        """
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*Future made at *.py:8 in test_future raised:*"])
    result.stdout.fnmatch_lines(
        ["  callback fail (defined at *.py:3), scheduled at *.py:12 in *main*"]
    )
