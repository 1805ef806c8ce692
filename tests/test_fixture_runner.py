"""A backend that runs async fixtures itself: a trio backend written outside the package.

The conftest below is what a third party writes (issue 15): a backend with
``runs_fixtures = True`` whose runner (a ``pytest_concur.FixtureRunner``) keeps one trio
run per item in a thread of its own, so that the item's async fixtures and its body share
it; an async generator fixture's setup and teardown run in one trio task, as a nursery
opened before its ``yield`` needs. Skipped where trio is not installed.
"""

from __future__ import annotations

import pytest
from _helpers import NO_RANDOMLY, docs_example, runner

pytest.importorskip("trio")

run = runner("--timeout=30", *NO_RANDOMLY)

# The documented example itself.
TRIO_BACKEND = docs_example("plugins.md", "A trio backend:")


def test_async_fixtures_and_the_body_share_one_trio_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(TRIO_BACKEND)
    pytester.makepyfile(
        """
        import pytest
        import trio

        EVENTS = []

        @pytest.fixture
        async def root():
            await trio.sleep(0)
            return trio.lowlevel.current_root_task()

        @pytest.fixture
        async def service(root):
            # A nursery open across the test: its setup and teardown in one trio task.
            async with trio.open_nursery() as nursery:
                ticks = trio.Event()

                async def ticker():
                    ticks.set()
                    await trio.sleep_forever()

                nursery.start_soon(ticker)
                await ticks.wait()
                yield trio.lowlevel.current_root_task()
                EVENTS.append("service torn down")
                nursery.cancel_scope.cancel()

        @pytest.mark.backend("trio")
        async def test_shares_the_run(root, service):
            await trio.sleep(0)
            assert root is service is trio.lowlevel.current_root_task()

        @pytest.mark.backend("trio")
        def test_sync_body(service):
            assert service is not None

        def test_teardown_ran():
            assert EVENTS == ["service torn down", "service torn down"]
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_shares_the_run[[]trio[]] PASSED*"])


def test_a_wider_scoped_async_fixture_gets_a_run_of_its_own(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(TRIO_BACKEND)
    pytester.makepyfile(
        test_a="""
        import pytest
        import trio

        SEEN = []

        @pytest.fixture(scope="module")
        async def shared():
            SEEN.append(trio.lowlevel.current_root_task())
            yield len(SEEN)
            SEEN.append("closed")

        @pytest.mark.backend("trio")
        @pytest.mark.parametrize("n", [1, 2])
        async def test_uses(shared, n):
            assert shared == 1
            assert SEEN[0] is not trio.lowlevel.current_root_task()
        """,
        test_b="""
        from test_a import SEEN

        def test_after():
            assert SEEN[-1] == "closed"
        """,
    )
    run(pytester).assert_outcomes(passed=3)


def test_errors_of_fixtures_and_bodies_are_reported_as_pytest_reports_them(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(TRIO_BACKEND)
    pytester.makepyfile(
        """
        import pytest
        import trio

        @pytest.fixture
        async def broken():
            await trio.sleep(0)
            raise LookupError("no such service")

        @pytest.fixture
        async def bad_teardown():
            yield 1
            raise OSError("could not close")

        @pytest.mark.backend("trio")
        async def test_setup_error(broken):
            pass

        @pytest.mark.backend("trio")
        async def test_teardown_error(bad_teardown):
            pass

        @pytest.mark.backend("trio")
        async def test_fails():
            await trio.sleep(0)
            assert 1 == 2
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*LookupError: no such service",
            "*OSError: could not close",
            "FAILED *test_fails[[]trio[]]*",
            "ERROR *test_setup_error[[]trio[]]*",
            "ERROR *test_teardown_error[[]trio[]]*",
        ]
    )


def test_a_runner_that_cannot_run_fixtures_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        class HalfRunner:
            def run(self, call):
                call()

            def close(self):
                pass

        class HalfBackend:
            name = "half"
            description = "says it runs fixtures, cannot"
            runs_fixtures = True

            def start(self, item):
                return HalfRunner()

        def pytest_concur_add_backends(config):
            return [HalfBackend()]
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("half")
        def test_x():
            pass

        def test_plain():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*backend 'half' sets runs_fixtures, but its runner HalfRunner has no "
            "run_fixture() and no run_asyncgen_fixture(): implement "
            "pytest_concur.FixtureRunner*",
        ]
    )
