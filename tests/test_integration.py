"""pytest-concur among its neighbours: xdist, coverage, JUnit XML."""

from __future__ import annotations

import importlib.util
import os
import sys
import xml.etree.ElementTree as ET

import pytest

SUITE = """
import asyncio
import pytest

@pytest.mark.backend("thread", "process", "asyncio")
@pytest.mark.parametrize("n", range(3))
def test_sync(n):
    assert n != 2

@pytest.mark.backend("thread", "process", "asyncio")
async def test_async():
    await asyncio.sleep(0)

@pytest.mark.backend("process")
def test_skip():
    pytest.skip("skipped in the child")
"""


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_xdist_gives_the_same_outcomes_as_a_serial_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    # -W error: forking in an xdist worker (which runs execnet's I/O thread) must not warn.
    serial = pytester.runpytest_subprocess("-W", "error::DeprecationWarning")
    serial.assert_outcomes(passed=9, failed=3, skipped=1)
    parallel = pytester.runpytest_subprocess("-n", "2", "-W", "error::DeprecationWarning")
    parallel.assert_outcomes(passed=9, failed=3, skipped=1)
    parallel.stdout.fnmatch_lines(["*assert 2 != 2*"])


def test_junit_xml_carries_the_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("--junitxml=report.xml")
    result.assert_outcomes(passed=9, failed=3, skipped=1)
    tree = ET.parse(pytester.path / "report.xml")
    cases = {case.get("name"): case for case in tree.iter("testcase")}
    assert {"test_sync[thread-2]", "test_sync[process-2]", "test_sync[asyncio-2]"} <= set(cases)
    failure = cases["test_sync[process-2]"].find("failure")
    assert failure is not None
    assert "assert 2 != 2" in (failure.text or "")
    skipped = cases["test_skip[process]"].find("skipped")
    assert skipped is not None
    assert "skipped in the child" in (skipped.get("message") or "")


@pytest.mark.skipif(importlib.util.find_spec("coverage") is None, reason="needs coverage")
@pytest.mark.skipif(
    ("coverage" in sys.modules and sys.gettrace() is not None) or "COV_CORE_SOURCE" in os.environ,
    reason="runs coverage itself; not under an outer coverage measurement",
)
def test_coverage_measures_lines_run_under_every_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        mylib="""
        def in_thread():
            return "thread"

        def in_child():
            return "process"

        async def in_loop():
            return "asyncio"

        def never_called():
            return "nobody"
        """,
        test_lib="""
        import pytest
        import mylib

        @pytest.mark.backend("thread")
        def test_thread():
            assert mylib.in_thread() == "thread"

        @pytest.mark.backend("process")
        def test_process():
            assert mylib.in_child() == "process"

        @pytest.mark.backend("asyncio")
        async def test_asyncio():
            assert await mylib.in_loop() == "asyncio"
        """,
    )
    # What coverage documents for measuring threads and multiprocessing children.
    (pytester.path / ".coveragerc").write_text(
        "[run]\nparallel = true\nconcurrency = thread, multiprocessing\nsource = .\n"
    )
    pytester.run(sys.executable, "-m", "coverage", "run", "-m", "pytest", "-p", "no:cacheprovider")
    pytester.run(sys.executable, "-m", "coverage", "combine")
    report = pytester.run(sys.executable, "-m", "coverage", "report", "-m", "--include=mylib.py")
    # Only never_called's body is missing: lines in the thread, the child and the loop count.
    report.stdout.fnmatch_lines(["mylib.py * 8 * 1 * 88% * 11"])
