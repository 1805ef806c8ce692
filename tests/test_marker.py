"""The backend marker, the option and the ini key: which items get collected."""

from __future__ import annotations

import pytest
from _helpers import anyio_on_asyncio


def test_marker_makes_one_item_per_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "process", "asyncio")
        def test_x(concur_backend):
            assert concur_backend in ("thread", "process", "asyncio")
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_x[[]thread[]] PASSED*",
            "*::test_x[[]process[]] PASSED*",
            "*::test_x[[]asyncio[]] PASSED*",
        ]
    )


def test_marker_on_class_module_and_closest_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.backend("asyncio")

        def test_module_level(concur_backend):
            assert concur_backend == "asyncio"

        @pytest.mark.backend("thread")
        class TestClass:
            def test_method(self, concur_backend):
                assert concur_backend == "thread"

            @pytest.mark.backend("process")
            def test_override(self, concur_backend):
                assert concur_backend == "process"
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_module_level[[]asyncio[]] PASSED*",
            "*::TestClass::test_method[[]thread[]] PASSED*",
            "*::TestClass::test_override[[]process[]] PASSED*",
        ]
    )


def test_combines_with_parametrize_and_fixtures_of_every_scope(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        calls = []

        @pytest.fixture(scope="session")
        def session_value():
            calls.append("session")
            return "s"

        @pytest.fixture(scope="module")
        def module_value():
            calls.append("module")
            return "m"

        @pytest.fixture(scope="class")
        def class_value():
            return "c"

        @pytest.fixture
        def function_value(tmp_path):
            return tmp_path

        @pytest.mark.backend("thread", "process", "asyncio")
        @pytest.mark.parametrize("n", [1, 2])
        def test_x(n, session_value, module_value, class_value, function_value, concur_backend):
            assert (session_value, module_value, class_value) == ("s", "m", "c")
            assert function_value.is_dir()

        def test_fixtures_set_up_once():
            # Higher-scoped fixtures are not set up again per backend or in the child.
            assert calls == ["session", "module"]
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*test_x[[]thread-1[]] PASSED*", "*test_x[[]asyncio-2[]] PASSED*"])


def test_items_keep_declaration_order_within_a_function(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("asyncio", "thread")
        def test_a(): pass

        def test_b(): pass
        """
    )
    result = pytester.runpytest("-v")
    result.stdout.fnmatch_lines(
        ["*test_a[[]asyncio[]] PASSED*", "*test_a[[]thread[]] PASSED*", "*test_b PASSED*"]
    )


def test_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread")
        def test_x():
            pass
        """
    )
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.backend(*names, workers=1, explore=0):*"])


def test_select_backend_by_keyword_and_by_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread", "process", "asyncio")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest("-v", "-k", "thread")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["*test_x[[]thread[]] PASSED*"])
    result = pytester.runpytest("-v", "--strict-markers", "-m", "concur_process or concur_asyncio")
    result.assert_outcomes(passed=2, deselected=1)


def test_concur_backend_fixture_is_none_outside_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_plain(concur_backend):
            assert concur_backend is None
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_concur_backend_is_a_fixture_only_of_the_tests_that_ask_for_it(
    pytester: pytest.Pytester,
) -> None:
    # Not autouse: a plain test pays for no fixture of ours. A test under a backend that
    # does not ask for it still carries the backend's name in its id and callspec.
    pytester.makepyfile(
        """
        import pytest

        def test_plain(request):
            assert "concur_backend" not in request.fixturenames

        @pytest.mark.backend("thread")
        def test_silent(request):
            assert "concur_backend" not in request.fixturenames
            assert request.node.callspec.params["concur_backend"] == "thread"

        @pytest.mark.backend("thread")
        def test_asks(concur_backend):
            assert concur_backend == "thread"
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_silent?thread? PASSED*", "*test_asks?thread? PASSED*"])


def test_option_parametrizes_tests_without_a_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_plain():
            pass

        async def test_async():
            pass

        @pytest.mark.backend("thread")
        def test_own_marker_wins(concur_backend):
            assert concur_backend == "thread"
        """
    )
    result = pytester.runpytest("-v", "--concur-backends=thread,asyncio")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*test_plain[[]thread[]] PASSED*",
            "*test_plain[[]asyncio[]] PASSED*",
            "*test_async[[]thread[]] PASSED*",
            "*test_async[[]asyncio[]] PASSED*",
            "*test_own_marker_wins[[]thread[]] PASSED*",
        ]
    )


def test_ini_parametrizes_and_option_overrides_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_backends = thread process\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_plain[[]thread[]]*", "*test_plain[[]process[]]*"])
    result = pytester.runpytest("-v", "--concur-backends", "asyncio")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_plain[[]asyncio[]]*"])


def test_option_leaves_anyio_tests_to_anyio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("anyio")
    anyio_on_asyncio(pytester)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        async def test_owned_by_anyio(concur_backend):
            assert concur_backend is None

        def test_sync():
            pass
        """
    )
    result = pytester.runpytest("-v", "--concur-backends=thread")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_owned_by_anyio[[]asyncio[]] PASSED*", "*test_sync[[]thread[]] PASSED*"]
    )


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_option_leaves_pytest_asyncio_tests_to_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    pytest.importorskip("pytest_asyncio")
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_marked(concur_backend):
            assert concur_backend is None

        async def test_unmarked(concur_backend):
            pass
        """
    )
    result = pytester.runpytest("-v", "--concur-backends=thread")
    result.assert_outcomes(passed=2)
    # In auto mode pytest-asyncio claims every async test; in strict mode only marked ones.
    unmarked = "test_unmarked PASSED" if mode == "auto" else "test_unmarked[[]thread[]] PASSED"
    result.stdout.fnmatch_lines(["*test_marked PASSED*", f"*{unmarked}*"])
    # Said, so that the option does not look as if it did nothing.
    left = 2 if mode == "auto" else 1
    result.stdout.fnmatch_lines([f"pytest-concur: {left} async test(s) left to pytest-asyncio*"])


def test_marker_of_a_plugin_that_is_not_loaded_claims_nothing(pytester: pytest.Pytester) -> None:
    # PYTEST_ADDOPTS has -p no:asyncio: a test marked for pytest-asyncio would run nowhere.
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.asyncio
        async def test_marked(concur_backend):
            await asyncio.sleep(0)
            assert concur_backend in ("thread", "asyncio")
        """
    )
    result = pytester.runpytest(
        "-v", "--concur-backends=thread,asyncio", "-W", "ignore::pytest.PytestUnknownMarkWarning"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_marked[[]thread[]] PASSED*"])


def test_marker_and_another_async_plugin_on_one_test_is_an_error(pytester: pytest.Pytester) -> None:
    pytest.importorskip("anyio")
    anyio_on_asyncio(pytester)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        @pytest.mark.backend("asyncio")
        async def test_both():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*test_both is marked for pytest-concur*and for anyio*only one plugin can run*"]
    )


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        pytest.param(
            '"treads"',
            "In test_x: unknown backend 'treads' in @pytest.mark.backend. Did you mean "
            "'thread'? Available backends: asyncio, process, thread.",
            id="unknown-name",
        ),
        pytest.param(
            "123",
            "In test_x: @pytest.mark.backend() takes backend names as strings, got 123 (int)*",
            id="not-a-string",
        ),
        pytest.param(
            '"thread", worker=4',
            "In test_x: @pytest.mark.backend() got unexpected keyword argument(s): worker. "
            "Did you mean 'workers'? It takes*",
            id="unknown-keyword",
        ),
        pytest.param(
            "",
            "In test_x: @pytest.mark.backend() needs at least one backend name*",
            id="empty",
        ),
        pytest.param(
            "workers=4",
            "In test_x: @pytest.mark.backend() needs at least one backend name*",
            id="workers-only",
        ),
        pytest.param(
            '"thread", workers=0',
            "In test_x: @pytest.mark.backend(workers=...) takes a whole number of copies*",
            id="bad-workers",
        ),
    ],
)
def test_bad_marker_is_an_error_of_its_test_only(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.backend({marker})
        def test_x():
            pass

        @pytest.mark.backend("thread")
        def test_neighbour():
            pass

        def test_plain():
            pass
        """,
        test_good="def test_fine(): pass",
    )
    result = pytester.runpytest()
    # The module's other tests run: no collection error stops the session.
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_x*", message])
    result.stdout.no_fnmatch_line("*ERROR collecting*")


def test_a_rejected_marker_errors_every_item_of_its_function(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        class TestGroup:
            @pytest.mark.backend(3)
            @pytest.mark.parametrize("n", [1, 2])
            def test_x(self, n):
                pass

            def test_y(self):
                pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of TestGroup.test_x[[]1[]]*",
            "In test_x: @pytest.mark.backend() takes backend names as strings, got 3 (int)*",
            "*ERROR at setup of TestGroup.test_x[[]2[]]*",
            "In test_x: @pytest.mark.backend() takes backend names as strings, got 3 (int)*",
        ]
    )


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        pytest.param(
            ["--concur-backends=thread,proces"],
            "",
            "ERROR: pytest-concur: unknown backend 'proces' in --concur-backends. "
            "Did you mean 'process'? Available backends: asyncio, process, thread.",
            id="option",
        ),
        pytest.param(
            [],
            "concur_backends = greenlet",
            "ERROR: pytest-concur: unknown backend 'greenlet' in concur_backends (ini).*",
            id="ini",
        ),
        pytest.param(
            ["--concur-backends="],
            "",
            "ERROR: --concur-backends was given an empty list; name one or more backends*",
            id="empty-option",
        ),
        pytest.param(
            ["--concur-claim=asyncio,trio"],
            "",
            "ERROR: pytest-concur: unknown name 'trio' in --concur-claim: it takes anyio, "
            "asyncio (the async plugins whose tests pytest-concur can run)*",
            id="unknown-claim",
        ),
        pytest.param(
            [],
            "concur_claim = pytest-asyncio",
            "ERROR: pytest-concur: unknown name 'pytest-asyncio' in concur_claim (ini): *",
            id="unknown-claim-ini",
        ),
        pytest.param(
            ["--concur-timeout=abc"],
            "",
            "ERROR: pytest-concur: --concur-timeout=abc: expected a number of seconds, 0 or "
            "more (0 for no deadline), e.g. --concur-timeout=60",
            id="timeout-option",
        ),
        pytest.param(
            [],
            "concur_timeout = abc",
            "ERROR: pytest-concur: concur_timeout = abc: expected a number of seconds, 0 or "
            "more (0 for no deadline), e.g. concur_timeout = 60",
            id="timeout-ini",
        ),
        pytest.param(
            [],
            "concur_workers = many",
            "ERROR: pytest-concur: concur_workers (ini) takes a whole number of copies, 1 or "
            "more, got 'many': e.g. concur_workers = 8.",
            id="workers-ini",
        ),
        pytest.param(
            [],
            "concur_start_method = vfork",
            "ERROR: unknown start method 'vfork' for the process backend (in the "
            "concur_start_method ini key); choose one of: auto, fork, forkserver, spawn.",
            id="start-method-ini",
        ),
    ],
)
def test_bad_option_or_ini_is_a_usage_error(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_start_method_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconcur_start_method = vfork\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("process")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: unknown start method 'vfork' for the process backend*auto, fork, forkserver, spawn."
        ]
    )


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmarkers = backend: registered by hand\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.backend("thread")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest("-v", "-p", "no:concur")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*::test_x PASSED*"])


def test_turned_off_with_its_ini_keys_under_strict_config_as_the_readme_says(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nconcur_backends = thread\nconcur_timeout = 30\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-p", "no:concur", "--strict-config")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: Unknown config option: concur_backends"])
    # The README's conftest.py: the keys declared while the plugin is off.
    pytester.makeconftest(
        """
        def pytest_addoption(parser, pluginmanager):
            if pluginmanager.is_blocked("concur"):
                for key in ("concur_backends", "concur_timeout"):
                    parser.addini(key, "pytest-concur's, unused while it is off")
        """
    )
    pytester.runpytest("-p", "no:concur", "--strict-config").assert_outcomes(passed=1)
    # And with the plugin on, the same conftest is a no-op.
    result = pytester.runpytest("--strict-config", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*::test_x[[]thread[]] PASSED*"])


def test_help_texts_of_options_and_ini_keys_read_as_sentences(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    texts: dict[str, str] = {}
    name = None
    for line in result.stdout.lines:
        head = line.strip().split(" ", 1)
        if (
            line.startswith("  ")
            and not line.startswith("   ")
            and head[0].startswith(("--concur", "concur_"))
        ):
            name = head[0].split("=")[0]
            texts[name] = head[1].strip() if len(head) > 1 and not head[1].startswith("(") else ""
        elif name is not None and line.startswith(" " * 20):
            texts[name] += " " + line.strip()
        else:
            name = None
    assert "--concur-timeout" in texts
    assert "concur_allow_started_by" in texts
    for name, text in texts.items():
        text = text.strip()
        assert text[:1].isupper(), (name, text)
        assert text.endswith("."), (name, text)
        assert "  " not in text, (name, text)
    started_by = texts["concur_allow_started_by"].strip()
    assert started_by.startswith("Functions (name or module.name) whose threads, tasks and ")
