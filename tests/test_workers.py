"""The ``concur`` fixture: workers of the test's own backend, joined before it ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers import FAST
from _helpers import run_fresh as run

# Tests whose workers run in threads and processes run pytest in a fresh interpreter, with a
# limit (_helpers.run_fresh), so a leftover never touches this process and a hang never
# hangs the suite.

# Each behaviour that holds for every backend is run under all three in one inner session:
# one interpreter per test instead of three keeps this file fast. Process first: threads
# that earlier items leave behind would make the process backend use forkserver, not fork.
ALL = '@pytest.mark.backend("process", "thread", "asyncio")'
# How each kind of worker describes itself, in the order ALL runs the backends.
KINDS = ("process, pid *", "thread", "thread")

# Worker functions the inner tests share, at module level so that they pickle (process).
HELPERS = """
import asyncio, threading, time
import pytest

def add(a, b):
    return a + b

async def add_later(a, b):
    await asyncio.sleep(0.001)
    return a + b

def parse(record):
    raise ValueError(f"bad record {record}")

def until_cancelled(concur):
    # A thread polls for its cancellation; a process is terminated; a task is cancelled.
    while not concur.cancelled():
        time.sleep(0.005)
    return "stopped"

async def sleep_long():
    await asyncio.sleep(30)
"""


def line_of(path: Path, text: str) -> int:
    """The number of the first line of the test file ``path`` that contains ``text``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} is not in {path}")


def test_sync_body_starts_joins_and_gets_results(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
def test_workers(concur, concur_backend):
    assert concur.backend == concur_backend
    first = concur.start(add, 1, 2)
    second = concur.start(add_later, 2, b=3, name="later")
    assert first.result(timeout=10) == 3
    assert second.exception(timeout=10) is None
    assert second.result() == 5
    assert first.done() and second.done()
    assert not first.cancelled()
    second.join()
    kind = "process" if concur.backend == "process" else "thread"
    assert (first.kind, second.kind) == (kind, kind)
    assert (first.name, second.name) == ("add", "later")
    assert second.site.startswith("test_sync_body_starts_joins_and_gets_results.py:")
    assert not concur.cancelled()  # outside a worker

def test_a_plain_test_gets_threads(concur):
    assert concur.backend is None
    worker = concur.start(add_later, 1, 2)
    assert worker.kind == "thread"
    assert worker.result(timeout=10) == 3
"""
    )
    run(pytester).assert_outcomes(passed=4)


def test_async_body_awaits_workers_without_blocking_its_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
async def test_workers(concur):
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.get_running_loop().create_task(tick())
    coroutine = concur.start(add_later, 1, 2)
    plain = concur.start(time.sleep, 0.05)
    assert await coroutine == 3
    await plain.wait(timeout=10)
    assert plain.result() is None
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)
    assert ticks > 1  # the loop ran while the body waited for the sleeping worker
    kinds = {{"thread": ("thread", "thread"), "asyncio": ("task", "thread")}}
    assert (coroutine.kind, plain.kind) == kinds.get(concur.backend, ("process", "process"))
"""
    )
    run(pytester).assert_outcomes(passed=3)


def test_join_timeout_names_the_worker_and_where_it_started(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
def test_times_out(concur):
    worker = concur.start(until_cancelled, concur, name="slow")
    try:
        worker.join(timeout=0.05)
    finally:
        worker.cancel()
        if concur.backend != "process":  # a cancelled process is reaped already
            worker.join()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            f"E   *WorkerTimeoutError: pytest-concur: worker 'slow' ({kind}, "
            f"target=until_cancelled) started at {path.name}:{line_of(path, 'concur.start(')} "
            "in test_times_out did not finish within 0.05 s; it is still running. Wait longer, "
            "or cancel() it and join it."
            for kind in KINDS
        ]
    )
    result.stdout.no_fnmatch_line("*never joined*")


def test_async_wait_timeout_raises_the_same_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
async def test_times_out(concur):
    worker = concur.start(sleep_long, name="slow")
    with pytest.raises(TimeoutError, match="worker 'slow' .* did not finish within 0.01 s"):
        await worker.wait(0.01)
    worker.cancel()
    if worker.kind == "thread":  # its own loop cannot be cancelled from here: leave it
        return
    with pytest.raises(Exception) as cancelled:
        await worker
    assert type(cancelled.value).__name__ == "CancelledError"
"""
    )
    result = run(pytester)
    # The sleeping thread cannot be stopped: it is reported, and left to finish.
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["  Worker 'slow' (thread, target=sleep_long) *"])


def test_result_reraises_the_workers_exception_with_its_traceback(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
def test_parses(concur):
    worker = concur.start(parse, 7)
    worker.result(timeout=10)
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    # From a thread or a task: the exception itself, with the worker's frames.
    in_process = [
        ">       worker.result(timeout=10)",
        "*",
        "    def parse(record):",
        '>       raise ValueError(f"bad record {record}")',
        "E       ValueError: bad record 7",
    ]
    result.stdout.fnmatch_lines(
        [
            # From a process: the child's traceback as text, the cause of the exception.
            "*test_parses[[]process[]]*",
            "pytest_concur.WorkerProcessTraceback: Traceback (most recent call last):",
            f'  File "*{path.name}", line {line_of(path, "raise ValueError")}, in parse',
            '    raise ValueError(f"bad record {record}")',
            "ValueError: bad record 7",
            "*The above exception was the direct cause of the following exception:",
            "*",
            ">       worker.result(timeout=10)",
            "E       ValueError: bad record 7",
            "*test_parses[[]thread[]]*",
            *in_process,
            "*test_parses[[]asyncio[]]*",
            *in_process,
        ]
    )
    result.stdout.no_fnmatch_line("*_workers[/\\]*")  # pytest-concur's frames are hidden
    result.stdout.no_fnmatch_line("*nobody retrieved*")


def test_a_worker_nobody_joined_fails_the_test_naming_where_it_started(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
def test_forgets(concur):
    worker = concur.start(add, 1, 2, name="sum")
    while not worker.done():  # looking is not joining
        time.sleep(0.001)
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            line
            for kind in KINDS
            for line in (
                "pytest-concur: 1 worker was never joined",
                f"  Worker 'sum' ({kind}, target=add) started at {path.name}:"
                f"{line_of(path, 'concur.start(')} in test_forgets: finished, never joined",
                "  Wait for every worker before the test (or the fixture that started it) "
                "ends: worker.join() or worker.result() *",
            )
        ]
    )
    result.stdout.no_fnmatch_line("*the test left*")  # one report per worker


def test_a_plain_test_that_forgets_a_worker_errors_at_teardown(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(
        HELPERS
        + """
def test_forgets(concur):
    import time

    worker = concur.start(add, 1, 2, name="sum")
    while not worker.done():  # done() does not count as joining
        time.sleep(0.001)
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets*",
            "pytest-concur: 1 worker was never joined",
            f"  Worker 'sum' (thread, target=add) started at {path.name}:"
            f"{line_of(path, 'concur.start(')} in test_forgets: *never joined",
        ]
    )


def test_a_fixtures_worker_is_judged_at_the_fixtures_teardown(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(FAST)
    path = pytester.makepyfile(
        HELPERS
        + """
@pytest.fixture
def server(concur):
    worker = concur.start(until_cancelled, concur, name="server")
    yield
    if "JOIN" in globals():
        worker.cancel()
        worker.join()

@pytest.mark.backend("thread")
def test_forgets(server):
    pass

@pytest.mark.backend("thread")
def test_joins(server):
    global JOIN
    JOIN = True
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets[[]thread[]]*",
            "pytest-concur: 1 worker was never joined",
            "  Worker 'server' (thread, target=until_cancelled) started at "
            f"{path.name}:{line_of(path, 'concur.start(')} in server: still running; "
            "pytest-concur cancelled it and it ended",
        ]
    )
    result.stdout.no_fnmatch_line("*left 1 thread running*")


def test_an_exception_nobody_retrieved_fails_with_its_traceback(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(
        HELPERS
        + f"""
{ALL}
def test_fire_and_forget(concur):
    worker = concur.start(parse, 7, name="parser")
    while not worker.done():
        time.sleep(0.001)
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            line
            for kind in KINDS
            for line in (
                f"pytest-concur: worker 'parser' ({kind}, target=parse) started at {path.name}:"
                f"{line_of(path, 'concur.start(')} in test_fire_and_forget raised an exception "
                "that nobody retrieved",
                "Traceback (most recent call last):",
                f'  File "*{path.name}", line {line_of(path, "raise ValueError")}, in parse',
                '    raise ValueError(f"bad record {record}")',
                "ValueError: bad record 7",
            )
        ]
    )
    result.stdout.no_fnmatch_line("*never joined*")  # one report per worker
    result.stdout.no_fnmatch_line("*_workers[/\\]*")


def test_a_worker_that_raises_as_the_body_ends_is_not_taken_for_a_running_one(
    pytester: pytest.Pytester,
) -> None:
    # The body returns at once: a child is still sending back its exception. It gets the
    # grace period, as a thread does, and its exception is reported, never "still running".
    pytester.makeini(FAST)
    pytester.makepyfile(
        HELPERS
        + """
@pytest.mark.backend("process", "thread")
@pytest.mark.parametrize("n", range(3))
def test_forgets(concur, n):
    concur.start(parse, n, name="parser")
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=6)
    assert result.stdout.str().count("ValueError: bad record") == 6
    result.stdout.no_fnmatch_line("*still running*")


def test_a_thread_workers_threads_are_what_they_are_in_a_plain_run(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        def start_one():
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            return threading.current_thread().daemon, thread.daemon

        @pytest.mark.backend("thread", "asyncio")
        def test_worker(concur):
            assert concur.start(start_one).result(timeout=10) == (False, False)
        """
    )
    # Threads and tasks only, each joined: inline.
    pytester.runpytest().assert_outcomes(passed=2)


def test_cancel_stops_each_kind_of_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + f"""
from concurrent.futures import CancelledError

{ALL}
async def test_cancels(concur):
    if concur.backend == "asyncio":
        worker = concur.start(sleep_long)  # a task
    else:
        worker = concur.start(until_cancelled, concur)  # a thread, or a process
    await asyncio.sleep(0.01)
    assert worker.cancel()
    await worker.wait(timeout=10)
    assert not worker.cancel()  # over already
    if worker.kind == "thread":
        # Nothing stops a thread: it saw concur.cancelled() and returned.
        assert not worker.cancelled()
        assert await worker == "stopped"
    else:
        assert worker.cancelled()
        with pytest.raises(CancelledError, match="worker '(until_cancelled|sleep_long)' was"):
            worker.result()
"""
    )
    run(pytester).assert_outcomes(passed=3)


def test_workers_still_running_at_the_end_are_reported_then_stopped(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(FAST)
    path = pytester.makepyfile(
        HELPERS
        + f"""
STOP = threading.Event()

{ALL}
async def test_leaves_them(concur):
    concur.start(sleep_long, name="sleeper")
    concur.start(until_cancelled, concur, name="poller")
    if concur.backend != "process":
        concur.start(STOP.wait, name="stuck")

def test_next():
    STOP.set()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3, passed=1)
    sleeper, poller, stuck = (
        f"started at {path.name}:{line_of(path, text)} in test_leaves_them"
        for text in ('name="sleeper"', 'name="poller"', 'name="stuck"')
    )
    in_threads = [
        f"  Worker 'poller' (thread, target=until_cancelled) {poller}: still running; "
        "pytest-concur cancelled it and it ended",
        f"  Worker 'stuck' (thread, target=Event.wait) {stuck}: still running; pytest-concur "
        "cancelled it and waited 0.2 s, but a thread cannot be stopped from outside: it is "
        "left running",
    ]
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 2 workers were never joined",
            f"  Worker 'sleeper' (process, pid *, target=sleep_long) {sleeper}: still running; "
            "pytest-concur terminated it",
            f"  Worker 'poller' (process, pid *, target=until_cancelled) {poller}: still "
            "running; pytest-concur terminated it",
            "pytest-concur: 3 workers were never joined",
            f"  Worker 'sleeper' (thread, target=sleep_long) {sleeper}: still running; "
            "pytest-concur cancelled it and waited 0.2 s, but a thread cannot be stopped *",
            *in_threads,
            "pytest-concur: 3 workers were never joined",
            f"  Worker 'sleeper' (task, target=sleep_long) {sleeper}: still running; "
            "pytest-concur cancelled it",
            *in_threads,
        ]
    )
    # The leak checks leave the fixture's workers to it: one report each.
    result.stdout.no_fnmatch_line("*the test left*")


def test_a_worker_that_deadlocks_with_its_joiner_is_diagnosed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + """
def hold(lock):
    with lock:
        pass

@pytest.mark.backend("thread")
def test_joins_while_holding(concur):
    lock = threading.Lock()
    with lock:
        concur.start(hold, lock, name="holder").join()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            "*joins thread 'holder'",
            "*thread 'holder' waits for Lock created at *",
        ]
    )


def test_stress_copies_share_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + """
@pytest.mark.backend("thread", "asyncio", workers=3)
def test_copies(concur, worker_index):
    assert concur.start(add, worker_index, 1).result(timeout=10) == worker_index + 1
"""
    )
    # Threads and tasks only, each joined: inline.
    pytester.runpytest().assert_outcomes(passed=2)


# -- expect_clean() ---------------------------------------------------------------------------

SERVICES = """
import asyncio, multiprocessing, threading, time
import pytest

class Pump:
    def __init__(self, stops=True, joins=True):
        self.stops = stops
        self.joins = joins
        self.stop = threading.Event()

    def start(self):
        self.thread = threading.Thread(target=self.stop.wait, name="pump", daemon=True)
        self.thread.start()

    def close(self):
        if self.stops:
            self.stop.set()
        if self.joins:
            self.thread.join()

class Farm:
    def start(self):
        self.child = multiprocessing.Process(target=time.sleep, args=(30,), name="farmer")
        self.child.start()

    def close(self):
        pass  # forgets to stop and join the child
"""


def test_expect_clean_passes_when_close_joins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SERVICES
        + f"""
{ALL}
def test_close_joins(concur):
    pump = Pump()
    with concur.expect_clean():
        pump.start()
        pump.close()
"""
    )
    run(pytester).assert_outcomes(passed=3)


def test_expect_clean_names_the_thread_a_close_did_not_join(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(
        SERVICES
        + f"""
{ALL}
def test_close_forgets(concur):
    pump = Pump(stops=False, joins=False)
    with concur.expect_clean(grace=0.1):
        pump.start()
        pump.close()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            f"pytest-concur: expect_clean() at {path.name}:{line_of(path, 'expect_clean(')} in "
            "test_close_forgets: the code in the block left something behind",
            "",
            "pytest-concur: the block left 1 thread running",
            f"  Thread 'pump' (target=Event.wait, daemon) started at {path.name}:"
            f"{line_of(path, 'self.thread.start()')} in *start",
            "  Python cannot stop a thread from outside, so it is left running. Make the code "
            "in the block stop and join it before the block ends, or allow it: *",
        ]
        * 3
    )
    # Judged by the block: the test's own threads check does not report it again.
    result.stdout.no_fnmatch_line("*the test left*")


def test_expect_clean_waits_the_grace_period_for_a_thread_on_its_way_out(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        SERVICES
        + """
@pytest.mark.backend("thread")
def test_close_without_join(concur):
    pump = Pump(joins=False)
    with concur.expect_clean(grace=10):
        pump.start()
        pump.close()  # stops it without joining: it ends within the grace period

@pytest.mark.backend("thread")
async def test_aclose_without_join(concur):
    pump = Pump(joins=False)
    async with concur.expect_clean(grace=10):
        pump.start()
        pump.close()
"""
    )
    run(pytester).assert_outcomes(passed=2)


def test_async_expect_clean_names_a_task_left_pending(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(
        SERVICES
        + f"""
class Poller:
    def start(self):
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(30), name="poll")

    async def aclose(self):
        self.task.cancel()  # cancelled, not awaited: it ends within the grace period

{ALL}
async def test_acloses(concur):
    poller = Poller()
    async with concur.expect_clean():
        poller.start()
        await poller.aclose()
    poller = Poller()
    async with concur.expect_clean(grace=0.05):
        poller.start()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            f"pytest-concur: expect_clean() at {path.name}:"
            f"{line_of(path, 'expect_clean(grace=0.05)')} in test_acloses: the code in the "
            "block left something behind",
            "",
            "pytest-concur: the block left 1 task pending",
            f"  Task 'poll' (coroutine=sleep) created at {path.name}:"
            f"{line_of(path, 'create_task(')} in *start",
            "  pytest-concur cancelled it. Await every task the code in the block creates *",
        ]
        * 3
    )
    result.stdout.no_fnmatch_line("*the test left*")


def test_expect_clean_names_a_child_process_left_running(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(
        SERVICES
        + f"""
{ALL}
def test_close_forgets(concur):
    farm = Farm()
    with concur.expect_clean(grace=0.1):
        farm.start()
        farm.close()
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the block left 1 child process running",
            f"  Process 'farmer' (pid *, target=sleep) started at {path.name}:"
            f"{line_of(path, 'self.child.start()')} in *start",
            "  pytest-concur stopped it *",
        ]
        * 3
    )
    result.stdout.no_fnmatch_line("*the test left*")


def test_expect_clean_works_in_a_plain_test_and_keeps_the_blocks_own_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        SERVICES
        + """
def test_close_forgets(concur):
    with concur.expect_clean(grace=0.05):
        Pump().start()

def test_fails_inside(concur):
    with concur.expect_clean(grace=0.05):
        Pump().start()
        assert 1 == 2
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_close_forgets*",
            "pytest-concur: the block left 1 thread running",
            "*test_fails_inside*",
            "E   *assert 1 == 2",
            "*pytest-concur: the block left 1 thread running",
        ]
    )


# -- process workers under spawn ------------------------------------------------------------------


def test_an_unpicklable_function_under_spawn_is_named_with_the_fix(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        HELPERS
        + """
class Opaque:
    def __reduce__(self):
        raise TypeError("no pickles here")

@pytest.mark.backend("process")
def test_lambda(concur):
    concur.start(lambda: 1, name="anonymous")

@pytest.mark.backend("process")
def test_argument(concur):
    concur.start(add, 1, Opaque())

@pytest.mark.backend("process")
def test_module_level_function(concur):
    assert concur.start(add, 1, 2).result(timeout=30) == 3
"""
    )
    result = run(pytester, "--concur-start-method=spawn")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            '>       concur.start(lambda: 1, name="anonymous")',
            "E       TypeError: pytest-concur: concur.start() cannot send the function, "
            "<function test_lambda.<locals>.<lambda> at *>, to worker process 'anonymous' "
            "(start method spawn): pickling it failed with *",
            "E       Under spawn and forkserver the child gets the function and its arguments by "
            "pickle: define the function at module level (not a lambda, a nested function or "
            "a method of a local class) and pass arguments that pickle; or use "
            "--concur-start-method=fork, or run this test under the thread or asyncio backend.",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E       TypeError: pytest-concur: concur.start() cannot send argument 2, <*Opaque*"]
    )
    result.stdout.no_fnmatch_line("*_workers[/\\]*")


def test_a_worker_process_that_crashes_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HELPERS
        + """
import os

@pytest.mark.backend("process")
def test_crashes(concur):
    concur.start(os._exit, 3, name="crasher").join(timeout=30)
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       RuntimeError: pytest-concur: worker process 'crasher' (pid *) exited with "
            "code 3 before it returned: *"
        ]
    )
