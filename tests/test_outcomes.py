"""What every backend owes the report: outcomes and messages exactly as in a plain run."""

from __future__ import annotations

import re

import pytest


def test_body_runs_where_the_backend_says(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import asyncio, os, threading
        import pytest

        @pytest.fixture
        def parent_pid():
            return os.getpid()

        def running_loop():
            try:
                return asyncio.get_running_loop()
            except RuntimeError:
                return None

        @pytest.mark.backend("{backend_name}")
        def test_where(parent_pid):
            in_main = threading.current_thread() is threading.main_thread()
            in_parent = os.getpid() == parent_pid
            where = {{
                "thread": (False, True, False),
                "process": (True, False, False),
                "asyncio": (True, True, True),
            }}["{backend_name}"]
            assert (in_main, in_parent, running_loop() is not None) == where
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


FAILING = """
    import pytest

    class Record:
        def __init__(self, values):
            self.values = values

    def helper(values):
        assert values == [1, 2, 3]

    def test_fails():
        data = Record([1, 2, 4])
        helper(data.values)

    def test_raises_in_library_code():
        import json
        json.loads("{not json")
    """


def failure_sections(result: pytest.RunResult) -> str:
    """The text of the FAILURES section with the per-test headers taken out."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "= FAILURES =" in line)
    # pytest-concur's own summary section follows the failures: not part of their rendering.
    end = next(
        i
        for i, line in enumerate(lines)
        if "short test summary info" in line or "= pytest-concur summary =" in line
    )
    kept, in_captured = [], False
    for line in lines[start + 1 : end]:
        if line.startswith("___"):  # a test's header
            in_captured = False
            continue
        # Captured output is not the failure's rendering (and may hold a measuring tool's
        # warnings, as coverage's in a fresh child).
        in_captured = in_captured or (line.startswith("---") and " Captured " in line)
        if not in_captured:
            kept.append(line)
    text = "\n".join(kept)
    return re.sub(r"0x[0-9a-f]+", "0x...", text)  # object addresses differ between runs


# --tb=native is left out: it prints the whole raw traceback, pytest's internals included,
# so it differs from a plain run by design; test_native_traceback_shows_the_body covers it.
@pytest.mark.parametrize("tb", ["auto", "short", "long", "line"])
@pytest.mark.parametrize("extra", [[], ["-l"]], ids=["", "showlocals"])
def test_failure_reads_exactly_as_in_a_plain_run(
    pytester: pytest.Pytester, backend_name: str, tb: str, extra: list[str]
) -> None:
    pytester.makepyfile(FAILING)
    # A fresh process, single-threaded, so the process backend forks (the outer run may be
    # an xdist worker, whose extra thread would make it choose forkserver).
    run = pytester.runpytest_subprocess if backend_name == "process" else pytester.runpytest
    plain = run(f"--tb={tb}", *extra)
    plain.assert_outcomes(failed=2)
    under_backend = run(f"--tb={tb}", *extra, f"--concur-backends={backend_name}")
    under_backend.assert_outcomes(failed=2)
    assert failure_sections(under_backend) == failure_sections(plain)
    assert "pytest_concur" not in under_backend.stdout.str()


def test_native_traceback_shows_the_body(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(FAILING)
    result = pytester.runpytest("--tb=native", f"--concur-backends={backend_name}")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "Traceback (most recent call last):",
            '  File "*test_native_traceback_shows_the_body.py", line 12, in test_fails',
            "*AssertionError*",
        ]
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_failure_under_a_fresh_interpreter_reads_as_in_a_plain_run(
    pytester: pytest.Pytester, method: str
) -> None:
    pytester.makepyfile(FAILING)
    plain = pytester.runpytest()
    fresh = pytester.runpytest_subprocess(
        "--concur-backends=process", f"--concur-start-method={method}"
    )
    fresh.assert_outcomes(failed=2)
    # The child has no pytest config to ask the pytest_assertrepr_compare hooks with, so the
    # extended comparison detail under an assert ("At index 2 diff") is left out (documented);
    # everything else matches a plain run.
    detail = re.compile(r"^E {9}(\S.*)?$")
    expected = "\n".join(
        line for line in failure_sections(plain).splitlines() if not detail.match(line)
    )
    assert failure_sections(fresh) == expected


def test_skip_xfail_and_fail_outcomes(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.backend("{backend_name}")

        def test_skip():
            pytest.skip("not today")

        def test_xfail_call():
            pytest.xfail("known bug")

        @pytest.mark.xfail(raises=ZeroDivisionError, strict=True)
        def test_xfail_marker_with_raises():
            1 / 0

        @pytest.mark.xfail(raises=ZeroDivisionError)
        def test_xfail_other_exception_fails():
            raise KeyError("k")

        @pytest.mark.xfail(strict=True)
        def test_xpass_strict():
            pass

        def test_fail_without_trace():
            pytest.fail("plain message", pytrace=False)

        def test_exception_type():
            raise ValueError("bad value")
        """
    )
    result = pytester.runpytest("-rfsxX")
    result.assert_outcomes(skipped=1, xfailed=2, failed=4)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED [[]1[]] test_skip_xfail_and_fail_outcomes.py:6: not today",
            f"XFAIL *::test_xfail_call[[]{backend_name}[]]*known bug",
            f"FAILED *::test_xfail_other_exception_fails[[]{backend_name}[]]*",
            f"FAILED *::test_xpass_strict[[]{backend_name}[]]*",
            f"FAILED *::test_fail_without_trace[[]{backend_name}[]]*",
            f"FAILED *::test_exception_type[[]{backend_name}[]]*",
        ]
    )
    result.stdout.fnmatch_lines(["*_ test_fail_without_trace*", "plain message"])
    result.stdout.fnmatch_lines(["E       KeyError: 'k'"])
    result.stdout.fnmatch_lines(["E       ValueError: bad value"])


def test_a_failure_outranks_nothing_and_is_failed_not_error(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_x():
            raise RuntimeError("boom")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, errors=0)


def test_output_is_captured_per_test(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import sys
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_prints():
            print("to stdout")
            print("to stderr", file=sys.stderr)
            assert False
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*- Captured stdout call -*", "to stdout", "*- Captured stderr call -*", "to stderr"]
    )


def test_warnings_reach_the_summary(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import warnings
        import pytest

        class LibraryWarning(UserWarning):
            pass

        @pytest.mark.backend("{backend_name}")
        def test_warns():
            warnings.warn("careful now", LibraryWarning)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*LibraryWarning: careful now*"])


def test_warnings_as_errors_fail_the_test(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import warnings
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_warns():
            warnings.warn("careful now", DeprecationWarning)
        """
    )
    result = pytester.runpytest("-W", "error::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: careful now*"])


def test_returning_a_value_warns_as_pytest_does(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_returns():
            return 42
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*PytestReturnNotNoneWarning*returned <class 'int'>*"])


def test_async_body_runs_on_a_fresh_loop_closed_after(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        loops = []

        @pytest.mark.backend("{backend_name}")
        @pytest.mark.parametrize("n", [1, 2])
        async def test_async(n):
            await asyncio.sleep(0)
            loops.append(asyncio.get_running_loop())
            assert n == 1

        @pytest.mark.backend("{backend_name}")
        async def test_failing_await():
            await asyncio.sleep(0)
            raise LookupError("after an await")

        def test_loops_were_fresh_and_closed():
            if "{backend_name}" == "process":
                assert loops == []  # they lived in children
            else:
                assert len(loops) == 2 and loops[0] is not loops[1]
                assert all(loop.is_closed() for loop in loops)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*assert 2 == 1*", "*LookupError: after an await*"])


def test_session_continues_after_a_failure(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.backend("{backend_name}")

        def test_first():
            raise SystemExit(3)

        def test_second():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*SystemExit: 3*"])


def test_body_sees_context_variables_set_by_fixtures(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import contextvars, decimal
        import pytest

        request_id = contextvars.ContextVar("request_id")

        @pytest.fixture
        def in_request():
            token = request_id.set("abc")
            decimal.getcontext().prec = 50
            yield
            request_id.reset(token)
            decimal.getcontext().prec = 28

        @pytest.mark.backend("{backend_name}")
        def test_context(in_request):
            assert request_id.get() == "abc"
            assert decimal.getcontext().prec == 50
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_recwarn_records_the_bodys_warnings(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import warnings
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_recorded(recwarn):
            warnings.warn("w", UserWarning)
            assert len(recwarn) == 1
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_stop_iteration_reads_as_in_a_plain_run(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{backend_name}")
        def test_stop():
            next(iter([]))
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E       StopIteration"])
    assert "coroutine raised StopIteration" not in result.stdout.str()
