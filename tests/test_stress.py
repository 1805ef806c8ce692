"""Stress mode: N copies of one body at once, under each backend (workers=N)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from _helpers import run_maybe_fresh


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
        def test_meet(meeting, worker_index):
            (meeting / str(worker_index)).touch()
            deadline = time.monotonic() + 5
            while len(list(meeting.iterdir())) < 4:
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

            @pytest.fixture
            def meeting(tmp_path):
                return tmp_path  # a fixture's tmp_path is shared by the copies
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
        pytest.param(
            "worker=8", "*unexpected keyword argument(s): worker. Did you mean 'workers'? It takes*"
        ),
    ],
)
def test_bad_workers_is_an_error_of_its_test(
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


def test_a_copy_that_deadlocks_is_named(pytester: pytest.Pytester, backend_name: str) -> None:
    if backend_name == "asyncio":
        body = """
        @pytest.mark.backend("asyncio", workers=2)
        async def test_x(worker_index):
            if worker_index == 1:
                await asyncio.Event().wait()
        """
    else:
        body = f"""
        @pytest.mark.backend("{backend_name}", workers=2)
        def test_x(worker_index):
            if worker_index == 1:
                threading.Event().wait()  # nobody sets it
        """
    pytester.makepyfile("import asyncio, threading\nimport pytest\n" + textwrap.dedent(body))
    result = pytester.runpytest_subprocess("--timeout=20", timeout=60)
    result.assert_outcomes(failed=1)
    # The other copy finished; the diagnosis is copy 1's.
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: pytest-concur: deadlock*",
            "copy 1 of 2 failed with the error above",
            "copy 0 of 2 passed",
        ]
    )
    if backend_name != "process":
        # The copy's thread or task is named for it in the diagnosis itself.
        result.stdout.fnmatch_lines([f"*'concur-test_x[[]{backend_name}[]]-copy1'*"])


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


def test_a_copy_that_leaks_a_thread_is_named(pytester: pytest.Pytester, backend_name: str) -> None:
    # Under thread and asyncio the copies share one process and the threads check watches
    # them as one group: the copy is found through who started what, even two threads down.
    pytester.makepyfile(
        f"""
        import threading, time
        import pytest

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_direct(worker_index):
            if worker_index == 1:
                threading.Thread(target=time.sleep, args=(3,), name="leaky", daemon=True).start()
            # Threads of every copy that end in time are no leak, and not named.
            threading.Thread(target=time.sleep, args=(0.01,), name="brief").start()

        def start_another(name):
            threading.Thread(target=time.sleep, args=(3,), name=name, daemon=True).start()

        @pytest.mark.backend("{backend_name}", workers=3)
        async def test_nested(worker_index):
            if worker_index == 2:
                threading.Thread(target=start_another, args=("grandchild",)).start()
        """
    )
    result = pytester.runpytest_subprocess(
        "--timeout=20", "-o", "concur_leak_grace=0.5", timeout=60
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_direct[[]*",
            "pytest-concur: the test left 1 thread running",
            "*Thread 'leaky'*started at test_a_copy_that_leaks_a_thread_is_named.py:7*",
            "*copy 1 of 3 failed with the error above",
            "copies 0, 2 of 3 passed",
            "*_ test_nested[[]*",
            "*Thread 'grandchild'*",
            "*copy 2 of 3 failed with the error above",
            "copies 0, 1 of 3 passed",
        ]
    )
    assert result.stdout.str().count("left 1 thread running") == 2


def test_a_copy_that_leaks_a_task_or_a_process_is_named(pytester: pytest.Pytester) -> None:
    # Tasks by their name, processes by their pid: the copy that started each is found
    # the same way as for threads, and so is the one whose thread raised.
    pytester.makepyfile(
        """
        import asyncio, subprocess, sys, threading
        import pytest

        @pytest.mark.backend("asyncio", workers=3)
        async def test_task(worker_index):
            if worker_index == 1:
                asyncio.create_task(asyncio.sleep(30), name="stray")
            await asyncio.sleep(0)

        @pytest.mark.backend("thread", workers=2)
        def test_process(worker_index):
            if worker_index == 0:
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

        def boom():
            raise ValueError("boom in a copy's thread")

        @pytest.mark.backend("thread", workers=2)
        def test_thread_error(worker_index):
            if worker_index == 1:
                threading.Thread(target=boom).start()
        """
    )
    result = pytester.runpytest_subprocess(
        "--timeout=20", "-o", "concur_leak_grace=0.2", "-p", "no:randomly", timeout=60
    )
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*_ test_task[[]asyncio[]] _*",
            "pytest-concur: the test left 1 task pending",
            "*Task 'stray'*",
            "*copy 1 of 3 failed with the error above",
            "copies 0, 2 of 3 passed",
            "*_ test_process[[]thread[]] _*",
            "pytest-concur: the test left 1 child process running",
            "*copy 0 of 2 failed with the error above",
            "copy 1 of 2 passed",
            "*_ test_thread_error[[]thread[]] _*",
            "*ValueError: boom in a copy's thread",
            "*copy 1 of 2 failed with the error above",
            "copy 0 of 2 passed",
        ]
    )


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_hang_names_the_copies_still_running(pytester: pytest.Pytester, backend: str) -> None:
    pytester.makepyfile(
        f"""
        import time
        import pytest

        @pytest.mark.backend("{backend}", workers=2)
        def test_x(worker_index):
            if worker_index == 1:
                time.sleep(30)
        """
    )
    result = pytester.runpytest_subprocess("--timeout=0.5", timeout=60)
    result.assert_outcomes(failed=1)
    output = result.stdout.str() + result.stderr.str()
    if backend == "thread":
        assert "concur-test_x[thread]-copy1" in output
    else:
        # Copy 0 has normally finished by then; on a slow machine it may not have.
        assert re.search(
            r"pytest-concur: cop(y|ies) (0, )?1 of 2 (was|were) still running when the wait "
            r"for the copies ended \(pid [\d, ]+\)",
            output,
        ), output


def test_a_deadline_in_one_copy_stops_the_copies_on_the_loop(pytester: pytest.Pytester) -> None:
    # Sync copies run one after another on the loop: without this, copy 2 would start with
    # no deadline left and sleep its 30 seconds.
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("asyncio", workers=3)
        def test_x(worker_index):
            if worker_index >= 1:
                time.sleep(30)
        """
    )
    result = pytester.runpytest_subprocess("--timeout=0.5", timeout=25)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "copy 1 of 3 failed with the error above",
            "copy 2 of 3 skipped: stopped: the test reached its deadline in copy 1",
            "copy 0 of 3 passed",
        ]
    )


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


# -- each copy's own tmp_path -------------------------------------------------------------


def test_each_copy_gets_its_own_tmp_path(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pathlib
        import pytest

        RECORDS = pathlib.Path(__file__).parent / "records"

        @pytest.fixture
        def workspace(tmp_path):
            (tmp_path / "from-the-fixture").write_text("shared")
            return tmp_path

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_x(tmp_path, tmpdir, workspace, worker_index):
            # Made before the copy started, empty, and its own: "x" fails if it exists.
            assert tmp_path.is_dir()
            assert list(tmp_path.iterdir()) == []
            with open(tmp_path / "mine", "x") as f:
                f.write(str(worker_index))
            assert str(tmpdir) == str(tmp_path)
            # The fixture's tmp_path is set up once, shared, and one level up.
            assert tmp_path.parent == workspace
            assert (tmp_path.parent / "from-the-fixture").read_text() == "shared"
            (RECORDS / str(worker_index)).write_text(str(tmp_path))
        """
    )
    (pytester.path / "records").mkdir()
    result = _run(pytester, backend_name)
    result.assert_outcomes(passed=1)
    records = {p.name: p.read_text() for p in (pytester.path / "records").iterdir()}
    assert sorted(records) == ["0", "1", "2"]
    assert [Path(records[i]).name for i in "012"] == ["copy0", "copy1", "copy2"]
    for index, path in records.items():
        assert (Path(path) / "mine").read_text() == index


def test_a_single_copy_keeps_pytests_tmp_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread")
        def test_one(tmp_path, request):
            assert tmp_path == request.getfixturevalue("tmp_path")
            assert not tmp_path.name.startswith("copy")
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_copy_directory_name_taken_by_a_fixture_is_not_reused(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def busy(tmp_path):
            (tmp_path / "copy1").write_text("the fixture's")

        @pytest.mark.backend("thread", workers=2)
        def test_x(busy, tmp_path, worker_index):
            assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []
            assert tmp_path.name.startswith(f"copy{worker_index}")
            assert (tmp_path.parent / "copy1").read_text() == "the fixture's"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


# -- the copy hooks -----------------------------------------------------------------------

HOOKS_CONFTEST = """
    import asyncio, contextvars, os, pathlib, threading
    import pytest

    RECORDS = pathlib.Path(__file__).parent / "records"
    SEED = contextvars.ContextVar("seed")

    def where():
        try:
            task = asyncio.current_task().get_name()
        except RuntimeError:
            task = "-"
        return f"pid={os.getpid()} thread={threading.current_thread().name} task={task}"

    def pytest_concur_copy_setup(item, worker_index, worker_count):
        SEED.set(100 + worker_index)
        name = f"setup-{item.name}-{worker_index}-of-{worker_count}"
        (RECORDS / name).write_text(where())

    def pytest_concur_copy_teardown(item, worker_index, worker_count):
        name = f"teardown-{item.name}-{worker_index}-of-{worker_count}"
        (RECORDS / name).write_text(f"{where()} seed={SEED.get()}")
"""


def test_copy_hooks_run_in_each_copy(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makeconftest(HOOKS_CONFTEST)
    pytester.makepyfile(
        f"""
        import os
        import pytest
        from conftest import SEED

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_copies(worker_index):
            assert SEED.get() == 100 + worker_index  # set by this copy's setup hook

        @pytest.mark.backend("{backend_name}")
        def test_single(worker_index):
            assert SEED.get() == 100

        def test_plain():
            assert SEED.get(None) is None
        """
    )
    (pytester.path / "records").mkdir()
    result = _run(pytester, backend_name)
    result.assert_outcomes(passed=3)
    records = {p.name: p.read_text() for p in (pytester.path / "records").iterdir()}
    copies = [f"test_copies[{backend_name}]-{i}-of-3" for i in range(3)]
    single = f"test_single[{backend_name}]-0-of-1"
    # Once per copy, a single copy included, a plain test not.
    assert sorted(records) == sorted(
        [f"{kind}-{name}" for kind in ("setup", "teardown") for name in [*copies, single]]
    )
    for index, name in enumerate(copies):
        setup, teardown = records[f"setup-{name}"], records[f"teardown-{name}"]
        assert teardown == f"{setup} seed={100 + index}"  # same thread/task/process
        pid, thread, task = (part.split("=", 1)[1] for part in setup.split())
        if backend_name == "thread":
            assert thread == f"concur-test_copies[thread]-copy{index}"
        elif backend_name == "asyncio":
            assert task == f"concur-test_copies[asyncio]-copy{index}"
        else:
            assert pid != str(os.getpid())
    if backend_name == "process":
        assert len({records[f"setup-{name}"] for name in copies}) == 3  # three children


def test_copy_hooks_that_fail_fail_their_copy(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makeconftest(
        """
        import pytest

        def pytest_concur_copy_setup(item, worker_index, worker_count):
            if item.name.startswith("test_setup") and worker_index == 1:
                raise ValueError(f"no seed for copy {worker_index}")
            if worker_index == 2:
                pytest.skip("not for copy 2")

        def pytest_concur_copy_teardown(item, worker_index, worker_count):
            if item.name.startswith("test_teardown") and worker_index == 0:
                raise RuntimeError("could not clean up")
        """
    )
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_setup(worker_index):
            assert worker_index != 1, "the body ran"

        @pytest.mark.backend("{backend_name}", workers=3)
        def test_teardown(worker_index):
            pass
        """
    )
    result = _run(pytester, backend_name)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_setup[[]*",
            "pytest-concur: the pytest_concur_copy_setup hook raised at conftest.py:5, so "
            "this copy's body did not run:",
            "  conftest.py:5 in pytest_concur_copy_setup",
            '    raise ValueError(f"no seed for copy {worker_index}")',
            "  ValueError: no seed for copy 1",
            "Fix that pytest_concur_copy_setup implementation*",
            "*- pytest-concur: copies -*",
            "copy 1 of 3 failed with the error above",
            "copy 2 of 3 skipped: not for copy 2",
            "copy 0 of 3 passed",
            "*_ test_teardown[[]*",
            "pytest-concur: the pytest_concur_copy_teardown hook raised at conftest.py:11, "
            "after this copy's body:",
            "*RuntimeError: could not clean up",
            "*",
            "copy 0 of 3 failed with the error above",
        ]
    )
    assert "the body ran" not in result.stdout.str()


def test_copy_hooks_are_not_called_in_spawned_children_and_say_so(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(HOOKS_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("process", workers=2)
        def test_x(tmp_path, worker_index):
            assert tmp_path.name == f"copy{worker_index}" and tmp_path.is_dir()
        """
    )
    (pytester.path / "records").mkdir()
    result = pytester.runpytest_subprocess(
        "--timeout=60", "--concur-start-method=spawn", "-W", "default", timeout=120
    )
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*test_copy_hooks_are_not_called_in_spawned_children_and_say_so.py:3: PytestWarning: "
            "pytest-concur: pytest_concur_copy_setup and pytest_concur_copy_teardown are not "
            "called for tests under the process backend started with spawn*"
            "--concur-start-method=fork*"
        ]
    )
    assert list((pytester.path / "records").iterdir()) == []


def _run(pytester: pytest.Pytester, backend_name: str) -> pytest.RunResult:
    """In a subprocess where the backend forks, else inline (faster)."""
    return run_maybe_fresh(pytester, backend_name == "process", "--timeout=20")
