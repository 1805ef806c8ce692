"""Stress mode: N copies of one body at once, under each backend (workers=N)."""

from __future__ import annotations

import re
import textwrap

import pytest


def test_copies_get_their_own_index_and_share_fixtures(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import os
        import pytest

        SETUPS = []

        @pytest.fixture
        def token():
            SETUPS.append(1)
            return object()

        @pytest.mark.backend("{backend_name}", workers=4)
        def test_copies(worker_index, worker_count, token):
            assert worker_count == 4
            assert 0 <= worker_index < 4
            print(f"copy={{worker_index}} token={{id(token)}} setups={{len(SETUPS)}}")

        def test_plain(worker_index, worker_count):
            assert (worker_index, worker_count) == (0, 1)
        """
    )
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=2)
    copies = re.findall(r"copy=(\d) token=(\d+) setups=(\d+)", result.stdout.str())
    assert sorted(index for index, _, _ in copies) == ["0", "1", "2", "3"]
    # One fixture value, set up once, seen by every copy.
    assert len({token for _, token, _ in copies}) == 1
    assert {setups for _, _, setups in copies} == {"1"}


def test_copies_run_at_the_same_time(pytester: pytest.Pytester, backend_name: str) -> None:
    # Each copy waits for all the others: only copies that truly run together pass.
    if backend_name == "asyncio":
        body = """
        @pytest.mark.backend("asyncio", workers=4)
        async def test_meet(shared):
            shared.append(1)
            while len(shared) < 4:
                await asyncio.sleep(0.001)
        """
    elif backend_name == "thread":
        body = """
        @pytest.mark.backend("thread", workers=4)
        def test_meet(barrier):
            barrier.wait(5)
        """
    else:
        body = """
        @pytest.mark.backend("process", workers=4)
        def test_meet(tmp_path, worker_index):
            (tmp_path / str(worker_index)).touch()
            deadline = time.monotonic() + 5
            while len(list(tmp_path.iterdir())) < 4:
                assert time.monotonic() < deadline, "the copies did not run together"
                time.sleep(0.001)
        """
    pytester.makepyfile(
        textwrap.dedent(
            """
            import asyncio, threading, time
            import pytest

            @pytest.fixture
            def shared():
                return []

            @pytest.fixture
            def barrier():
                return threading.Barrier(4)
            """
        )
        + textwrap.dedent(body)
    )
    pytester.runpytest_subprocess("--timeout=20", timeout=60).assert_outcomes(passed=1)


def test_option_and_ini_give_the_default_and_the_marker_wins(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_workers = 3\n")
    pytester.makepyfile(
        """
        import pytest

        def test_default(worker_count, concur_backend):
            assert worker_count == 3

        @pytest.mark.backend("thread", workers=2)
        def test_marker(worker_count):
            assert worker_count == 2
        """
    )
    pytester.runpytest("--concur-backends=thread").assert_outcomes(passed=2)
    result = pytester.runpytest("--concur-backends=thread", "--concur-workers=5")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*assert 5 == 3*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        pytest.param(
            "workers=0", "*backend(workers=...) takes a whole number of copies, 1 or more, got 0*"
        ),
        pytest.param('workers="8"', "*got '8': write e.g. @pytest.mark.backend(*workers=8)*"),
        pytest.param("worker=8", "*unexpected keyword argument(s): worker. It takes*workers*"),
    ],
)
def test_bad_workers_is_a_collection_error(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("thread", {marker})
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_bad_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--concur-workers=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--concur-workers takes a whole number of copies*got '0'*"])


def test_same_failure_is_shown_once_with_the_copies_that_hit_it(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}", workers=8)
        def test_x(worker_index):
            if worker_index in (0, 3, 5):
                raise ValueError("the same")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*ValueError: the same",
            "*- pytest-concur: copies -*",
            "copies 0, 3, 5 of 8 failed with the error above",
            "copies 1, 2, 4, 6, 7 of 8 passed",
        ]
    )
    assert result.stdout.str().count("ValueError: the same") == 1


def test_different_failures_are_each_shown_once(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}", workers=4)
        def test_x(worker_index):
            if worker_index == 1:
                pytest.skip("not this one")
            if worker_index == 3:
                assert worker_index == 0
            raise KeyError(worker_index % 2)
        """
    )
    result = pytester.runpytest()
    # A skip in one copy never hides the others' failures.
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*KeyError: 0",
            "*- pytest-concur: copies -*",
            "copies 0, 2 of 4 failed with the error above",
            "copy 3 of 4 failed with another error:",
            "*E*assert 3 == 0",
            "copy 1 of 4 skipped: not this one",
        ]
    )


def test_one_failing_copy_fails_the_item(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}", workers=4)
        def test_x(worker_index):
            assert worker_index != 2
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["copy 2 of 4 failed with the error above"])


def test_skipped_only_when_no_copy_failed(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_all(worker_index):
            pytest.skip("everywhere")

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_some(worker_index):
            if worker_index == 1:
                pytest.skip("only one")
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED *test_skipped_only_when_no_copy_failed.py:5: everywhere",
            "SKIPPED *:10: only one (copy 1 of 3 skipped: only one; copies 0, 2 of 3 passed)",
        ]
    )


def test_async_copies_are_awaited(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        @pytest.mark.backend("{backend_name}", workers=3)
        async def test_x(worker_index):
            await asyncio.sleep(0)
            assert worker_index != 2, "awaited"
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: awaited*", "copy 2 of 3 failed*"])


def test_a_copy_that_deadlocks_fails_the_item(pytester: pytest.Pytester, backend_name: str) -> None:
    if backend_name == "asyncio":
        body = """
        @pytest.mark.backend("asyncio", workers=3)
        async def test_x(worker_index):
            if worker_index == 0:
                await asyncio.Event().wait()
        """
    else:
        body = f"""
        @pytest.mark.backend("{backend_name}", workers=3)
        def test_x(worker_index):
            lock = threading.Lock()
            if worker_index == 0:
                lock.acquire()
                lock.acquire()
        """
    pytester.makepyfile("import asyncio, threading\nimport pytest\n" + textwrap.dedent(body))
    result = pytester.runpytest_subprocess("--timeout=20", timeout=60)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*DeadlockError: pytest-concur: deadlock*"])


def test_copies_deadlocking_each_other_are_diagnosed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        SHARED = {}

        @pytest.mark.backend("thread", workers=2)
        def test_x(worker_index):
            # Made inside the body, where locks are tracked (setdefault: one set for both).
            a, b, both = SHARED.setdefault(
                "locks", (threading.Lock(), threading.Lock(), threading.Barrier(2))
            )
            first, second = (a, b) if worker_index == 0 else (b, a)
            with first:
                both.wait()
                with second:
                    pass
        """
    )
    result = pytester.runpytest_subprocess("--timeout=20", timeout=60)
    result.assert_outcomes(failed=1)
    # The diagnosis names both copies' threads. (Once one copy unwinds with the error and
    # lets go of its lock, the other may take it and pass.)
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock: a wait-for cycle*",
            "*thread 'concur-test_x[[]thread[]]-copy?' waits for Lock*held by*copy?'",
            "*thread 'concur-test_x[[]thread[]]-copy?' waits for Lock*held by*copy?'",
            "cop* of 2 failed with the error above",
        ]
    )


def test_a_copy_that_leaks_is_reported_once_for_the_item(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    if backend_name == "asyncio":
        body = """
        @pytest.mark.backend("asyncio", workers=3)
        async def test_x(worker_index):
            if worker_index == 0:
                asyncio.get_running_loop().create_task(asyncio.sleep(30), name="leaky")
        """
    else:
        body = f"""
        @pytest.mark.backend("{backend_name}", workers=3)
        def test_x(worker_index):
            if worker_index == 0:
                threading.Thread(target=time.sleep, args=(3,), name="leaky").start()
        """
    pytester.makepyfile("import asyncio, threading, time\nimport pytest\n" + textwrap.dedent(body))
    result = pytester.runpytest_subprocess("--timeout=20", timeout=60)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["pytest-concur: the test left 1 *", "*'leaky'*"])


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_hang_report_shows_every_copy(pytester: pytest.Pytester, backend: str) -> None:
    pytester.makepyfile(
        f"""
        import time
        import pytest

        @pytest.mark.backend("{backend}", workers=2)
        def test_x(worker_index):
            time.sleep(30)
        """
    )
    result = pytester.runpytest_subprocess("--timeout=2", timeout=60)
    result.assert_outcomes(failed=1)
    output = result.stdout.str() + result.stderr.str()
    if backend == "thread":
        for index in (0, 1):
            assert f"thread 'concur-test_x[thread]-copy{index}' was at" in output
    else:
        assert output.count("its threads' stacks follow") == 2


def test_switch_interval_is_lowered_for_threads_and_restored(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys
        import pytest

        BEFORE = sys.getswitchinterval()

        @pytest.mark.backend("thread", workers=2)
        def test_copies():
            assert sys.getswitchinterval() < BEFORE

        def test_after():
            assert sys.getswitchinterval() == BEFORE
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_serial_tests_run_once_and_are_counted(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeini("[pytest]\nconcur_serial_fixtures = database\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def database():
            return {}

        @pytest.mark.concur_serial
        def test_marked(worker_count):
            assert worker_count == 1

        def test_uses_database(database, worker_count):
            assert worker_count == 1

        def test_free(worker_count):
            assert worker_count == 4
        """
    )
    result = pytester.runpytest(f"--concur-backends={backend_name}", "--concur-workers=4")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 2 test(s) ran as a single copy instead of several, being serial "
            "(@pytest.mark.concur_serial: 1; fixture database (concur_serial_fixtures): 1)"
        ]
    )
    # Without stress mode there is nothing to say.
    result = pytester.runpytest(f"--concur-backends={backend_name}")
    result.assert_outcomes(passed=2, failed=1)  # test_free: worker_count is 1
    assert "single copy" not in result.stdout.str()
