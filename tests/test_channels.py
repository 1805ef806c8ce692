"""Waits on channels: ``queue.SimpleQueue`` and multiprocessing's pipes and queues.

A thread blocked on one of them is blocked for the deadlock rules when nothing can end
the wait: no other thread of the test runs, and every child process is idle (exited, or
blocked reading itself). Where a child might still write, nothing is decided before the
deadline. Inner runs have a 20 s safety net; the verdicts come in milliseconds.
"""

from __future__ import annotations

import sys

import pytest
from _helpers import NO_RANDOMLY, runner

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="children are read from /proc"
)


run = runner("--timeout=20", *NO_RANDOMLY, timeout=90)


STUCK = """
import multiprocessing, queue, threading, time
import pytest

pytestmark = pytest.mark.backend({backend!r})

def test_simple_queue_nobody_puts_into():
    jobs = queue.SimpleQueue()
    jobs.get()

def test_pipe_read_at_both_ends():
    mine, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=theirs.recv, name="reader")
    child.start()
    try:
        mine.recv()
    finally:
        child.terminate()
        child.join()

def test_queue_whose_only_producer_exited():
    results = multiprocessing.Queue()
    child = multiprocessing.Process(target=int, name="forgetful")
    child.start()
    child.join()
    results.get()
"""


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_wait_on_a_channel_nothing_can_fill_is_a_deadlock(
    pytester: pytest.Pytester, backend: str
) -> None:
    pytester.makepyfile(STUCK.format(backend=backend))
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "*waits on SimpleQueue (get) created at test_a_wait_on_*.py:7 in "
            "test_simple_queue_nobody_puts_into",
            "*waits on multiprocessing Connection (recv, fd *): no data, and every child "
            "process idle (exited, or blocked reading)",
            "*waits on multiprocessing Queue (get): nothing in it, and every child process idle*",
        ]
    )
    assert result.stdout.str().count("DeadlockError: pytest-concur: deadlock: every thread") == 3
    assert "Timeout" not in result.stdout.str()


FLOWING = """
import multiprocessing, queue, threading, time
from concurrent.futures import ThreadPoolExecutor
import pytest

pytestmark = pytest.mark.backend({backend!r})

def test_simple_queue_filled_by_a_thread():
    jobs = queue.SimpleQueue()
    threading.Timer(0.05, jobs.put, (1,)).start()
    assert jobs.get() == 1

def test_thread_pool():
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]

def slow_send(end):
    time.sleep(0.3)  # sleeping, not reading: it may still write
    end.send("late")

def test_pipe_answered_late_by_a_child():
    mine, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=slow_send, args=(theirs,))
    child.start()
    assert mine.recv() == "late"
    child.join()

def produce(results):
    time.sleep(0.3)
    results.put(42)

def test_queue_filled_late_by_a_child():
    results = multiprocessing.Queue()
    child = multiprocessing.Process(target=produce, args=(results,))
    child.start()
    assert results.get() == 42
    child.join()

def test_timeouts_and_non_blocking_calls_go_straight_through():
    jobs = queue.SimpleQueue()
    with pytest.raises(queue.Empty):
        jobs.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        jobs.get(block=False)
    mine, theirs = multiprocessing.Pipe()
    assert not mine.poll(0.01)
"""


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_channels_that_fill_are_not_deadlocks(pytester: pytest.Pytester, backend: str) -> None:
    pytester.makepyfile(FLOWING.format(backend=backend))
    run(pytester).assert_outcomes(passed=5)


def test_a_child_that_may_still_write_is_left_to_the_deadline(pytester: pytest.Pytester) -> None:
    # The child sleeps forever: it could write any time, so nothing is provable; at the
    # deadline the report says what the test's thread waits on.
    pytester.makepyfile(
        """
        import multiprocessing, time
        import pytest

        @pytest.mark.backend("thread")
        @pytest.mark.timeout(1)
        def test_waits_for_a_sleeper():
            mine, theirs = multiprocessing.Pipe()
            child = multiprocessing.Process(target=time.sleep, args=(60,), name="sleeper")
            child.start()
            mine.recv()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout (>1s*found no deadlock*",
            "*waits on multiprocessing Connection (recv, fd *)*",
        ]
    )
    assert "DeadlockError" not in result.stdout.str()
