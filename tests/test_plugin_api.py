"""The plugin API: third-party backends go through the same hook as the built-ins."""

from __future__ import annotations

import inspect
import sys

import pytest

import pytest_concur

EXTRA_BACKEND = """
import threading
import pytest

class TracingRunner:
    def __init__(self, log):
        self.log = log

    def run(self, call):
        self.log.append(("run", call.item.name))
        previous = threading.current_thread().name
        threading.current_thread().name = "traced"
        try:
            call()
        finally:
            threading.current_thread().name = previous

    def close(self):
        self.log.append(("close",))

class TracingBackend:
    name = "traced"
    description = "runs the body in the main thread, renamed"

    def __init__(self):
        self.log = []

    def start(self, item):
        self.log.append(("start", item.name))
        return TracingRunner(self.log)

BACKEND = TracingBackend()

def pytest_concur_add_backends(config):
    return [BACKEND]

@pytest.fixture
def trace_log():
    return BACKEND.log
"""


def test_conftest_backend_works_with_the_marker(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(EXTRA_BACKEND)
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.backend("traced", "thread")
        def test_x(concur_backend):
            if concur_backend == "traced":
                assert threading.current_thread().name == "traced"

        def test_lifecycle(trace_log):
            assert trace_log == [
                ("start", "test_x[traced]"), ("run", "test_x[traced]"), ("close",)
            ]
        """
    )
    result = pytester.runpytest("-v", "--strict-markers")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_x[[]traced[]] PASSED*", "*test_x[[]thread[]] PASSED*"])


def test_conftest_backend_works_with_the_option_and_marker_selection(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(EXTRA_BACKEND)
    pytester.makepyfile("def test_plain(concur_backend): assert concur_backend == 'traced'")
    result = pytester.runpytest("-v", "--concur-backends=traced", "-m", "concur_traced")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_plain[[]traced[]] PASSED*"])


def test_unknown_name_lists_third_party_backends_too(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(EXTRA_BACKEND)
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--concur-backends=tracd")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*unknown backend 'tracd'*Did you mean 'traced'? Available backends: asyncio, "
            "process, thread, traced."
        ]
    )


@pytest.mark.parametrize(
    ("hook", "returned", "message"),
    [
        pytest.param(
            "backends",
            "[object()]",
            "ERROR: pytest-concur: pytest_concur_add_backends returned <object object at *> "
            "(from builtins), which is not a backend*",
            id="not-a-backend",
        ),
        pytest.param(
            "backends",
            "[Named('two words')]",
            "ERROR: pytest-concur: conftest registers a backend named 'two words'; a backend "
            "name must be a Python identifier*",
            id="bad-backend-name",
        ),
        pytest.param(
            "backends",
            "[Named('thread')]",
            "ERROR: pytest-concur: backend 'thread' is registered twice, by "
            "pytest_concur._backends.thread and by conftest; rename one of them.",
            id="duplicate-backend",
        ),
        pytest.param(
            "checks",
            "[object()]",
            "ERROR: pytest-concur: pytest_concur_add_checks returned <object object at *> "
            "(from builtins), which is not a check: it needs a str 'name', a str "
            "'description' and a 'watch(item)' method (see pytest_concur.Check).",
            id="not-a-check",
        ),
        pytest.param(
            "checks",
            "[Named('deadlock')]",
            "ERROR: pytest-concur: check 'deadlock' is registered twice, by "
            "pytest_concur._checks.deadlock and by conftest; rename one of them.",
            id="duplicate-check",
        ),
    ],
)
def test_bad_registrations_are_usage_errors(
    pytester: pytest.Pytester, hook: str, returned: str, message: str
) -> None:
    pytester.makeconftest(
        f"""
        class Named:
            description = "x"
            def __init__(self, name):
                self.name = name
            def start(self, item):
                raise NotImplementedError
            def watch(self, item):
                return None

        def pytest_concur_add_{hook}(config):
            return {returned}
        """
    )
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_runner_close_is_called_even_when_the_body_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(EXTRA_BACKEND)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("traced")
        def test_fails():
            raise ValueError

        def test_closed(trace_log):
            assert trace_log[-1] == ("close",)
        """
    )
    pytester.runpytest().assert_outcomes(failed=1, passed=1)


def test_builtin_backends_satisfy_the_protocol(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest_concur

        def test_protocol(request):
            from pytest_concur._registry import REGISTRY
            registry = request.config.stash[REGISTRY]
            assert list(registry) == ["thread", "process", "asyncio"]
            for backend in registry.values():
                assert isinstance(backend, pytest_concur.Backend)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_public_api_is_what_all_says() -> None:
    assert sorted(pytest_concur.__all__) == [
        "Backend",
        "BodyCall",
        "Check",
        "Concur",
        "DeadlockError",
        "FixtureRunner",
        "HangError",
        "PotentialDeadlockWarning",
        "Runner",
        "Watch",
        "Worker",
        "WorkerProcessTraceback",
        "WorkerTimeoutError",
        "__version__",
        "pack_jobs",
        "raise_outcomes",
        "run_job",
    ]
    for name in pytest_concur.__all__:
        assert hasattr(pytest_concur, name)
    public = {
        name
        for name, value in vars(pytest_concur).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(pytest_concur.__all__) - {"__version__"}


ENV_CHECK = """
import os

class EnvWatch:
    def begin(self):
        self.before = dict(os.environ)

    def end(self, failed):
        added = sorted(set(os.environ) - set(self.before))
        for name in added:
            del os.environ[name]
        if added:
            return "the body left environment variables behind: " + ", ".join(added)
        return None

class EnvCheck:
    name = "environ"
    description = "the body leaves os.environ as it found it"

    def watch(self, item):
        if item.get_closest_marker("env_ok"):
            return None
        return EnvWatch()

def pytest_configure(config):
    config.addinivalue_line("markers", "env_ok: skip the environ check")

def pytest_concur_add_checks(config):
    return [EnvCheck()]
"""


def test_conftest_check_watches_bodies_where_they_run(
    pytester: pytest.Pytester, backend_name: str
) -> None:
    pytester.makeconftest(ENV_CHECK)
    pytester.makepyfile(
        f"""
        import os
        import pytest

        pytestmark = pytest.mark.backend("{backend_name}")

        def test_clean():
            pass

        def test_leaves_a_variable():
            os.environ["CONCUR_LEFTOVER"] = "1"

        async def test_async_leaves_a_variable():
            os.environ["CONCUR_ASYNC_LEFTOVER"] = "1"

        def test_fails_and_leaves():
            os.environ["CONCUR_BOTH"] = "1"
            assert 1 == 2

        @pytest.mark.env_ok
        def test_opted_out():
            os.environ["CONCUR_ALLOWED"] = "1"

        def test_cleaned_up():
            assert "CONCUR_LEFTOVER" not in os.environ
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "the body left environment variables behind: CONCUR_LEFTOVER",
            "the body left environment variables behind: CONCUR_ASYNC_LEFTOVER",
            "E       assert 1 == 2",
        ]
    )
    if sys.version_info >= (3, 11):
        result.stdout.fnmatch_lines(
            [
                "*pytest-concur also found:*",
                "*the body left environment variables behind: CONCUR_BOTH",
            ]
        )
