"""``--concur-check-all``: task deadlocks on the loops of pytest-asyncio and anyio tests.

Their loops are made by their fixtures (or by anyio inside the call), before the test's
watch; under the option they are watched for deadlocks as pytest-concur's own loops are
(``_loop_deadlocks.ThreadLoops``). Each inner run has pytest-timeout as its safety net: a
deadlock is a ``DeadlockError`` well before it, never a timeout.
"""

from __future__ import annotations

import pytest
from _helpers import FAST, NO_RANDOMLY, runner

pytest.importorskip("pytest_asyncio")
pytest.importorskip("anyio")

run = runner("--timeout=20", "-v", *NO_RANDOMLY)

HEADLINE = (
    "*DeadlockError: pytest-concur: deadlock: every task of the event loop waits, and "
    "nothing can wake one (no ready callback, no timer, no I/O, no executor job, no "
    "thread at work)"
)

ASYNCIO_DEADLOCKS = """
import asyncio
import pytest

{mark}
async def test_two_tasks_wait_for_each_other():
    first, second = asyncio.Event(), asyncio.Event()

    async def one():
        await first.wait()
        second.set()

    async def two():
        await second.wait()
        first.set()

    await asyncio.gather(one(), two())

{mark}
async def test_a_future_nobody_resolves():
    await asyncio.get_running_loop().create_future()

{mark}
async def test_next():
    await asyncio.sleep(0)
"""


@pytest.fixture
def plugins_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-asyncio and anyio load in the inner runs (the suite's conftest turns
    pytest-asyncio off there)."""
    monkeypatch.delenv("PYTEST_ADDOPTS")


@pytest.mark.usefixtures("plugins_on")
@pytest.mark.parametrize(
    ("mode", "mark"),
    [("strict", "@pytest.mark.asyncio"), ("auto", "")],
    ids=["strict", "auto"],
)
def test_a_deadlock_of_a_pytest_asyncio_test_fails_at_once(
    pytester: pytest.Pytester, mode: str, mark: str
) -> None:
    pytester.makeini(
        FAST + f"asyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(ASYNCIO_DEADLOCKS.format(mark=mark))
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_two_tasks_wait_for_each_other FAILED*",
            "*::test_a_future_nobody_resolves FAILED*",
            "*::test_next PASSED*",
            HEADLINE,
            "*  task '*' (test_two_tasks_wait_for_each_other) awaits gather() of tasks '*', '*'",
            "*  task '*' (test_two_tasks_wait_for_each_other.<locals>.one) awaits asyncio "
            "Event.wait()",
            "*    at test_*.py:9 in one",
            "*  task '*' (test_two_tasks_wait_for_each_other.<locals>.two) awaits asyncio "
            "Event.wait()",
            "*    at test_*.py:13 in two",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*  task '*' (test_a_future_nobody_resolves) awaits a future that nothing completes",
            "*    at test_*.py:20 in test_a_future_nobody_resolves",
        ]
    )
    out = result.stdout.str()
    assert "Timeout" not in out
    # The tasks the deadlock stuck are in its report: no second report of them as left
    # pending.
    assert "pending" not in out


@pytest.mark.usefixtures("plugins_on")
def test_a_module_loop_keeps_serving_after_a_deadlock(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        pytestmark = pytest.mark.asyncio(loop_scope="module")
        LOOPS = []

        async def test_before():
            LOOPS.append(asyncio.get_running_loop())
            await asyncio.sleep(0.01)

        async def test_waits_on_itself():
            lock = asyncio.Lock()
            async with lock:
                async with lock:
                    pass

        async def test_after():
            assert asyncio.get_running_loop() is LOOPS[0]
            await asyncio.sleep(0.01)

        def test_the_loop_has_its_own_selector_back():
            assert type(LOOPS[0]._selector).__module__ == "selectors"
        """
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=1, passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_waits_on_itself FAILED*",
            HEADLINE,
            "*  task '*' (test_waits_on_itself) awaits asyncio Lock.acquire()",
            "*    at test_*.py:14 in test_waits_on_itself",
        ]
    )


@pytest.mark.usefixtures("plugins_on")
def test_a_deadlock_of_an_anyio_test_fails_at_once(pytester: pytest.Pytester) -> None:
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import asyncio
        import anyio
        import pytest

        @pytest.fixture(scope="module")
        def anyio_backend():
            return "asyncio"

        @pytest.fixture(scope="module")
        async def shared_runner(anyio_backend):
            yield

        @pytest.mark.anyio
        async def test_waits_for_an_event_nobody_sets():
            await anyio.Event().wait()

        @pytest.mark.anyio
        async def test_on_a_runner_shared_with_a_fixture(shared_runner):
            await asyncio.Event().wait()

        @pytest.mark.anyio
        async def test_next(shared_runner):
            await anyio.sleep(0)
        """
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_waits_for_an_event_nobody_sets FAILED*",
            "*::test_on_a_runner_shared_with_a_fixture FAILED*",
            "*::test_next PASSED*",
            HEADLINE,
            # anyio runs the test inside its runner task: that task is the body's.
            "*  task '*' (TestRunner._run_tests_and_fixtures) awaits asyncio Event.wait()",
            "*Await chain of task '*':",
            "*  File *anyio*, in _run_tests_and_fixtures",
            '*  File "*test_*.py", line 15, in test_waits_for_an_event_nobody_sets',
        ]
    )
    result.stdout.fnmatch_lines(["*    at test_*.py:19 in test_on_a_runner_shared_with_a_fixture"])
    assert "Timeout" not in result.stdout.str()


def test_a_deadlock_in_asyncio_run_of_a_plain_test_fails_at_once(
    pytester: pytest.Pytester,
) -> None:
    # The loop is the test's own, made during the call: watched the same way.
    pytester.makeini(FAST)
    pytester.makepyfile(
        """
        import asyncio

        def test_runs_a_loop_that_deadlocks():
            async def main():
                await asyncio.Event().wait()

            asyncio.run(main())

        def test_next():
            assert asyncio.run(asyncio.sleep(0.01, "done")) == "done"
        """
    )
    result = run(pytester, "--concur-check-all")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            HEADLINE,
            "*  task '*' (test_runs_a_loop_that_deadlocks.<locals>.main) awaits asyncio "
            "Event.wait()",
            "*    at test_*.py:5 in main",
        ]
    )


NOT_DEADLOCKS = """
import asyncio, socket, threading, time
import pytest

{setup}

{mark}
async def test_awaits_a_timer():
    await asyncio.sleep(0.2)

{mark}
async def test_awaits_a_socket():
    async def echo(reader, writer):
        writer.write(await reader.read(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The peer answers late, from a thread: meanwhile the loop waits on the socket alone.
    def peer():
        with socket.create_connection(("127.0.0.1", port)) as conn:
            time.sleep(0.2)
            conn.sendall(b"hello")
            assert conn.recv(5) == b"hello"

    async with server:
        await asyncio.to_thread(peer)

{mark}
async def test_awaits_an_executor_job():
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, lambda: time.sleep(0.2) or 42) == 42

{mark}
async def test_awaits_a_thread_that_calls_back():
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def work():
        time.sleep(0.2)
        loop.call_soon_threadsafe(done.set_result, "ok")

    thread = threading.Thread(target=work)
    thread.start()
    assert await done == "ok"
    thread.join()
"""


@pytest.mark.usefixtures("plugins_on")
@pytest.mark.parametrize(
    ("setup", "mark"),
    [
        ("", "@pytest.mark.asyncio"),
        ('pytestmark = pytest.mark.asyncio(loop_scope="module")', ""),
        (
            '@pytest.fixture\ndef anyio_backend():\n    return "asyncio"\n',
            "@pytest.mark.anyio",
        ),
    ],
    ids=["pytest-asyncio", "pytest-asyncio-module-loop", "anyio"],
)
def test_waits_that_something_will_end_are_no_deadlock(
    pytester: pytest.Pytester, setup: str, mark: str
) -> None:
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(NOT_DEADLOCKS.format(setup=setup, mark=mark))
    result = run(pytester, "--concur-check-all", "-W", "error")
    result.assert_outcomes(passed=4)


@pytest.mark.usefixtures("plugins_on")
def test_without_check_all_their_loops_are_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        FAST + "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.timeout(0.5)
        async def test_a_future_nobody_resolves():
            await asyncio.get_running_loop().create_future()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout*0.5*"])
    assert "DeadlockError" not in result.stdout.str()
