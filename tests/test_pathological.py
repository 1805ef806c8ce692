"""Pathological bodies under every backend: each one a named failure, and the session goes on.

Every inner run is a subprocess with an outer timeout: a body that kills its process, floods
its output or raises what pytest itself does not catch must fail its own test and leave the
next one (``test_next``) to pass, with no child process and no temporary file left behind.
"""

from __future__ import annotations

import os

import pytest
from _helpers import NO_RANDOMLY, runner

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only for now")

ALL = '"thread", "process", "asyncio"'


run = runner(*NO_RANDOMLY, timeout=120)


def test_base_exception_subclass_fails_its_test(pytester: pytest.Pytester) -> None:
    # pytest fails a test that raises a BaseException of its own (only KeyboardInterrupt
    # and pytest's Exit end the session): so must every backend.
    pytester.makepyfile(
        f"""
        import pytest

        class Abort(BaseException):
            pass

        @pytest.mark.backend({ALL})
        def test_aborts():
            raise Abort("stop right there")

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines(["*Abort: stop right there*"] * 3)


@pytest.mark.parametrize(
    ("exception", "shown"),
    [
        ("KeyboardInterrupt()", "KeyboardInterrupt"),
        ("SystemExit(4)", "SystemExit: 4"),
        ("Abort('in a worker')", "Abort: in a worker"),
    ],
)
def test_base_exceptions_in_a_worker_thread_fail_the_test(
    pytester: pytest.Pytester, exception: str, shown: str
) -> None:
    # In a plain run these end the worker thread with a line on stderr and nothing else.
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        class Abort(BaseException):
            pass

        def work():
            raise {exception}

        @pytest.mark.backend({ALL})
        def test_worker_dies():
            worker = threading.Thread(target=work, name="doomed")
            worker.start()
            worker.join()

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines([f"*{shown}*"])
    result.stdout.fnmatch_lines(["*'doomed'*"])


def test_recursion_error_fails_with_a_readable_traceback(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        def down(n):
            return down(n + 1) + 1

        @pytest.mark.backend({ALL})
        def test_recurses():
            down(0)

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines(["*RecursionError: maximum recursion depth exceeded*"] * 3)


def test_huge_output_comes_back_whole(pytester: pytest.Pytester) -> None:
    # Eight megabytes through the process backend's pipe, and a failure that shows them.
    pytester.makepyfile(
        f"""
        import sys
        import pytest

        @pytest.mark.backend({ALL})
        def test_floods():
            chunk = "x" * 1023 + "\\n"
            for _ in range(8 * 1024):
                sys.stdout.write(chunk)
            print("THE-END")
            sys.stderr.write("E" * 100_000 + "\\n")
            assert False, "after the flood"

        def test_next():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=3, passed=1)
    lines = result.outlines
    assert lines.count("THE-END") == 3
    assert lines.count("x" * 1023) == 3 * 8 * 1024
    assert lines.count("E" * 100_000) == 3


def test_unpicklable_return_value_under_process(pytester: pytest.Pytester) -> None:
    # A test that returns something gets pytest's warning; a value that cannot travel back
    # from the child must not turn into an error of ours.
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.backend("process", "thread", "asyncio")
        def test_returns_a_lock():
            return threading.Lock()

        def test_next():
            pass
        """
    )
    result = run(pytester, "-W", "default")
    result.assert_outcomes(passed=4, warnings=3)
    result.stdout.fnmatch_lines(["*PytestReturnNotNoneWarning*"])


def test_child_that_kills_itself_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal, subprocess, sys
        import pytest

        @pytest.mark.backend("process")
        def test_dies_with_a_grandchild():
            sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open("grandchild.pid", "w") as f:
                f.write(str(sleeper.pid))
            os.kill(os.getpid(), signal.SIGKILL)

        def test_next():
            pass
        """
    )
    result = run(pytester, "-p", "no:faulthandler")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*was killed by signal SIGKILL (9) before it reported*"])
    pid = int((pytester.path / "grandchild.pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    # Still there: a zombie that nobody reaped is gone too, for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        state = stat.read().rsplit(")", 1)[1].split()[0]
    os.kill(pid, 9)
    assert state == "Z", f"the grandchild {pid} outlived its test (state {state})"


@pytest.mark.parametrize("phase", ["setup", "teardown"])
@pytest.mark.parametrize("scope", ["function", "module"])
def test_fixture_errors_in_every_phase(pytester: pytest.Pytester, phase: str, scope: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.fixture(scope={scope!r})
        def broken():
            if {phase!r} == "setup":
                raise RuntimeError("broken in setup")
            yield 1
            raise RuntimeError("broken in teardown")

        @pytest.mark.backend({ALL})
        def test_uses(broken):
            pass

        def test_next():
            pass
        """
    )
    result = run(pytester)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1, result.stdout.str()
    assert outcomes.get("failed", 0) == 0
    assert outcomes.get("errors", outcomes.get("error", 0)) >= 1
    result.stdout.fnmatch_lines([f"*RuntimeError: broken in {phase}*"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")


def test_async_body_that_raises_base_exception_in_a_task(pytester: pytest.Pytester) -> None:
    # A task that raises a BaseException of its own poisons the loop's run in asyncio (it
    # propagates out of run_until_complete): the test fails, the next test gets a fresh loop.
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        class Abort(BaseException):
            pass

        async def doomed():
            raise Abort("from a task")

        @pytest.mark.backend("thread", "asyncio")
        async def test_task_aborts():
            task = asyncio.create_task(doomed())
            await asyncio.sleep(0.01)
            await task

        @pytest.mark.backend("thread", "asyncio")
        async def test_next():
            await asyncio.sleep(0)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines(["*Abort: from a task*"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")


def test_no_temporary_files_left(
    pytester: pytest.Pytester,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever way the child ends, nothing of ours stays in the temporary directory.
    tmpdir = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    pytester.makepyfile(
        """
        import os, signal
        import pytest

        @pytest.mark.backend("process")
        @pytest.mark.parametrize("how", ["pass", "fail", "exit", "kill"])
        def test_child(how):
            if how == "fail":
                assert False
            if how == "exit":
                os._exit(2)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    for method in ("fork", "forkserver"):
        result = run(pytester, "-p", "no:faulthandler", f"--concur-start-method={method}")
        result.assert_outcomes(passed=1, failed=3)
    assert sorted(p.name for p in tmpdir.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="Linux: an open file needs no name")
def test_a_session_killed_outright_leaves_no_temporary_file(
    pytester: pytest.Pytester,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session keeps one file open for the stacks its forked children dump at a
    # deadline; a session that is killed (SIGKILL, a CI job's own timeout) runs no cleanup,
    # so the file must have no name to leave behind.
    tmpdir = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    pytester.makepyfile(
        """
        import os, signal
        import pytest

        @pytest.mark.backend("thread")
        def test_kills_the_session():
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = run(pytester)
    assert result.ret == -9
    assert sorted(p.name for p in tmpdir.iterdir()) == []
