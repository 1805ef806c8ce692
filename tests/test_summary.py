"""The "pytest-concur summary" section and the JUnit XML properties of backend items."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from _helpers import run_maybe_fresh

MIXED = """
    import threading
    import pytest

    @pytest.mark.backend("thread", "process", "asyncio")
    def test_everywhere():
        pass

    @pytest.mark.backend("thread", "process")
    def test_only_in_the_parent(concur_backend):
        assert concur_backend != "process"

    @pytest.mark.backend("thread", "asyncio")
    def test_skips_under_asyncio(concur_backend):
        if concur_backend == "asyncio":
            pytest.skip("not here")

    @pytest.mark.backend("thread")
    @pytest.mark.xfail(reason="known")
    def test_known_bug():
        assert False

    @pytest.fixture
    def broken():
        raise RuntimeError("setup")

    @pytest.mark.backend("process")
    def test_setup_error(broken):
        pass

    def test_plain():
        pass
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # xdist's workers are processes of their own: no inline run
    return run_maybe_fresh(pytester, "-n" in args, *args, timeout=120)


# Under -n 2 what the summary says reaches the controller only through the reports.
XDIST = pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])


@XDIST
def test_summary_counts_outcomes_per_backend_and_lists_tests_that_differ(
    pytester: pytest.Pytester, xdist: list[str]
) -> None:
    pytester.makepyfile(MIXED)
    result = run(pytester, *xdist)
    result.assert_outcomes(passed=6, failed=1, skipped=1, xfailed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*= pytest-concur summary =*",
            "thread:  3 passed, 1 xfailed",
            "process: 1 passed, 1 failed, 1 error",
            "asyncio: 1 passed, 1 skipped",
            "findings: none",
            "outcome differs between backends (2):",
            "  test_summary_counts_outcomes*.py::test_only_in_the_parent: thread passed, "
            "process failed",
            "  test_summary_counts_outcomes*.py::test_skips_under_asyncio: thread passed, "
            "asyncio skipped",
            "*= short test summary info =*",
        ]
    )
    # The plain test is none of the summary's business; without -rA there is no matrix.
    assert (
        "test_plain" not in result.stdout.str().split("pytest-concur summary")[1].split("short")[0]
    )
    result.stdout.no_fnmatch_line("test * thread * process * asyncio")


@pytest.mark.parametrize("flags", [["-rA"], ["-vv"], ["-rA", "-n", "2"]], ids=" ".join)
def test_more_verbosity_adds_the_test_by_backend_matrix(
    pytester: pytest.Pytester, flags: list[str]
) -> None:
    pytester.makepyfile(MIXED)
    result = run(pytester, *flags)
    result.stdout.fnmatch_lines(
        [
            "*= pytest-concur summary =*",
            "test * thread * process * asyncio",
            "*::test_everywhere * passed * passed * passed",
            "*::test_only_in_the_parent * passed * failed * -",
            "*::test_skips_under_asyncio * passed * - * skipped",
            "*::test_known_bug * xfailed * - * -",
            "*::test_setup_error * - * error * -",
        ]
    )


def test_no_section_when_no_test_ran_under_a_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*pytest-concur summary*")


FINDINGS = """
    import asyncio, os, threading, time
    import pytest

    @pytest.mark.backend("thread")
    def test_deadlock():
        a, b = threading.Lock(), threading.Lock()
        a_held, b_held = threading.Event(), threading.Event()

        def other():
            with b:
                b_held.set()
                a_held.wait()
                with a:
                    pass

        worker = threading.Thread(target=other)
        worker.start()
        with a:
            a_held.set()
            b_held.wait()
            with b:
                pass
        worker.join()

    @pytest.mark.backend("thread")
    def test_inversion():
        a, b = threading.Lock(), threading.Lock()
        with a:
            with b:
                pass
        with b:
            with a:
                pass

    @pytest.mark.backend("thread")
    def test_thread_leak():
        threading.Thread(target=time.sleep, args=(3,), daemon=True).start()

    @pytest.mark.backend("asyncio")
    async def test_task_leak():
        asyncio.get_running_loop().create_task(asyncio.sleep(3))

    @pytest.mark.backend("thread")
    def test_background_error():
        def fail():
            raise ValueError("lost")
        worker = threading.Thread(target=fail)
        worker.start()
        worker.join()

    @pytest.mark.backend("asyncio")
    async def test_blocked_loop():
        time.sleep(0.3)

    @pytest.mark.backend("thread")
    @pytest.mark.timeout(1)
    def test_hang():
        while True:
            time.sleep(0.01)

    @pytest.mark.backend("process")
    def test_crash():
        os._exit(3)
"""


@XDIST
def test_summary_counts_each_kind_of_finding(pytester: pytest.Pytester, xdist: list[str]) -> None:
    pytester.makepyfile(FINDINGS)
    result = pytester.runpytest_subprocess("-o", "concur_leak_grace=0.2", *xdist, timeout=120)
    result.assert_outcomes(failed=8)
    result.stdout.fnmatch_lines(
        [
            "*= pytest-concur summary =*",
            "thread:  5 failed",
            "process: 1 failed",
            "asyncio: 2 failed",
            "findings: 1 deadlock, 1 lock-order inversion, 1 leak (thread), 1 leak (task), "
            "1 background error, 1 blocked loop, 1 hang, 1 crashed child",
        ]
    )


def test_long_lists_of_differing_tests_are_cut(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        @pytest.mark.parametrize("n", range(12))
        def test_many(n, concur_backend):
            assert concur_backend == "thread"
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        [
            "outcome differs between backends (12):",
            "  *::test_many[[]9[]]: thread passed, asyncio failed",
            "  ... and 2 more (-rA shows every test)",
        ]
    )
    result.stdout.no_fnmatch_line("*test_many[[]10[]]: *")


def test_junit_xml_has_the_backend_and_findings_of_every_backend_item(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading, time
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        def test_fine():
            pass

        @pytest.mark.backend("thread")
        def test_deadlock():
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()

        @pytest.mark.backend("thread")
        def test_leak():
            threading.Thread(target=time.sleep, args=(3,), daemon=True).start()

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("--junitxml=junit.xml")
    result.assert_outcomes(passed=3, failed=2)
    root = ET.parse(pytester.path / "junit.xml").getroot()
    properties = {
        case.get("name"): [(p.get("name"), p.get("value")) for p in case.iter("property")]
        for case in root.iter("testcase")
    }
    assert properties["test_fine[thread]"] == [("concur_backend", "thread")]
    assert properties["test_fine[asyncio]"] == [("concur_backend", "asyncio")]
    assert properties["test_leak[thread]"] == [
        ("concur_backend", "thread"),
        ("concur_finding", "leak (thread)"),
    ]
    deadlock = properties["test_deadlock[thread]"]
    assert deadlock[:2] == [("concur_backend", "thread"), ("concur_finding", "deadlock")]
    assert [name for name, _ in deadlock[2:]] == ["concur_detection_ms"]
    assert 0 <= float(deadlock[2][1] or "") < 5000
    assert properties["test_plain"] == []


def test_xdist_controller_keeps_one_backend_entry_per_backend(pytester: pytest.Pytester) -> None:
    # pytest's terminal reporter keeps every report to the end; under xdist each arrives as
    # a fresh copy, so the controller shares one ("concur_backend", name) entry per backend
    # instead of keeping three copies an item (benchmarks/soak.py --xdist measures it).
    pytester.makeconftest(
        """
        def pytest_terminal_summary(terminalreporter, config):
            if hasattr(config, "workerinput"):
                return
            entries = [
                entry
                for reports in terminalreporter.stats.values()
                for report in reports
                for entry in getattr(report, "user_properties", ())
                if entry[0] == "concur_backend"
            ]
            distinct = len({id(entry) for entry in entries})
            terminalreporter.write_line(f"entries {len(entries)} distinct {distinct}")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        @pytest.mark.parametrize("n", range(10))
        def test_it(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", timeout=120)
    result.assert_outcomes(passed=20)
    result.stdout.fnmatch_lines(["entries 60 distinct 2"])
