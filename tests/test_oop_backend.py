"""Out-of-process backends written outside the package, on the public job API (issue 15).

Each conftest here is what a third party writes: a backend registered through
``pytest_concur_add_backends`` that sends the body elsewhere with ``pack_jobs``, runs it
there with ``run_job`` and gives the verdict with ``raise_outcomes``. ``fresh``, the example
of docs/plugins.md, spawns a new ``python`` per copy (every supported Python);
``subinterpreter`` uses ``concurrent.interpreters`` (3.14+).
"""

from __future__ import annotations

import importlib.util

import pytest
from _helpers import docs_example

# The documented example itself, so that the docs show what is tested.
FRESH_PYTHON = docs_example("plugins.md", "A backend that starts a fresh `python` for each copy:")

SUBINTERPRETER = """
import threading
from concurrent import interpreters

import pytest_concur


class SubinterpreterRunner:
    def run(self, call):
        jobs = pytest_concur.pack_jobs(call, where="a subinterpreter")
        outcomes = [None] * len(jobs)

        def run_one(index):
            interpreter = interpreters.create()
            try:
                outcomes[index] = interpreter.call(pytest_concur.run_job, jobs[index])
            finally:
                interpreter.close()

        # One interpreter per copy, each called from a thread of its own: at once.
        threads = [threading.Thread(target=run_one, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pytest_concur.raise_outcomes(call, outcomes)

    def close(self):
        pass


class SubinterpreterBackend:
    name = "subinterpreter"
    description = "the body runs in a subinterpreter of its own"

    def start(self, item):
        return SubinterpreterRunner()


def pytest_concur_add_backends(config):
    return [SubinterpreterBackend()]
"""

HAS_INTERPRETERS = importlib.util.find_spec("concurrent.interpreters") is not None

BACKENDS = [
    pytest.param(FRESH_PYTHON, "fresh", id="fresh"),
    pytest.param(
        SUBINTERPRETER,
        "subinterpreter",
        id="subinterpreter",
        marks=pytest.mark.skipif(
            not HAS_INTERPRETERS, reason="concurrent.interpreters is new in 3.14"
        ),
    ),
]


@pytest.mark.parametrize(("conftest", "name"), BACKENDS)
def test_a_third_party_backend_passes_fails_and_skips_elsewhere(
    pytester: pytest.Pytester, conftest: str, name: str
) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(
        f"""
        import os
        import sys
        import pytest

        pytestmark = pytest.mark.backend("{name}")

        @pytest.fixture
        def here():
            return (os.getpid(), id(sys.modules))

        def test_passes(here):
            assert (os.getpid(), id(sys.modules)) != here

        def test_fails():
            print("printed over there")
            x = 1
            assert x == 2

        def test_skips():
            pytest.skip("not over there")

        def test_xfails():
            pytest.xfail("known bug")

        async def test_async_passes():
            import asyncio

            await asyncio.sleep(0)
        """
    )
    result = pytester.runpytest_subprocess("-rsx", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            f"*test_fails[[]{name}[]]*",
            ">       assert x == 2",
            "E       assert 1 == 2",
            "*Captured stdout call*",
            "printed over there",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_a_third_party_backend_passes_fails_and_skips_elsewhere.py:20: not over there",
            f"XFAIL *test_xfails[[]{name}[]]* - *known bug",  # pytest 8.0 says "reason: known bug"
        ]
    )


@pytest.mark.parametrize(("conftest", "name"), BACKENDS)
def test_an_unpicklable_fixture_is_named_with_the_fix(
    pytester: pytest.Pytester, conftest: str, name: str
) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(
        f"""
        import threading
        import pytest

        @pytest.fixture
        def guard():
            return threading.Lock()

        @pytest.mark.backend("{name}")
        def test_uses_lock(guard):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    where = "a fresh python" if name == "fresh" else "a subinterpreter"
    result.stdout.fnmatch_lines(
        [
            f"*fixture 'guard' of *test_uses_lock[[]{name}[]] cannot be sent to {where}: "
            "pickling <unlocked _thread.lock object at *> failed with "
            "TypeError: cannot pickle '_thread.lock' object.",
            "Fix: make the fixture value picklable, or run this test under other backends, "
            '*@pytest.mark.backend("thread", "asyncio").',
        ]
    )


@pytest.mark.parametrize(("conftest", "name"), BACKENDS)
def test_stress_copies_run_elsewhere_and_a_failing_copy_fails_the_test(
    pytester: pytest.Pytester, conftest: str, name: str
) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.backend("{name}", workers=3)
        def test_each_copy_has_its_own_directory(worker_index, tmp_path):
            assert tmp_path.name == f"copy{{worker_index}}"
            (tmp_path / "ran").write_text(str(worker_index))

        @pytest.mark.backend("{name}", workers=3)
        def test_one_copy_fails(worker_index):
            assert worker_index != 1
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_one_copy_fails[[]*[]]*", "*copy 1 of 3*"])


def test_a_fresh_python_that_dies_fails_the_test_and_the_session_goes_on(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(FRESH_PYTHON)
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.backend("fresh")
        def test_exits():
            os._exit(3)

        def test_next():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_exits[[]fresh[]] ended before it reported an outcome: its interpreter crashed*"]
    )


def test_a_timeout_ends_the_fresh_python_through_close(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FRESH_PYTHON)
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.backend("fresh")
        @pytest.mark.timeout(1, method="signal")
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
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["Timeout (>1s, the pytest-timeout setting)*", "Child processes:"])
