"""Deadlock detection: real deadlocks fail at once with a diagnosis; correct code stays green.

Every inner run has a pytest-timeout safety net of 20 s: a regression shows up as a
Timeout failure (or a hang of the inner run, which runpytest_subprocess's own timeout ends),
never as a hang of this suite.
"""

from __future__ import annotations

import _thread
import sys
import threading

import pytest
from _helpers import NO_RANDOMLY, runner

run = runner("--timeout=20", *NO_RANDOMLY)


TWO_LOCKS = """
import threading
import pytest

@pytest.mark.backend({backends})
def test_two_locks():
    a = threading.Lock()
    b = threading.Lock()
    both = threading.Barrier(2)

    def one():
        with a:
            both.wait()
            with b:
                pass

    def two():
        with b:
            both.wait()
            with a:
                pass

    t1 = threading.Thread(target=one, name="one")
    t2 = threading.Thread(target=two, name="two")
    t1.start()
    t2.start()
    t1.join()
    t2.join()

def test_next_test_runs():
    pass
"""


def test_lock_cycle_fails_at_once_with_the_cycle_drawn(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(TWO_LOCKS.format(backends=repr(backend_name)))
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle (each thread waits for the next)",
            "*  thread 'one' waits for Lock created at test_lock_cycle*.py:7 in test_two_locks, held by 'two'",
            "*    at test_lock_cycle*.py:13 in one",
            "*  thread 'two' waits for Lock created at test_lock_cycle*.py:6 in test_two_locks, held by 'one'",
            "*    at test_lock_cycle*.py:19 in two",
            "*Stack of thread 'one':",
            "*test_lock_cycle*.py*, line 13, in one",
            "*    with b:",
        ]
    )
    assert "Timeout" not in result.stdout.str()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            """
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()
""",
            [
                "*deadlock: a thread waits for a lock it holds itself, and no other thread is "
                "left running that could release it",
                "*thread 'concur-test_x[[]thread[]]' waits for Lock created at *:6 in test_x, "
                "held by 'concur-test_x[[]thread[]]'",
            ],
            id="re-acquire-own-lock",
        ),
        pytest.param(
            """
    event = threading.Event()
    event.wait()
""",
            [
                "*deadlock: every thread of the test is blocked, and nothing left running can end the waits",
                "*thread 'concur-test_x[[]thread[]]' waits on Event created at *:6 in test_x",
            ],
            id="event-never-set",
        ),
        pytest.param(
            """
    cond = threading.Condition()
    with cond:
        cond.wait()
""",
            [
                "*every thread of the test is blocked*",
                "*waits on Condition created at *:6 in test_x",
            ],
            id="condition-never-notified",
        ),
        pytest.param(
            """
    q = queue.Queue()

    def consumer():
        while True:
            q.get()  # forgets q.task_done()

    threading.Thread(target=consumer, name="consumer", daemon=True).start()
    q.put("job")
    q.join()
""",
            [
                "*every thread of the test is blocked*",
                "*thread 'concur-test_x[[]thread[]]' waits on Queue (join: waits for task_done) created at *:6 in test_x",
                "*thread 'consumer' waits on Queue (get) created at *:6 in test_x",
            ],
            id="queue-join-without-task-done",
        ),
        pytest.param(
            """
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="stuck")
    worker.start()
    worker.join()
""",
            [
                "*every thread of the test is blocked*",
                "*thread 'concur-test_x[[]thread[]]' joins thread 'stuck'",
                "*thread 'stuck' waits on Event created at *:6 in test_x",
            ],
            id="join-on-a-stuck-thread",
        ),
        pytest.param(
            """
    slots = threading.Semaphore(1)
    slots.acquire()
    slots.acquire()
""",
            [
                "*every thread of the test is blocked*",
                "*waits on Semaphore created at *:6 in test_x",
            ],
            id="semaphore-exhausted",
        ),
    ],
)
def test_blocked_forever_fails_at_once(
    pytester: pytest.Pytester, body: str, expected: list[str]
) -> None:
    pytester.makepyfile(
        "import queue, threading\nimport pytest\n\n@pytest.mark.backend('thread')\ndef test_x():"
        + body
        + "\ndef test_next():\n    pass\n"
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(expected)
    assert "DeadlockError: pytest-concur: deadlock:" in result.stdout.str()


def test_loop_thread_blocked_on_work_only_the_loop_can_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        async def answer():
            return 42

        @pytest.mark.backend("asyncio")
        async def test_blocks_its_own_loop():
            loop = asyncio.get_running_loop()
            future = asyncio.run_coroutine_threadsafe(answer(), loop)
            assert future.result() == 42  # blocks the loop that would run answer()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*deadlock: every thread of the test is blocked*",
            "*thread 'MainThread' waits on concurrent.futures.Future*",
        ]
    )


def test_stuck_non_daemon_threads_are_unblocked_and_the_session_exits(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(TWO_LOCKS.format(backends='"thread"'))
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    # The threads were not daemons: had they stayed blocked, the interpreter would not exit.
    assert result.ret == pytest.ExitCode.TESTS_FAILED


NO_FALSE_ALARMS = """
import asyncio, concurrent.futures, multiprocessing, queue, sys, threading, time
import pytest

pytestmark = pytest.mark.backend({backends})

@pytest.fixture(scope="module")
def ticker():
    stop = threading.Event()
    ticks = queue.Queue()

    def run():
        while not stop.wait(0.001):
            ticks.put(1)

    thread = threading.Thread(target=run, name="ticker")
    thread.start()
    yield ticks
    stop.set()
    thread.join()

def test_rlock_reentry():
    lock = threading.RLock()
    with lock:
        with lock:
            pass

def test_consistent_lock_order():
    a, b = threading.Lock(), threading.Lock()

    def work():
        for _ in range(200):
            with a:
                with b:
                    pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

def test_condition_with_predicate():
    cond = threading.Condition()
    items = []

    def produce():
        for i in range(50):
            with cond:
                items.append(i)
                cond.notify_all()

    t = threading.Thread(target=produce)
    t.start()
    with cond:
        cond.wait_for(lambda: len(items) == 50)
    t.join()

def test_producer_consumer_with_sentinel():
    q = queue.Queue(maxsize=2)
    seen = []

    def consume():
        while (item := q.get()) is not None:
            seen.append(item)
            q.task_done()
        q.task_done()

    t = threading.Thread(target=consume)
    t.start()
    for i in range(100):
        q.put(i)
    q.put(None)
    q.join()
    t.join()
    assert seen == list(range(100))

def test_thread_pool_as_context_manager():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(abs, range(-50, 50))) == 2500

def test_process_pool_as_context_manager():
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        assert list(pool.map(abs, [-1, -2])) == [1, 2]

def test_event_set_later_by_a_sleeping_thread():
    event = threading.Event()
    timer = threading.Timer(0.05, event.set)
    timer.start()
    assert event.wait()
    timer.join()

def test_join_a_thread_that_finishes():
    t = threading.Thread(target=time.sleep, args=(0.05,))
    t.start()
    t.join()

def test_waits_with_timeouts():
    event = threading.Event()
    assert not event.wait(0.02)
    lock = threading.Lock()
    lock.acquire()
    assert not lock.acquire(timeout=0.02)

@pytest.mark.backend({fixture_backend})  # a child cannot share a thread of this process
def test_module_fixture_thread_feeds_the_body(ticker):
    for _ in range(5):
        ticker.get()

async def test_asyncio_primitives():
    lock = asyncio.Lock()
    async with lock:
        pass
    results = await asyncio.gather(asyncio.to_thread(sum, [1, 2]), asyncio.sleep(0.01, "x"))
    assert results == [3, "x"]
    try:
        await asyncio.wait_for(asyncio.Event().wait(), 0.02)
    except (asyncio.TimeoutError, TimeoutError):
        pass

@pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is new in 3.11")
async def test_task_group():
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(asyncio.sleep(0.001, i)) for i in range(10)]
    assert [t.result() for t in tasks] == list(range(10))
"""


def test_correct_code_stays_green(pytester: pytest.Pytester, backend_name: str) -> None:
    fixture_backend = repr("thread" if backend_name == "process" else backend_name)
    pytester.makepyfile(
        NO_FALSE_ALARMS.format(backends=repr(backend_name), fixture_backend=fixture_backend)
    )
    result = run(pytester, "-W", "error")
    skipped = 1 if sys.version_info < (3, 11) else 0
    result.assert_outcomes(passed=12 - skipped, skipped=skipped)


LOCK_ORDER = """
import threading
import pytest

@pytest.mark.backend("thread")
def test_inverted_order():
    a = threading.Lock()
    b = threading.Lock()
    with a:
        with b:
            pass
    with b:
        with a:
            pass
"""


def test_lock_order_inversion_is_a_potential_deadlock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LOCK_ORDER)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: potential deadlock: two locks are taken in both orders",
            "  Lock A created at *.py:6 in test_inverted_order",
            "  Lock B created at *.py:7 in test_inverted_order",
            "  B taken while holding A at *.py:9 in test_inverted_order (from *)",
            "  A taken while holding B at *.py:12 in test_inverted_order (from *)",
        ]
    )


@pytest.mark.parametrize(("setting", "warnings"), [("warn", 1), ("off", 0)])
def test_lock_order_can_be_a_warning_or_off(
    pytester: pytest.Pytester, setting: str, warnings: int
) -> None:
    pytester.makeini(f"[pytest]\nconcur_lock_order = {setting}\n")
    pytester.makepyfile(LOCK_ORDER)
    result = run(pytester)
    result.assert_outcomes(passed=1, warnings=warnings)
    if warnings:
        result.stdout.fnmatch_lines(
            ["*PotentialDeadlockWarning: pytest-concur: potential deadlock*"]
        )


def test_bad_lock_order_setting_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_lock_order = maybe\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*concur_lock_order = 'maybe' is not one of: fail, warn, off."])


def test_locks_stay_tracked_between_bodies_and_keep_no_books(pytester: pytest.Pytester) -> None:
    before = (threading.Lock, threading.RLock, _thread.allocate_lock)
    pytester.makepyfile(
        """
        import threading, _thread
        import pytest
        from pytest_concur import _locks

        AT_IMPORT = (threading.Lock, threading.RLock, _thread.allocate_lock)

        @pytest.mark.backend("thread", "asyncio")
        def test_tracked():
            assert _locks.TRACKER is not None
            assert isinstance(threading.Lock(), threading.Lock)

        @pytest.mark.backend("thread")
        def test_fails():
            raise ValueError

        def test_between_bodies():
            now = (threading.Lock, threading.RLock, _thread.allocate_lock)
            assert now == AT_IMPORT
            assert type(threading.Lock()) is _locks.TrackedLock
            # Thread.join stays hooked for the session (see _patches), tracking nothing.
            assert _locks.TRACKER is None
        """
    )
    pytester.runpytest().assert_outcomes(passed=3, failed=1)
    # The inner session put back what it found (the outer session's factories).
    assert (threading.Lock, threading.RLock, _thread.allocate_lock) == before


def test_event_loop_where_every_task_waits_fails_at_once(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        @pytest.mark.backend({backend_name!r})
        async def test_tasks_wait_for_each_other():
            lock_a, lock_b = asyncio.Lock(), asyncio.Lock()

            async def one():
                async with lock_a:
                    await asyncio.sleep(0.01)
                    async with lock_b:
                        pass

            async def two():
                async with lock_b:
                    await asyncio.sleep(0.01)
                    async with lock_a:
                        pass

            await asyncio.gather(one(), two())

        @pytest.mark.backend({backend_name!r})
        async def test_event_nobody_sets():
            await asyncio.Event().wait()

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: every task of the event loop waits, and "
            "nothing can wake one (no ready callback, no timer, no I/O, no executor job, no "
            "thread at work)",
            "*  task '*' (test_tasks_wait_for_each_other) awaits gather() of tasks '*', '*'",
            "*  task '*' (test_tasks_wait_for_each_other.<locals>.one) awaits asyncio Lock.acquire()",
            "*    at test_event_loop*.py:11 in one",
            "*  task '*' (test_tasks_wait_for_each_other.<locals>.two) awaits asyncio Lock.acquire()",
            "*    at test_event_loop*.py:17 in two",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*  task '*' (test_event_nobody_sets) awaits asyncio Event.wait()"]
    )


def test_event_loop_waiting_on_a_working_thread_is_not_a_deadlock(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, threading, time
        import pytest

        @pytest.mark.backend("asyncio", "thread")
        async def test_woken_from_a_thread():
            loop = asyncio.get_running_loop()
            event = asyncio.Event()

            def later():
                time.sleep(0.2)
                loop.call_soon_threadsafe(event.set)

            worker = threading.Thread(target=later)
            worker.start()
            await event.wait()
            worker.join()

        @pytest.mark.backend("asyncio")
        async def test_waiting_on_a_socket():
            async def handle(reader, writer):
                await asyncio.sleep(0.2)
                assert await reader.readexactly(4) == b"ping"
                writer.write(b"pong")
                await writer.drain()
                writer.close()
                await writer.wait_closed()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            host, port = server.sockets[0].getsockname()[:2]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"pong"
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=3)


def test_diagnosis_reaches_junit_xml(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TWO_LOCKS.format(backends='"thread"'))
    result = run(pytester, "--junitxml=report.xml")
    result.assert_outcomes(failed=1, passed=1)
    import xml.etree.ElementTree as ET

    case = next(
        c
        for c in ET.parse(pytester.path / "report.xml").iter("testcase")
        if c.get("name") == "test_two_locks[thread]"
    )
    failure = case.find("failure")
    assert failure is not None
    assert (failure.get("message") or "").startswith(
        "pytest_concur.DeadlockError: pytest-concur: deadlock: a wait-for cycle"
    )
    text = failure.text or ""
    assert "thread 'one' waits for Lock created at" in text
    assert "Stack of thread 'two':" in text


def test_unblocked_threads_are_not_reported_again_as_background_errors(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(TWO_LOCKS.format(backends='"thread"'))
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    assert result.stdout.str().count("pytest-concur: deadlock: a wait-for cycle") == 1
    assert "an exception was raised in thread" not in result.stdout.str()


def test_a_timed_out_body_leaves_nothing_installed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading, time, _thread
        import pytest

        ORIGINAL = (threading.Lock, threading.RLock, _thread.allocate_lock)

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(0.5, method="signal")
        def test_times_out():
            time.sleep(3)

        @pytest.mark.backend("thread")
        def test_next_backend_test():
            lock = threading.Lock()
            with lock:
                pass

        def test_restored():
            from pytest_concur import _patches

            now = (threading.Lock, threading.RLock, _thread.allocate_lock)
            assert now == ORIGINAL
            assert _patches.listening() == []
        """
    )
    run(pytester).assert_outcomes(failed=1, passed=2)


NOT_DEADLOCKS = """
import asyncio, copy, signal, sys, threading, time
import pytest

pytestmark = pytest.mark.backend({backends})

def test_threads_import_the_same_module_at_once(tmp_path, monkeypatch):
    (tmp_path / "slowmod.py").write_text("import time\\ntime.sleep(0.3)\\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def work():
        import slowmod  # noqa: F401

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

def test_lock_released_by_another_thread():
    handoff = threading.Lock()
    handoff.acquire()
    threading.Timer(0.1, handoff.release).start()
    handoff.acquire()  # waits for the timer thread to release it
    handoff.release()

def test_try_lock_in_the_other_order():
    a, b = threading.Lock(), threading.Lock()
    with a:
        with b:
            pass
    with b:
        if a.acquire(blocking=False):
            a.release()
        if a.acquire(timeout=0.01):
            a.release()

@pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM")
def test_signal_handler_sets_the_event():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread")
    event = threading.Event()
    previous = signal.signal(signal.SIGALRM, lambda *args: event.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert event.wait()
    finally:
        signal.signal(signal.SIGALRM, previous)

def test_a_lock_cannot_be_copied():
    with pytest.raises(TypeError):
        copy.copy(threading.Lock())
"""


def test_more_correct_code_stays_green(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(NOT_DEADLOCKS.format(backends=repr(backend_name)))
    result = run(pytester, "-W", "error", "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] + outcomes.get("skipped", 0) == 5


def test_executor_job_waiting_on_an_event_nobody_sets(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, threading
        import pytest

        @pytest.mark.backend("asyncio")
        async def test_to_thread_waits_forever():
            await asyncio.to_thread(threading.Event().wait)

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*deadlock: every task of the event loop waits*"])


def test_detection_works_with_pytest_timeouts_thread_method(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.backend("thread")
        def test_event():
            threading.Event().wait()

        def test_next():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--timeout=20", "--timeout-method=thread", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*deadlock: every thread of the test is blocked*"])


def test_a_thread_an_earlier_test_leaked_does_not_hide_a_later_deadlock(
    pytester: pytest.Pytester,
) -> None:
    # The leaked thread runs (sleeps, untracked) while the next test waits: it could end
    # the wait in principle, but it was reported as the earlier test's leak already, and
    # letting it stand would turn every later deadlock into a silent wait for the deadline.
    pytester.makeini("[pytest]\nconcur_leak_grace = 0.1\n")
    pytester.makepyfile(
        """
        import threading, time
        import pytest

        @pytest.mark.backend("thread")
        def test_leaks():
            threading.Thread(target=time.sleep, args=(30,), name="leaked", daemon=True).start()

        @pytest.mark.backend("thread", "asyncio")
        def test_waits_forever():
            threading.Event().wait()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*left 1 thread running*", "*Thread 'leaked'*"])
    assert result.stdout.str().count("DeadlockError") >= 2
    assert "Timeout" not in result.stdout.str()


def test_the_failure_ends_at_the_users_wait_not_in_the_standard_library(
    pytester: pytest.Pytester,
) -> None:
    # Event.wait, Semaphore.acquire, Queue.get... block in Condition.wait: pytest would
    # end the failure with its source, docstring and all, and name threading.py as the
    # place. The report of every waiter's stack says the rest.
    pytester.makepyfile(
        """
        import queue, threading
        import pytest

        @pytest.mark.backend("thread", "process", "asyncio")
        def test_waits():
            threading.Event().wait()

        @pytest.mark.backend("thread")
        def test_gets():
            queue.Queue().get()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "test_the_failure_ends_at_the_users_wait_not_in_the_standard_library.py:6: "
            "DeadlockError",
            "test_the_failure_ends_at_the_users_wait_not_in_the_standard_library.py:10: "
            "DeadlockError",
        ],
        consecutive=False,
    )
    result.stdout.no_fnmatch_line("*Wait until notified or until a timeout occurs*")
    result.stdout.no_fnmatch_line("*threading.py:*: DeadlockError")


def test_a_wait_on_the_way_out_is_ended_with_a_reminder_not_the_report_again(
    pytester: pytest.Pytester,
) -> None:
    # The classic pool exhaustion: a task of a 1-worker pool waits for a task queued behind
    # it. The test's thread gets the report; leaving the with block, it joins the worker,
    # a wait the verdict ends too: a one-line reminder, not the whole report again.
    pytester.makepyfile(
        """
        from concurrent.futures import ThreadPoolExecutor
        import pytest

        def parent(pool):
            return pool.submit(abs, -21).result() * 2

        @pytest.mark.backend("thread")
        def test_nested_submit():
            with ThreadPoolExecutor(max_workers=1) as pool:
                assert pool.submit(parent, pool).result() == 42
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    name = "test_a_wait_on_the_way_out_is_ended_with_a_reminder_not_the_report_again.py"
    # The report reaches the test's thread first through its own wait or, as the worker
    # unwinds first, through the future's result(): either way once.
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: every thread of the test is blocked*",
            "*(reported with this thread's first DeadlockError; this wait, joins thread "
            f"'ThreadPoolExecutor-*' at {name}:9 in test_nested_submit, was ended too*",
            f"{name}:9: DeadlockError",
        ]
    )
    assert result.stdout.str().count("Stack of thread 'concur-test_nested_submit") == 1


def test_tasks_a_deadlock_stuck_are_not_reported_again_as_left_pending(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        @pytest.mark.backend("{backend_name}")
        async def test_two_tasks_two_locks():
            a, b = asyncio.Lock(), asyncio.Lock()

            async def one():
                async with a:
                    await asyncio.sleep(0.01)
                    async with b:
                        pass

            async def two():
                async with b:
                    await asyncio.sleep(0.01)
                    async with a:
                        pass

            await asyncio.gather(one(), two())
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*every task of the event loop waits*"])
    result.stdout.no_fnmatch_line("*left 2 tasks pending*")


def test_under_check_all_a_plain_tests_failure_ends_at_the_users_wait_too(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading

        def test_waits():
            threading.Event().wait()
        """
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "test_under_check_all_a_plain_tests_failure_ends_at_the_users_wait_too.py:4: DeadlockError"
        ]
    )
    result.stdout.no_fnmatch_line("*Wait until notified or until a timeout occurs*")


def test_a_wait_whose_attempt_just_succeeded_is_not_blocked() -> None:
    # The window that made a false "every thread is blocked" on a busy machine (seen on
    # 3.15): a Condition waiter took its lock back after notify(), and before it could
    # record itself as the owner and leave the wait, another thread's look saw the lock
    # locked and the wait still there.
    from pytest_concur import _locks

    lock = _locks.TrackedLock()
    wait = _locks.Wait(kind="lock", lock=lock)
    lock.acquire()
    assert wait.still_blocked()  # held by someone: a wait on it is blocked
    lock.release()
    assert not wait.still_blocked()
    lock._lock.acquire()  # what the waiting thread's attempt does, in C
    assert not wait.still_blocked()  # no owner recorded yet: its own, a moment ago
    lock._lock.release()
    lock.acquire()
    wait.done = True  # the attempt returned: the thread is on its way out
    assert not wait.still_blocked()
    lock.release()
