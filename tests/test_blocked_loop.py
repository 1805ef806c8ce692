"""The blocked_loop check: a task step or callback that holds the event loop too long fails.

Blocking is provoked with time.sleep(0.2 or 0.3) against the default threshold of 0.1 s,
and raised thresholds are far above the sleeps (5 s), so no outcome depends on timing luck.
Durations in reports are checked from below only (a sleep lasts at least as long as asked).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from _helpers import run_maybe_fresh

# The threshold it suggests depends on how long the step took: not checked.
HINT = (
    "  Nothing else on the loop runs meanwhile (no other task, no timer, no I/O). A blocking "
    "call between two awaits (time.sleep, a sync socket or file, a lock) or heavy CPU does "
    "this: move it to a thread with await asyncio.to_thread(...), or raise the threshold for "
    "this test: @pytest.mark.concur_blocked_loop(*)."
)


def run(pytester: pytest.Pytester, backend: str, *args: str) -> pytest.RunResult:
    """Inline, except for the process backend, which forks: that one in a fresh interpreter."""
    return run_maybe_fresh(pytester, backend == "process", *args)


def held_for(result: pytest.RunResult) -> list[float]:
    """The durations the report gives, in seconds."""
    return [
        float(s) for s in re.findall(r"held the event loop for ([\d.]+) s", result.stdout.str())
    ]


def test_blocking_call_in_async_body_names_the_lines_it_ran_between(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio, time
        import pytest

        @pytest.mark.backend("{backend_name}")
        async def test_blocks():
            await asyncio.sleep(0)
            time.sleep(0.3)
            await asyncio.sleep(0)
        """
    )
    result = run(pytester, backend_name)
    result.assert_outcomes(failed=1)
    name = "test_blocking_call_in_async_body_names_the_lines_it_ran_between.py"
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the event loop was blocked: 1 step or callback held it longer "
            "than 0.1 s (concur_blocked_loop; measured as *)",
            f"  task '*' running test_blocks() held the event loop for * s in one step, "
            f"from {name}:6 to {name}:8",
            HINT,
        ]
    )
    durations = held_for(result)
    assert durations
    assert min(durations) >= 0.3


def test_body_that_never_awaits_is_timed_from_its_start_to_its_end(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("asyncio")
        async def test_never_awaits():
            time.sleep(0.3)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  task '*' running test_never_awaits() held the event loop for * s in one step, "
            "from its start (test_body_that_never_awaits_is_timed_from_its_start_to_its_end.py:5)"
            " to its end",
        ]
    )


def test_blocking_callback_and_task_are_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        def slow_callback():
            time.sleep(0.2)

        async def fetch():
            await asyncio.sleep(0)
            time.sleep(0.3)

        @pytest.mark.backend("asyncio")
        async def test_callback():
            asyncio.get_running_loop().call_soon(slow_callback)
            await asyncio.sleep(0.01)

        @pytest.mark.backend("asyncio")
        async def test_task():
            await asyncio.create_task(fetch(), name="fetcher")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    name = "test_blocking_callback_and_task_are_named.py"
    result.stdout.fnmatch_lines(
        [
            "*_ test_callback[[]asyncio[]] _*",
            f"  callback slow_callback (defined at {name}:4) held the event loop for * s",
            "*_ test_task[[]asyncio[]] _*",
            f"  task 'fetcher' running fetch() held the event loop for * s in one step, "
            f"from {name}:8 to its end",
        ]
    )


def test_step_through_helpers_names_them_and_the_lines_that_call_them(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        async def fetch():
            await asyncio.sleep(0)

        async def save():
            await asyncio.sleep(0)

        @pytest.mark.backend("asyncio")
        async def test_pipeline():
            await fetch()
            time.sleep(0.2)
            await save()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    name = "test_step_through_helpers_names_them_and_the_lines_that_call_them.py"
    result.stdout.fnmatch_lines(
        [
            "  task '*' running test_pipeline() held the event loop for * s in one step, "
            f"from {name}:5 in fetch() (called at {name}:12) "
            f"to {name}:8 in save() (called at {name}:14)",
        ]
    )


def test_waiting_is_not_blocking_and_a_sync_body_is_not_counted(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.backend("asyncio")
        async def test_awaits_a_long_sleep_first():
            await asyncio.sleep(0.3)

        @pytest.mark.backend("asyncio")
        async def test_awaits_timers_and_threads():
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.call_later(0.3, done.set_result, None)
            await done
            await asyncio.to_thread(time.sleep, 0.2)
            await loop.run_in_executor(None, time.sleep, 0.2)

        @pytest.mark.backend("asyncio")
        def test_sync_body_called_inside_the_loop():
            asyncio.get_running_loop()  # it is: the backend calls it from a task
            time.sleep(0.2)

        @pytest.mark.backend("asyncio", workers=2)
        def test_sync_copies_called_inside_the_loop():
            time.sleep(0.2)
        """
    )
    pytester.runpytest().assert_outcomes(passed=4)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_sync_body_that_sleeps_passes_under_thread_and_process(
    pytester: pytest.Pytester, backend: str
) -> None:
    pytester.makepyfile(
        f"""
        import time
        import pytest

        @pytest.mark.backend("{backend}")
        def test_sleeps():
            time.sleep(0.3)
        """
    )
    run(pytester, backend).assert_outcomes(passed=1)


def test_each_stress_copy_is_timed_and_reported_once_with_a_count(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.backend("asyncio", workers=2)
        async def test_copies_block():
            await asyncio.sleep(0)
            time.sleep(0.2)
            await asyncio.sleep(0)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    name = "test_each_stress_copy_is_timed_and_reported_once_with_a_count.py"
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: the event loop was blocked: 2 steps or callbacks held it longer "
            "than 0.1 s (concur_blocked_loop; measured as *)",
            f"  task '*' running test_copies_block() held the event loop for * s in one step, "
            f"from {name}:6 to {name}:8 (2 times; the longest shown)",
        ]
    )
    assert len(held_for(result)) == 1


def test_loop_the_body_creates_is_timed_under_other_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        async def main():
            time.sleep(0.2)

        @pytest.mark.backend("thread")
        def test_runs_a_loop():
            asyncio.run(main())
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  task '*' running main() held the event loop for * s in one step, from its start (*:4) to its end"
        ]
    )


def test_loop_of_a_fixture_is_not_the_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, threading, time
        import pytest

        @pytest.fixture
        def server_loop():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever)
            thread.start()
            yield loop
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

        @pytest.mark.backend("thread")
        def test_uses_a_slow_server(server_loop):
            async def slow():
                time.sleep(0.2)
            asyncio.run_coroutine_threadsafe(slow(), server_loop).result()
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_report_is_added_to_a_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.backend("asyncio")
        async def test_fails():
            time.sleep(0.2)
            await asyncio.sleep(0)
            assert 1 == 2
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       assert 1 == 2",
            "*pytest-concur also found:",
            "*pytest-concur: the event loop was blocked: 1 step or callback held it longer*",
        ]
    )


BLOCKS = """
import asyncio, time
import pytest

@pytest.mark.backend("asyncio")
async def test_blocks():
    await asyncio.sleep(0)
    time.sleep(0.2)
"""


def test_marker_raises_the_threshold_and_zero_turns_the_check_off(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.backend("asyncio")
        @pytest.mark.concur_blocked_loop(5)
        async def test_raised():
            time.sleep(0.2)

        @pytest.mark.backend("asyncio")
        @pytest.mark.concur_blocked_loop(seconds=0)
        async def test_off():
            time.sleep(0.2)

        @pytest.mark.concur_blocked_loop(5)
        class TestClass:
            @pytest.mark.backend("asyncio")
            async def test_from_the_class(self):
                time.sleep(0.2)

            @pytest.mark.backend("asyncio")
            @pytest.mark.concur_blocked_loop(0.1)
            async def test_the_closest_marker_wins(self):
                time.sleep(0.2)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_the_closest_marker_wins*"])


@pytest.mark.parametrize(
    ("ini", "outcomes"),
    [
        pytest.param("concur_blocked_loop = 5", {"passed": 1}, id="raised"),
        pytest.param("concur_blocked_loop = 0", {"passed": 1}, id="zero-is-off"),
        pytest.param("concur_checks_off = blocked_loop", {"passed": 1}, id="checks-off"),
        pytest.param("concur_blocked_loop = 0.05", {"failed": 1}, id="lowered"),
    ],
)
def test_ini_keys(pytester: pytest.Pytester, ini: str, outcomes: dict[str, int]) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(BLOCKS)
    pytester.runpytest().assert_outcomes(**outcomes)


def test_checks_off_marker_turns_it_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("asyncio")
        @pytest.mark.concur_allow(checks_off=["blocked_loop"])
        async def test_off():
            time.sleep(0.2)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "got"),
    [
        pytest.param('"fast"', "('fast')", id="string"),
        pytest.param("-1", "(-1)", id="negative"),
        pytest.param("True", "(True)", id="bool"),
        pytest.param("", "()", id="nothing"),
        pytest.param("0.5, 1", "(0.5, 1)", id="two"),
        pytest.param("limit=1", "(limit=1)", id="unknown-keyword"),
    ],
)
def test_bad_marker_fails_the_test_with_the_fix(
    pytester: pytest.Pytester, marker: str, got: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("asyncio")
        @pytest.mark.concur_blocked_loop({marker})
        async def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "In test_x[[]asyncio[]]: @pytest.mark.concur_blocked_loop takes one number of "
            f"seconds (0 turns the check off), got {got}. "
            "Write e.g. @pytest.mark.concur_blocked_loop(0.5)"
        ]
    )


@pytest.mark.parametrize("value", ["fast", "-0.1", "nan"])
def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    pytester.makeini(f"[pytest]\nconcur_blocked_loop = {value}\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"*pytest-concur: concur_blocked_loop = '{value}' is not a number of seconds; "
            "write e.g. concur_blocked_loop = 0.5 (the default is 0.1; 0 turns the check off)"
        ]
    )


def test_wrappers_are_restored_after_the_body(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, asyncio.base_events, asyncio.events, time
        import pytest

        RUN = asyncio.events.Handle._run

        @pytest.mark.backend("asyncio")
        async def test_blocks():
            from pytest_concur._checks import _blocked_sampler

            assert asyncio.events.Handle._run is not RUN
            assert _blocked_sampler._TIMINGS
            time.sleep(0.2)

        @pytest.mark.backend("asyncio")
        async def test_fails_otherwise():
            await asyncio.sleep(0)
            raise ValueError("boom")

        def test_after():
            # Hooked once for the session, switched off after each body (see _patches).
            from pytest_concur import _patches
            from pytest_concur._checks import _blocked_sampler

            assert _blocked_sampler._TIMINGS == ()
            assert _patches.listening() == []
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)


def test_report_names_the_line_that_blocked(pytester: pytest.Pytester, backend_name: str) -> None:
    # The step runs from the body's await to the pool's next await; the line that held the
    # loop is in between, two calls down, and only a look at the stack while it runs finds it.
    pytester.makepyfile(
        pool="""
        import asyncio, time

        def _connect():
            time.sleep(0.5)

        class Connection:
            async def query(self):
                _connect()
                await asyncio.sleep(0)
        """,
        test_pool=f"""
        import asyncio
        import pytest
        from pool import Connection

        @pytest.mark.backend("{backend_name}")
        async def test_query():
            await asyncio.sleep(0)
            await Connection().query()
        """,
    )
    result = run(pytester, backend_name)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  task '*' running test_query() held the event loop for * s in one step, from "
            "test_pool.py:7 to pool.py:9 in *query() (called at test_pool.py:8)",
            "    blocked at pool.py:4 in _connect: time.sleep(0.5)",
        ]
    )


def test_the_sampler_is_no_thread_of_the_test_and_is_stopped_before_a_fork(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio, os, threading
        import pytest
        from pytest_concur._checks import _blocked_sampler

        @pytest.mark.backend("asyncio")
        async def test_forks_while_it_samples():
            await asyncio.sleep(0)
            sampler = _blocked_sampler._sampler
            assert sampler.running
            assert _blocked_sampler.sampler_ident() not in {t.ident for t in threading.enumerate()}
            pid = os.fork()
            if pid == 0:  # what the fork copied: a sampler that had already ended
                os._exit(0 if not sampler.running else 3)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            # Started again in the parent, where the watch still runs.
            assert _blocked_sampler._sampler.running
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/thread-self/schedstat"),
    reason="needs Linux's per-thread scheduler statistics",
)
def test_a_busy_machine_changes_no_verdict(pytester: pytest.Pytester) -> None:
    # The body's thread is pinned to one CPU beside a busy loop there, at the lowest
    # priority: a step that computes for 10 ms of its own takes far longer than the
    # threshold on the clock, and that is the machine's doing, not the step's.
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        pytester.makepyfile(
            f"""
            import asyncio, os, time
            import pytest

            @pytest.mark.backend("thread")
            async def test_computes_briefly_on_a_busy_cpu():
                os.sched_setaffinity(0, {{{cpu}}})  # this thread only, as is os.nice on Linux
                os.nice(19)
                await asyncio.sleep(0)
                wall, cpu = time.perf_counter(), time.thread_time()
                while time.thread_time() - cpu < 0.01:
                    pass
                with open("wall.txt", "w") as f:
                    f.write(str(time.perf_counter() - wall))
                await asyncio.sleep(0)
            """
        )
        result = pytester.runpytest_subprocess(timeout=120)
    finally:
        hog.kill()
        hog.wait()
    result.assert_outcomes(passed=1)
    # The step did hold the loop past the threshold on the clock: the check told why.
    assert float((pytester.path / "wall.txt").read_text()) > 0.1


def test_the_sampler_is_not_in_a_hang_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, time
        import pytest

        @pytest.mark.backend("asyncio")
        @pytest.mark.timeout(1)
        async def test_hangs_in_a_step():
            await asyncio.sleep(0)
            time.sleep(30)  # the sampler looks at this step while the deadline strikes
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Threads (most recent call last):", "*  Thread 'MainThread'*"])
    result.stdout.no_fnmatch_line("*not a threading.Thread*")


@pytest.mark.parametrize("backend", ["thread", "asyncio"])
def test_garbage_collection_is_not_the_steps_fault(pytester: pytest.Pytester, backend: str) -> None:
    # In a long session a full collection can take longer than the threshold, in whichever
    # step it lands. Made slow here by a gc callback that sleeps when a collection stops
    # (registered before pytest-concur's, so its sleep falls inside the collection's span).
    pytester.makepyfile(
        f"""
        import asyncio, gc, time
        import pytest

        SLOW = []

        def slow_collection(phase, info):
            if phase == "stop" and SLOW:
                SLOW.clear()
                time.sleep(0.3)

        gc.callbacks.append(slow_collection)

        @pytest.mark.backend({backend!r})
        async def test_a_collection_in_a_step():
            SLOW.append(True)
            gc.collect()
            await asyncio.sleep(0)

        @pytest.mark.backend({backend!r})
        async def test_blocking_outside_a_collection_still_counts():
            time.sleep(0.3)
            await asyncio.sleep(0)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_blocking_outside_a_collection_still_counts*",
            "*the event loop was blocked*or collected garbage)*",
        ]
    )
