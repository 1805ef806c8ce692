"""--concur-claim: the async tests pytest-asyncio and anyio would run, run under the backends."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from _helpers import BACKENDS, anyio_on_asyncio

pytest.importorskip("pytest_asyncio")
pytest.importorskip("anyio")

# Each suite appends one line per body run to RUNS (the file named by CONCUR_RUNS), so that a
# body run twice, or never, shows.
_RUNS = """
import os

def ran(name):
    with open(os.environ["CONCUR_RUNS"], "a") as log:
        log.write(name + "\\n")
"""

STRICT_SUITE = (
    _RUNS
    + """
import asyncio
import pytest
import pytest_asyncio

closed = []

@pytest_asyncio.fixture
async def loop_id():
    yield id(asyncio.get_running_loop())
    await asyncio.sleep(0)
    closed.append("loop_id")

@pytest_asyncio.fixture
async def queue():
    return asyncio.Queue()

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def config():
    return {"name": "db"}

@pytest.mark.asyncio
async def test_fixture_shares_the_loop(request, loop_id, queue, concur_backend):
    ran("shares")
    if concur_backend is not None:
        # pytest-asyncio set up no loop of its own for this item.
        assert "_function_scoped_runner" not in request.fixturenames
    if concur_backend != "process":
        assert id(asyncio.get_running_loop()) == loop_id
        await queue.put(1)
        assert await queue.get() == 1

@pytest.mark.asyncio
async def test_module_fixture(config):
    ran("module_fixture")
    assert config == {"name": "db"}

@pytest.mark.asyncio
@pytest.mark.parametrize("n", [1, 2])
async def test_param(n):
    ran(f"param{n}")
    await asyncio.sleep(0)
    assert n in (1, 2)

@pytest.mark.asyncio
async def test_fails():
    ran("fails")
    assert 1 == 2

@pytest.mark.asyncio
async def test_skips():
    ran("skips")
    pytest.skip("not today")

@pytest.mark.asyncio
@pytest.mark.xfail(reason="known", strict=True)
async def test_xfails():
    ran("xfails")
    raise ValueError

@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop():
    ran("module_loop")

@pytest.mark.asyncio
class TestMethods:
    async def test_method(self):
        ran("method")

def test_teardown_ran():
    assert closed.count("loop_id") == 1
"""
)

AUTO_SUITE = (
    _RUNS
    + """
import asyncio
import pytest

@pytest.fixture
async def value():
    await asyncio.sleep(0)
    yield 42

async def test_unmarked(value):
    ran("unmarked")
    assert value == 42

async def test_fails(value):
    ran("fails")
    assert value == 41

class TestClass:
    @pytest.fixture
    async def owner(self):
        return self

    async def test_bound_fixture(self, owner):
        ran("bound")
        assert owner is self

def test_sync():
    pass
"""
)

ANYIO_SUITE = (
    _RUNS
    + """
import anyio
import pytest

pytestmark = pytest.mark.anyio

@pytest.fixture
async def stream():
    send, receive = anyio.create_memory_object_stream(1)
    yield send, receive
    send.close()
    receive.close()

async def test_stream(stream, concur_backend):
    ran("stream")
    send, receive = stream
    if concur_backend != "process":
        await send.send(1)
        assert await receive.receive() == 1

async def test_task_group(anyio_backend_name):
    ran("task_group")
    assert anyio_backend_name == "asyncio"
    async with anyio.create_task_group() as group:
        group.start_soon(anyio.sleep, 0)

async def test_fails():
    ran("fails")
    with anyio.fail_after(5):
        raise KeyError("x")
"""
)

SUITES = {
    "strict": ("asyncio", "strict", STRICT_SUITE),
    "auto": ("asyncio", "auto", AUTO_SUITE),
    "anyio": ("anyio", "strict", ANYIO_SUITE),
}


@pytest.fixture
def with_async_plugins(monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester) -> None:
    """Let pytest-asyncio into the inner runs (tests/conftest.py keeps it out), and run
    anyio's tests on asyncio alone, as where trio is not installed.

    The claim leaves anyio's trio items to anyio by design (tested on their own below), and
    the suites here count the rest.
    """
    monkeypatch.delenv("PYTEST_ADDOPTS")
    anyio_on_asyncio(pytester)


def _without_backend(nodeid: str, backend: str) -> str:
    """The node id the item has in a plain run: its backend's part of the id removed."""
    match = re.fullmatch(r"(.*)\[(.*)\]", nodeid)
    if match is None:
        return nodeid
    parts = match[2].split("-")
    if backend not in parts:
        return nodeid
    parts.remove(backend)
    return f"{match[1]}[{'-'.join(parts)}]" if parts else match[1]


@pytest.mark.usefixtures("with_async_plugins")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suite", list(SUITES))
def test_claimed_suite_has_the_outcomes_of_its_plain_run(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    outcomes_of: Callable[[pytest.HookRecorder], dict[str, str]],
    suite: str,
    backend: str,
) -> None:
    claim, mode, source = SUITES[suite]
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_suite=source)
    runs = pytester.path / "runs.txt"
    monkeypatch.setenv("CONCUR_RUNS", str(runs))

    plain = outcomes_of(pytester.inline_run("-p", "no:cacheprovider"))
    plain_runs = sorted(runs.read_text().splitlines())
    runs.unlink()
    claimed_run = pytester.inline_run(
        "-p", "no:cacheprovider", f"--concur-backends={backend}", f"--concur-claim={claim}"
    )
    claimed = outcomes_of(claimed_run)

    assert "failed" in plain.values()  # the suites fail somewhere: failures must come back
    assert {_without_backend(nodeid, backend): o for nodeid, o in claimed.items()} == plain
    # Every body ran exactly once, as in the plain run (a claimed body once, under the backend).
    assert sorted(runs.read_text().splitlines()) == plain_runs
    # The async tests ran under the backend, but for a module loop_scope, left to pytest-asyncio.
    under_backend = {nodeid for nodeid in claimed if nodeid != _without_backend(nodeid, backend)}
    left = {nodeid for nodeid in claimed if "module_loop" in nodeid or "sync" in nodeid}
    assert under_backend | left == set(claimed) - {"test_suite.py::test_teardown_ran"}


@pytest.mark.usefixtures("with_async_plugins")
def test_summary_names_the_option_for_tests_left_to_their_plugin(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_a():
            pass

        @pytest.mark.anyio
        async def test_b():
            pass
        """
    )
    result = pytester.runpytest("--concur-backends=thread")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 1 async test(s) left to pytest-asyncio (its @pytest.mark.asyncio), "
            "which runs them; --concur-claim=asyncio runs them under the backends",
            "pytest-concur: 1 async test(s) left to anyio (its @pytest.mark.anyio), "
            "which runs them; --concur-claim=anyio runs them under the backends",
        ]
    )
    claimed = pytester.runpytest("-v", "--concur-backends=thread", "--concur-claim=asyncio,anyio")
    claimed.assert_outcomes(passed=2)
    claimed.stdout.fnmatch_lines(["*test_a[[]thread[]] PASSED*", "*test_b[[]asyncio-thread[]]*"])
    claimed.stdout.no_fnmatch_line("*left to*")


@pytest.mark.usefixtures("with_async_plugins")
def test_claim_ini_key_and_explicit_backend_marker(pytester: pytest.Pytester) -> None:
    # With the claim, a test marked for both pytest-asyncio and pytest-concur is no error:
    # pytest-concur runs it, under the marker's backends.
    pytester.makeini(
        "[pytest]\nconcur_claim = asyncio\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.backend("thread", "asyncio")
        async def test_both(concur_backend):
            assert concur_backend in ("thread", "asyncio")
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_both[[]thread[]] PASSED*", "*test_both[[]asyncio[]]*"])


@pytest.mark.usefixtures("with_async_plugins")
def test_a_wider_loop_is_left_to_its_plugin_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "asyncio_default_test_loop_scope = module\n"
    )
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        loops = set()

        @pytest.mark.asyncio
        async def test_one():
            loops.add(asyncio.get_running_loop())

        @pytest.mark.asyncio
        async def test_two():
            loops.add(asyncio.get_running_loop())
            assert len(loops) == 1  # they share pytest-asyncio's module loop

        @pytest.fixture(scope="module")
        async def server():
            yield "up"

        @pytest.mark.anyio
        async def test_anyio_server(server):
            assert server == "up"
        """
    )
    result = pytester.runpytest("-v", "--concur-backends=thread", "--concur-claim=asyncio,anyio")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "pytest-concur: 2 async test(s) left to pytest-asyncio (loop_scope='module': it "
            "shares one loop with other tests, and a backend runs each body on a loop of its "
            "own; give it loop_scope='function' to claim it), which runs them",
            "pytest-concur: 1 async test(s) left to anyio (its module-scoped async fixture "
            "'server' runs on the test's loop, *), which runs them",
            "*::test_one PASSED*",
        ]
    )


@pytest.mark.usefixtures("with_async_plugins")
def test_anyio_backend_options_are_skipped_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(params=["asyncio", ("asyncio", {"debug": True})], ids=["plain", "debug"])
        def anyio_backend(request):
            return request.param

        @pytest.mark.anyio
        async def test_x():
            pass
        """
    )
    result = pytester.runpytest("-rs", "--concur-backends=thread", "--concur-claim=anyio")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED * pytest-concur runs anyio's tests on asyncio without options "
            "(--concur-claim=anyio), and this one's anyio_backend is ('asyncio', {'debug': True}):"
            " without --concur-claim=anyio, anyio runs it"
        ]
    )


@pytest.mark.usefixtures("with_async_plugins")
def test_an_unparametrized_anyio_backend_that_is_not_asyncio_fails_the_item(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_x():
            pass
        """
    )
    result = pytester.runpytest("--concur-backends=thread", "--concur-claim=anyio")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_x[[]thread[]]: pytest-concur runs anyio's tests on asyncio without options *"
            "anyio_backend is 'trio'*Parametrize the anyio_backend fixture*"
        ]
    )
