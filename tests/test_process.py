"""The process backend: children that crash, hang, or get values they cannot take."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only for now")


def test_os_exit_is_reported_with_its_code(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.backend("process")
        def test_exits():
            print("about to leave")
            os._exit(3)

        def test_next():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*the child process (pid *) running *test_exits[[]process[]] exited with code 3 "
            "before it reported an outcome*",
            "*Captured stdout call*",
            "about to leave",
        ]
    )


@pytest.mark.parametrize(("signame", "number"), [("SIGKILL", 9), ("SIGSEGV", 11)])
def test_death_by_signal_is_reported_by_name(
    pytester: pytest.Pytester, signame: str, number: int
) -> None:
    pytester.makepyfile(
        f"""
        import os, signal
        import pytest

        @pytest.mark.backend("process")
        def test_dies():
            os.kill(os.getpid(), signal.{signame})

        def test_next():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:faulthandler")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([f"*was killed by signal {signame} ({number}) before it reported*"])


SEGFAULT = """
    import ctypes, sys
    import pytest

    def helper():
        print("before the crash")
        print("to stderr", file=sys.stderr)
        ctypes.string_at(0)

    @pytest.mark.backend("process")
    def test_segv():
        helper()

    def test_next():
        pass
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_segfaulting_childs_dump_is_in_its_captured_stderr_with_the_users_frames_only(
    pytester: pytest.Pytester, method: str
) -> None:
    pytester.makepyfile(SEGFAULT)
    result = pytester.runpytest_subprocess(f"--concur-start-method={method}", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*was killed by signal SIGSEGV (11) before it reported an outcome*Its output so "
            'far, if any, is in the "Captured stdout call" and "Captured stderr call" sections '
            "below, and faulthandler's dump of its threads at the crash at the end of its "
            "stderr.",
            "*- Captured stdout call -*",
            "before the crash",
            "*- Captured stderr call -*",
            "to stderr",
            "pytest-concur: the child process (pid *) crashed:",
            "Fatal Python error: Segmentation fault",
            "Current thread 0x* (most recent call first):",
            '  File "*ctypes*", line * in string_at',
            '  File "*test_a_segfaulting*.py", line 7 in helper',
            '  File "*test_a_segfaulting*.py", line 11 in test_segv',
            "*= short test summary info =*",
        ]
    )
    out = result.stdout.str()
    dump = out[out.index("crashed:") : out.index("short test summary info")]
    for machinery in ("pytest_concur", "_pytest", "pluggy", "multiprocessing", "bin/pytest"):
        assert machinery not in dump
    # Nothing of it in the progress line, or on the real stderr faulthandler used to use.
    assert "Fatal Python error" not in out[: out.index("= FAILURES =")]
    assert "Fatal Python error" not in result.stderr.str()


def test_a_segfault_under_dash_s_says_its_output_went_to_the_terminal(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(SEGFAULT)
    result = pytester.runpytest_subprocess("-s", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*before it reported an outcome*Its output so far, if any, went to the terminal as "
            "it came (-s), and faulthandler's dump of its threads at the crash after it.",
        ]
    )
    # The dump went where the child's stderr goes under -s: pytest's stderr.
    result.stderr.fnmatch_lines(
        ["pytest-concur: the child process (pid *) crashed:", "*line 11 in test_segv"]
    )


def test_without_faulthandler_the_crash_report_promises_no_dump(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(SEGFAULT)
    result = pytester.runpytest_subprocess("-p", "no:faulthandler", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ['*before it reported an outcome*"Captured stderr call" sections below.', "to stderr"]
    )
    result.stdout.no_fnmatch_line("*faulthandler's dump*")
    result.stdout.no_fnmatch_line("*Fatal Python error*")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_unpicklable_fixture_is_named_with_the_fix(pytester: pytest.Pytester, method: str) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def guard():
            return threading.Lock()

        @pytest.mark.backend("process")
        def test_uses_lock(guard):
            pass

        @pytest.mark.backend("process")
        @pytest.mark.parametrize("value", [lambda: 1])
        def test_uses_lambda(value):
            pass
        """
    )
    result = pytester.runpytest_subprocess(f"--concur-start-method={method}")
    result.assert_outcomes(failed=2)
    assert "During handling of the above exception" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            f"*fixture 'guard' of *test_uses_lock[[]process[]] cannot be sent to the child process "
            f"(start method {method}): pickling <unlocked _thread.lock object at *> failed with "
            "TypeError: cannot pickle '_thread.lock' object.",
            "Fix: make the fixture value picklable, use --concur-start-method=fork so the child "
            "inherits it, or run this test under other backends*",
        ]
    )
    result.stdout.fnmatch_lines(["*parameter 'value' of *test_uses_lambda*cannot be sent*"])


def test_fork_needs_no_pickling(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def guard():
            return threading.Lock()

        @pytest.mark.backend("process")
        def test_uses_lock(guard):
            with guard:
                pass
        """
    )
    pytester.runpytest_subprocess("--concur-start-method=fork").assert_outcomes(passed=1)


def test_spawn_child_imports_test_and_conftest_modules(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        class Settings:
            def __init__(self, name):
                self.name = name

        @pytest.fixture
        def settings():
            return Settings("from conftest")
        """
    )
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.fixture
        def parent_pid():
            return os.getpid()

        class TestInClass:
            @pytest.mark.backend("process")
            def test_method(self, settings, parent_pid):
                assert settings.name == "from conftest"
                assert os.getpid() != parent_pid

        @pytest.mark.backend("process")
        async def test_async(settings):
            assert settings.name == "from conftest"
        """
    )
    result = pytester.runpytest_subprocess("--concur-start-method=spawn")
    result.assert_outcomes(passed=2)


def test_exception_that_does_not_pickle_still_fails_with_its_traceback(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        class Unsendable(Exception):
            def __init__(self):
                super().__init__("carries a lock")
                self.lock = threading.Lock()

        @pytest.mark.backend("process")
        def test_raises():
            raise Unsendable()
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*def test_raises():", ">       raise Unsendable()", "E       *Unsendable: carries a lock"]
    )


def test_timeout_ends_the_child_and_the_session_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.backend("process")
        @pytest.mark.timeout(0.5, method="signal")
        def test_hangs(tmp_path):
            (tmp_path / "pid").write_text(str(os.getpid()))
            time.sleep(60)

        def test_child_is_gone(tmp_path_factory):
            base = tmp_path_factory.getbasetemp()
            pid = int(next(base.glob("test_hangs*/pid")).read_text())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["Timeout (>0.5s, the pytest-timeout setting)*"])
    # The child's own stacks, asked for before it was ended.
    result.stdout.fnmatch_lines(
        [
            "Child processes:",
            "*Thread 'MainThread' (the test body):",
            '*File "*test_timeout_ends_the_child*.py", line 8, in test_hangs',
        ]
    )


def test_child_ignoring_sigterm_is_killed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, signal, time
        import pytest

        @pytest.mark.backend("process")
        @pytest.mark.timeout(0.5, method="signal")
        def test_stubborn():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(failed=1)
    assert result.duration < 30


THREADED_FIXTURE = """
import threading
import pytest

stop = threading.Event()

@pytest.fixture(scope="module")
def server():
    t = threading.Thread(target=stop.wait, name="server-thread")
    t.start()
    yield
    stop.set()
    t.join()
"""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the fork warning is new in 3.12")
def test_forced_fork_with_threads_shows_pythons_warning(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(THREADED_FIXTURE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("process")
        def test_x(server):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--concur-start-method=fork")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: This process * is multi-threaded*"])


def test_auto_does_not_fork_a_threaded_process(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        THREADED_FIXTURE
        + """
@pytest.fixture
def lock():
    return threading.Lock()
"""
    )
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.mark.backend("process")
        def test_picklable(server):
            pass

        @pytest.mark.backend("process")
        def test_unpicklable(server, lock):
            pass
        """,
        # The module-scoped server thread is gone by now: auto forks again.
        test_b="""
        import pytest

        @pytest.mark.backend("process")
        def test_alone_forks(lock):
            pass
        """,
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*fixture 'lock' of *test_unpicklable[[]process[]] cannot be sent to the child "
            "process (start method forkserver (the test process runs 2 threads "
            "(server-thread), which makes fork unsafe, so the child was started with "
            "forkserver)): pickling <unlocked _thread.lock object at *",
        ]
    )


def test_plugin_itself_never_makes_fork_warn(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "asyncio", "process")
        @pytest.mark.parametrize("n", range(3))
        async def test_x(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-W", "error")
    result.assert_outcomes(passed=9)


def test_body_can_use_multiprocessing_itself(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import multiprocessing
        import pytest

        def square(x):
            return x * x

        @pytest.mark.backend("process")
        def test_pool():
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                assert pool.map(square, [1, 2, 3]) == [1, 4, 9]
        """
    )
    pytester.runpytest_subprocess(timeout=120).assert_outcomes(passed=1)


def test_capture_sys_output_comes_back(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("process")
        def test_prints():
            print("seen through sys capture")
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--capture=sys")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured stdout call*", "seen through sys capture"])


@pytest.mark.parametrize(
    "option",
    [
        pytest.param(["-o", "faulthandler_timeout=60"], id="faulthandler-watchdog"),
        pytest.param(["-p", "xdist", "-n", "1"], id="xdist-worker"),
    ],
)
def test_auto_forks_past_the_harness_threads(pytester: pytest.Pytester, option: list[str]) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.fixture
        def guard():
            return threading.Lock()

        @pytest.mark.backend("process")
        def test_uses_lock(guard):
            with guard:
                pass
        """
    )
    result = pytester.runpytest_subprocess(*option, "-W", "error")
    result.assert_outcomes(passed=1)


def test_tee_sys_output_is_printed_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("process")
        def test_prints():
            print("hello from the child")
        """
    )
    result = pytester.runpytest_subprocess("--capture=tee-sys")
    result.assert_outcomes(passed=1)
    assert result.stdout.str().count("hello from the child") == 1
