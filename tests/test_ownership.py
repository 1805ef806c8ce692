"""Leaks are judged by who owns the thing, after the whole teardown: no false alarms on
correct suites (a fixture's lazily started worker, a cleanup fixture torn down later, the
worker-thread caches of libraries), while what a test or a fixture abandons is still caught.
"""

from __future__ import annotations

import pytest
from _helpers import FAST, run_maybe_fresh
from _helpers import run_fresh as run

# Every test of this module holds both for plain tests checked with --concur-check-all and
# for tests that run under the in-process backends. (Under `process` the body runs in a
# child: an object a fixture made in pytest's process cannot start a worker there that the
# fixture would stop.)
MODES = [
    pytest.param(("--concur-check-all",), id="check-all"),
    pytest.param(("--concur-backends=thread",), id="thread"),
    pytest.param(("--concur-backends=asyncio",), id="asyncio"),
]

# A worker whose thread starts on first use, and the conftest.py of the tests below: the
# line numbers are part of the expected reports. Its thread is a daemon: one that a report
# leaves running does not keep the inner run from exiting.
LAZY = """
import threading

import pytest


class LazyWorker:
    def __init__(self):
        self._thread = None
        self._stop = threading.Event()

    def call(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._stop.wait, name="lazy", daemon=True)
            self._thread.start()
        return 42

    def join(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@pytest.fixture
def worker():
    worker = LazyWorker()
    yield worker
    worker.join()
"""


def run_module(
    pytester: pytest.Pytester,
    mode: tuple[str, ...],
    conftest: str | None,
    module: str,
    *,
    fresh: bool = True,
) -> pytest.RunResult:
    """Run a test module (with a conftest.py) in one mode: in a fresh interpreter, or inline
    (``fresh=False``) for a correct suite, which joins every thread it starts and leaves
    nothing behind in this process."""
    pytester.makeini(FAST)
    if conftest is not None:
        pytester.makeconftest(conftest)
    pytester.makepyfile(module)
    return run_maybe_fresh(pytester, fresh, *mode)


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return tuple(request.param)


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("scope", ["function", "module", "session"])
def test_worker_a_fixtures_object_starts_lazily_is_the_fixtures(
    pytester: pytest.Pytester, mode: tuple[str, ...], scope: str
) -> None:
    result = run_module(
        pytester,
        mode,
        LAZY,
        f"""
        import pytest
        from conftest import LazyWorker

        @pytest.fixture(scope="{scope}")
        def worker():  # conftest.py's, with another scope
            worker = LazyWorker()
            yield worker
            worker.join()

        def test_first_use(worker):
            assert worker.call() == 42

        def test_second_use(worker):
            assert worker.call() == 42
        """,
        fresh=False,
    )
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*pytest-concur: *")


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_worker_of_an_object_held_by_a_fixtures_value_is_the_fixtures(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    # The worker is not the value itself: the client the fixture returns holds it.
    result = run_module(
        pytester,
        mode,
        LAZY,
        """
        import pytest
        from conftest import LazyWorker

        class Client:
            def __init__(self):
                self.backends = {"main": LazyWorker()}

            def get(self):
                return self.backends["main"].call()

        @pytest.fixture
        def client():
            client = Client()
            yield client
            client.backends["main"].join()

        def test_get(client):
            assert client.get() == 42
        """,
        fresh=False,
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_lazy_worker_a_fixture_never_stops_is_its_teardown_error(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        LAZY,
        """
        import pytest
        from conftest import LazyWorker

        @pytest.fixture
        def forgetful():
            yield LazyWorker()  # and never joins it

        def test_first_use(forgetful):
            assert forgetful.call() == 42
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_first_use*",
            "pytest-concur: fixture 'forgetful' (test_*.py:4) left 1 thread running",
            "  Thread 'lazy' (target=Event.wait, daemon) started at conftest.py:14 in *call",
            "  Python cannot stop a thread from outside, so it is left running. Make the "
            "fixture stop and join it in its teardown, *",
        ]
    )


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_worker_a_body_builds_and_abandons_still_fails_it(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    # The same class, but the body made the object: no fixture owns it.
    result = run_module(
        pytester,
        mode,
        LAZY,
        """
        from conftest import LazyWorker

        def test_own_worker(worker):
            mine = LazyWorker()
            assert mine.call() == worker.call()
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_own_worker*",
            "pytest-concur: the test left 1 thread running, still after its fixtures' teardown",
            "  Thread 'lazy' (target=Event.wait, daemon) started at conftest.py:14 in *call",
            "  Python cannot stop a thread from outside, so it is left running. Make the test "
            "stop and join it, or start it from a fixture's objects and stop it in that "
            "fixture's teardown *",
        ]
    )
    # One report: the fixture's own worker is the fixture's, and it joined it.
    result.stdout.no_fnmatch_line("*fixture 'worker'*")


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_body_without_fixture_teardowns_still_fails_in_its_call(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        LAZY,
        """
        import pytest
        from conftest import LazyWorker

        @pytest.fixture
        def answer():
            return 42  # no teardown: nothing could stop the worker after the body

        def test_abandons(answer):
            assert LazyWorker().call() == answer

        def test_next():
            pass
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_abandons*",
            "pytest-concur: the test left 1 thread running",
            "  Thread 'lazy' * started at conftest.py:14 in *call",
            "  * Make the test stop and join it, or allow it: @pytest.mark.concur_allow(*",
        ]
    )


# Actors in the manner of actor libraries: each runs a thread until a registry stops it.
ACTORS = """
import threading

import pytest

REGISTRY = []


class Actor:
    def __init__(self, name):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stop.wait, name=name)
        self._thread.start()
        REGISTRY.append(self)


def stop_all():
    while REGISTRY:
        actor = REGISTRY.pop()
        actor._stop.set()
        actor._thread.join()


@pytest.fixture
def _stop_all():
    yield
    stop_all()
"""


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_what_a_cleanup_fixture_torn_down_later_stops_is_no_leak(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        ACTORS,
        """
        import pytest
        from conftest import Actor

        # Set up first, so torn down last: after every other fixture of each test.
        pytestmark = pytest.mark.usefixtures("_stop_all")

        @pytest.fixture
        def refs():
            return [Actor(f"ref-{i}") for i in range(5)]

        @pytest.fixture
        def pair():
            yield Actor("left"), Actor("right")  # stopped by _stop_all, not here

        def test_body_starts_actors():
            Actor("body-1")
            Actor("body-2")

        def test_fixture_returns_started_actors(refs):
            assert len(refs) == 5

        def test_generator_fixture_yields_started_actors(pair, refs):
            Actor("body-3")
        """,
        fresh=False,
    )
    result.assert_outcomes(passed=3)
    result.stdout.no_fnmatch_line("*pytest-concur: *")


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_what_no_teardown_stops_is_still_reported_after_them_all(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        ACTORS,
        """
        import threading
        import pytest
        from conftest import Actor

        pytestmark = pytest.mark.usefixtures("_stop_all")
        STRAY = threading.Event()

        @pytest.fixture
        def stray():
            threading.Thread(target=STRAY.wait, name="stray-fixture").start()
            yield

        def test_body_and_fixture_leave_strays(stray):
            threading.Thread(target=STRAY.wait, name="stray-body").start()

        def test_release():
            STRAY.set()
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_body_and_fixture_leave_strays*",
            "pytest-concur: the test left 1 thread running, still after its fixtures' teardown",
            "  Thread 'stray-body' * started at test_*.py:14 in test_body_and_fixture_leave_strays",
            "*",
            "pytest-concur: fixture 'stray' (test_*.py:8) left 1 thread running",
            "  Thread 'stray-fixture' * started at test_*.py:10 in stray",
        ]
    )


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_thread_pool_a_fixtures_object_creates_lazily_is_the_fixtures(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        None,
        """
        from concurrent.futures import ThreadPoolExecutor
        import pytest

        class Service:
            def __init__(self):
                self._pool = None

            def compute(self, x):
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(2, thread_name_prefix="service")
                return self._pool.submit(pow, x, 2).result()

            def close(self):
                if self._pool is not None:
                    self._pool.shutdown()

        @pytest.fixture
        def service():
            service = Service()
            yield service
            service.close()

        @pytest.fixture
        def leaky_service():
            yield Service()

        def test_compute(service):
            assert service.compute(3) == 9

        def test_leaky(leaky_service):
            assert leaky_service.compute(4) == 16
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaky*",
            "pytest-concur: fixture 'leaky_service' (*.py:23) left 1 thread pool open",
            "  ThreadPoolExecutor 'service' with 1 worker thread, created at *.py:10 in "
            "*compute, was never shut down",
        ]
    )
    result.stdout.no_fnmatch_line("*test_compute*")


# Not under `asyncio`: trio.run() and anyio.run() refuse to run inside a running loop.
@pytest.mark.parametrize("mode", MODES[:2], indirect=True)
def test_worker_thread_caches_of_trio_and_anyio_are_process_wide(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    pytest.importorskip("trio")
    pytest.importorskip("anyio")
    result = run_module(
        pytester,
        mode,
        None,
        """
        import time
        import anyio
        import trio

        def test_trio_to_thread():
            async def main():
                await trio.to_thread.run_sync(time.sleep, 0)
            trio.run(main)

        def test_anyio_to_thread_on_trio():
            async def main():
                await anyio.to_thread.run_sync(time.sleep, 0)
            anyio.run(main, backend="trio")
        """,
    )
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*pytest-concur: *")


@pytest.mark.parametrize(
    "args",
    [
        # anyio's own pytest plugin runs the test on a loop that outlives it.
        pytest.param(("--concur-check-all", "-p", "anyio", "-m", "anyio"), id="anyio-plugin"),
        # The asyncio backend runs it on the item's loop, closed after the teardown.
        pytest.param(("--concur-backends=asyncio", "-m", "not anyio"), id="asyncio"),
    ],
)
def test_anyio_worker_threads_on_asyncio_are_a_process_wide_cache(
    pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    pytest.importorskip("anyio")
    # Not timed: under load, the first step of anyio's runner (which sets the test up) may
    # hold the loop past the threshold, which is not what this test is about.
    pytester.makeini(FAST + "markers = anyio\nconcur_blocked_loop = 0\n")
    pytester.makepyfile(
        """
        import time
        import anyio
        import pytest

        @pytest.mark.anyio
        @pytest.mark.parametrize("anyio_backend", ["asyncio"])
        async def test_to_thread_in_anyios_plugin(anyio_backend):
            await anyio.to_thread.run_sync(time.sleep, 0)

        async def test_to_thread():
            await anyio.to_thread.run_sync(time.sleep, 0)
        """
    )
    result = run(pytester, *args)
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.no_fnmatch_line("pytest-concur: the test left*")


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_child_process_a_fixtures_object_starts_lazily_is_the_fixtures(
    pytester: pytest.Pytester, mode: tuple[str, ...]
) -> None:
    result = run_module(
        pytester,
        mode,
        None,
        """
        import subprocess
        import sys
        import pytest

        class Server:
            def __init__(self):
                self.child = None

            def url(self):
                if self.child is None:
                    self.child = subprocess.Popen([sys.executable, "-c", "input()"],
                                                  stdin=subprocess.PIPE)
                return "http://127.0.0.1:1"

            def stop(self):
                if self.child is not None:
                    self.child.communicate(b"\\n")

        @pytest.fixture
        def server():
            server = Server()
            yield server
            server.stop()

        @pytest.fixture(scope="module")
        def forgotten():
            yield Server()  # its child is never stopped

        def test_url(server):
            assert server.url()

        def test_forgotten(forgotten):
            assert forgotten.url()
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgotten*",
            "pytest-concur: fixture 'forgotten' (*.py:25) left 1 child process running",
            "  Process * (pid *) started at *.py:11 in *url",
        ]
    )
    result.stdout.no_fnmatch_line("*test_url*")
