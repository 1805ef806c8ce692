"""A task that swallows its cancellation: the loop's close gives up on it, and says so."""

from __future__ import annotations

import pytest

STUBBORN = """
import asyncio
import pytest

async def stubborn():
    while True:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            pass  # swallowed: the task goes on
"""


def test_task_that_ignores_cancellation_is_given_up_on_and_named(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        STUBBORN
        + """
@pytest.mark.backend("asyncio")
async def test_leaves_a_stubborn_task():
    asyncio.create_task(stubborn(), name="poller")
    await asyncio.sleep(0)

@pytest.mark.backend("asyncio")
async def test_next_async():
    await asyncio.sleep(0.01)

@pytest.mark.backend("thread")
def test_next_thread():
    pass

@pytest.mark.backend("process")
def test_next_process():
    pass
"""
    )
    # The deadline is far: the close must give up long before it, on its own.
    result = pytester.runpytest_subprocess("--concur-timeout=60", "-v", timeout=120)
    result.assert_outcomes(failed=1, errors=1, passed=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_stubborn_task*",
            "pytest-concur: 1 task did not end when cancelled, so the event loop could not be "
            "closed cleanly",
            "  Task 'poller' (coroutine=stubborn) created at "
            "test_task_that_ignores_cancellation_is_given_up_on_and_named.py:13 in "
            "test_leaves_a_stubborn_task",
            "  Still running 1 s after the cancellation (concur_leak_grace), it caught "
            "CancelledError and went on. pytest-concur gave up on it*",
        ]
    )
    for test in ("test_next_async", "test_next_thread", "test_next_process"):
        result.stdout.fnmatch_lines([f"*::{test}*PASSED*"])
    out = result.stdout.str()
    assert "Timeout" not in out
    assert "Task was destroyed but it is pending" not in out + result.stderr.str()
    assert "was never retrieved" not in out


def test_its_report_does_not_claim_it_ended(pytester: pytest.Pytester, backend_name: str) -> None:
    # Under every backend: the item's loop (asyncio, thread) or the child's (process).
    pytester.makepyfile(
        STUBBORN
        + f"""
@pytest.mark.backend("{backend_name}")
@pytest.mark.concur_allow(tasks=["poller"])  # allowed to stay: only the close sees it
async def test_leaves_a_stubborn_task():
    asyncio.create_task(stubborn(), name="poller")
    await asyncio.sleep(0)
"""
    )
    result = pytester.runpytest_subprocess("--concur-timeout=60", timeout=120)
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 1 task did not end when cancelled*",
            "  Task 'poller' (coroutine=stubborn)*",
        ]
    )
    result.stdout.no_fnmatch_line("*pytest-concur cancelled it*")
    result.stdout.no_fnmatch_line("*Timeout*")
