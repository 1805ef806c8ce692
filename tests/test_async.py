"""Async test bodies and async fixtures under every backend."""

from __future__ import annotations

import sys

import pytest


def test_async_fixtures_share_the_loop_of_the_body(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        events = []

        @pytest.fixture
        async def queue():
            events.append("queue")
            return [] if "{backend_name}" == "process" else asyncio.Queue()

        @pytest.fixture
        async def server(queue):
            loop = asyncio.get_running_loop()
            events.append("server up")
            yield id(loop)
            await asyncio.sleep(0)
            events.append("server down")

        @pytest.mark.backend("{backend_name}")
        async def test_body(queue, server):
            if isinstance(queue, asyncio.Queue):
                await queue.put(1)
                assert await queue.get() == 1
            if "{backend_name}" != "process":
                assert id(asyncio.get_running_loop()) == server

        def test_teardown_ran():
            assert events == ["queue", "server up", "server down"]
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_sync_body_can_use_async_fixtures(pytester: pytest.Pytester, backend_name: str) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.fixture
        async def value():
            return 42

        @pytest.mark.backend("{backend_name}")
        def test_body(value):
            assert value == 42
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_wider_scoped_async_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        log = []

        @pytest.fixture(scope="module")
        async def resource():
            log.append("open")
            yield {"name": "db"}
            await asyncio.sleep(0)
            log.append("close")

        @pytest.fixture(scope="session")
        async def settings():
            return "s"

        @pytest.mark.backend("thread", "asyncio")
        async def test_a(resource, settings):
            assert resource["name"] == "db" and settings == "s"

        @pytest.mark.backend("asyncio")
        def test_b(resource):
            assert log == ["open"]
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_async_fixture_errors_are_reported_at_setup_and_teardown(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        async def broken_setup():
            raise RuntimeError("setup broke")

        @pytest.fixture
        async def broken_teardown():
            yield 1
            raise RuntimeError("teardown broke")

        @pytest.fixture
        async def yields_twice():
            yield 1
            yield 2

        @pytest.mark.backend("asyncio")
        def test_setup(broken_setup):
            pass

        @pytest.mark.backend("asyncio")
        def test_teardown(broken_teardown):
            pass

        @pytest.mark.backend("asyncio")
        def test_twice(yields_twice):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*RuntimeError: setup broke",
            "*RuntimeError: teardown broke",
            "*async fixture 'yields_twice' yielded more than once*",
        ]
    )


def test_async_fixture_in_a_test_class(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("asyncio", "thread")
        class TestService:
            @pytest.fixture
            async def client(self):
                self.opened = True
                yield "client"

            async def test_uses_client(self, client):
                assert client == "client"
                assert self.opened
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_async_fixtures_of_plain_tests_stay_pytests_business(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        async def value():
            return 1

        def test_plain(value):
            pass
        """
    )
    # Whatever this pytest version does with it (an error since pytest 9), the plugin
    # changes nothing.
    without = pytester.runpytest("-p", "no:concur").parseoutcomes()
    with_plugin = pytester.runpytest().parseoutcomes()
    without.pop("seconds", None)
    with_plugin.pop("seconds", None)
    assert with_plugin == without


def test_sync_body_under_asyncio_sees_the_running_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        def library_call():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return "sync path"
            return "async path"

        @pytest.mark.backend("thread", "asyncio")
        def test_path(concur_backend):
            expected = "async path" if concur_backend == "asyncio" else "sync path"
            assert library_call() == expected
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_pending_tasks_are_cancelled_when_the_loop_closes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        cancelled = []

        async def forever():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        # Allowed: the leak check would cancel it itself; this proves the loop's close does.
        @pytest.mark.concur_allow(tasks=["forever"])
        @pytest.mark.backend("asyncio", "thread")
        async def test_leaves_a_task():
            asyncio.get_running_loop().create_task(forever())
            await asyncio.sleep(0)

        def test_after():
            assert cancelled == [True, True]
        """
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_timeout_applies_to_the_thread_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.backend("thread", "asyncio")
        @pytest.mark.timeout(0.3, method="signal")
        def test_slow():
            time.sleep(2)

        def test_next():
            pass
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["Timeout (>0.3s, the pytest-timeout setting)*"])
    # The report shows where the body hangs, in its thread or in the loop's.
    result.stdout.fnmatch_lines(["*, in test_slow", "        time.sleep(2)"])


def test_wider_scoped_coroutine_fixture_keeps_its_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.fixture(scope="module")
        async def background():
            return asyncio.get_running_loop().create_task(asyncio.sleep(3600))

        @pytest.mark.backend("thread")
        @pytest.mark.concur_allow(tasks=["*"])
        def test_loop_still_open(background):
            assert not background.get_loop().is_closed()
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_pytest_asyncio_fixtures_stay_with_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_asyncio")
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio
        import pytest
        import pytest_asyncio

        @pytest_asyncio.fixture(scope="module", loop_scope="module")
        async def fixture_loop():
            return asyncio.get_running_loop()

        def test_sync_uses_fixture(fixture_loop):
            assert fixture_loop is not None

        @pytest.mark.asyncio(loop_scope="module")
        async def test_async_same_loop(fixture_loop):
            assert fixture_loop is asyncio.get_running_loop()
        """
    )
    pytester.runpytest("--concur-backends=thread").assert_outcomes(passed=2)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are new in 3.11")
@pytest.mark.parametrize(
    ("run", "error"),
    [
        ("asyncio.run(coro)", "asyncio.run() cannot be called from a running event loop"),
        (
            "loop.run_until_complete(coro)",
            "Cannot run the event loop while another loop is running",
        ),
    ],
)
def test_running_a_loop_in_a_sync_body_under_asyncio_says_why_it_fails(
    pytester: pytest.Pytester, run: str, error: str
) -> None:
    pytester.makepyfile(
        f"""
        import asyncio
        import pytest

        async def answer():
            return 42

        @pytest.mark.backend("thread", "asyncio")
        def test_runs_its_own_loop():
            coro = answer()
            loop = asyncio.new_event_loop()
            try:
                assert {run} == 42
            finally:
                coro.close()
                loop.close()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"E  *RuntimeError: {error}",
            "E  *pytest-concur: under the asyncio backend a plain def test body runs inside the "
            "running event loop*@pytest.mark.backend(*thread*, *process*).",
        ]
    )
