"""Async fixtures of tests that run under a backend.

pytest itself refuses ``async def`` fixtures. For an item that runs under a pytest-concur
backend we run them: function-scoped ones on the item's own event loop (the loop its async
body will run on, under every backend but ``process``, whose child has a loop of its own),
wider-scoped ones each on a loop of their own that lives until the fixture is torn down.
A backend with ``runs_fixtures`` (see ``pytest_concur.FixtureRunner``) runs them itself:
function-scoped ones on the runner that then runs the body, wider-scoped ones each on a
runner of their own, closed with the fixture.

We do it the way pytest's public hooks allow: around ``pytest_fixture_setup`` the fixture's
function is swapped for a synchronous one that drives the coroutine or async generator, and
restored right after. Async fixtures of other items are left to whichever plugin claims
them (pytest-asyncio, anyio), exactly as without pytest-concur.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, final

import pytest

from pytest_concur import _claim, _registry
from pytest_concur._state import CURRENT_ITEM, RUNNER, backend_of

if TYPE_CHECKING:
    from pytest_concur._backends.base import Backend, FixtureRunner
    from pytest_concur._item_loops import LoopRunner


class _Fixtures(Protocol):
    """What runs async fixtures: a backend's ``FixtureRunner``, or :class:`_LoopFixtures`."""

    def run_fixture(self, function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any: ...

    def run_asyncgen_fixture(
        self, function: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> Iterator[Any]: ...

    def close(self) -> None: ...


def is_async_fixture(func: object) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    func = fixturedef.func
    item = request.config.stash.get(CURRENT_ITEM, None)
    name = None if item is None else backend_of(item)
    if not is_async_fixture(func) or item is None or name is None:
        return (yield)
    if _claimed_by_pytest_asyncio(func, request.config) and not _claim.runs_fixture(
        item, fixturedef
    ):
        return (yield)
    target = _bind(func, request)
    backend = request.config.stash[_registry.REGISTRY][name]
    own = fixturedef.scope != "function"
    runner: _Fixtures
    if getattr(backend, "runs_fixtures", False):
        runner = start_fixture_runner(backend, item) if own else item.stash[RUNNER]
    else:
        from pytest_concur._item_loops import LoopRunner, item_loop  # asyncio: once needed

        runner = _LoopFixtures(LoopRunner() if own else item_loop(item))
    driver = _as_sync(target, runner, own=own)
    # functools.wraps copied pytest-asyncio's mark (in the function's __dict__) onto the
    # driver: drop it, or pytest-asyncio would run our synchronous driver on a loop of its own.
    vars(driver).pop("_force_asyncio_fixture", None)
    fixturedef.func = driver  # type: ignore[misc]
    try:
        return (yield)
    finally:
        fixturedef.func = func  # type: ignore[misc]


def start_fixture_runner(backend: Backend, item: pytest.Item) -> FixtureRunner:
    """A runner of a backend with ``runs_fixtures``, checked to run fixtures indeed."""
    runner = backend.start(item)
    missing = [
        method
        for method in ("run_fixture", "run_asyncgen_fixture")
        if not callable(getattr(runner, method, None))
    ]
    if missing:
        close = getattr(runner, "close", None)
        if callable(close):
            close()
        pytest.fail(
            f"pytest-concur: backend {backend.name!r} sets runs_fixtures, but its runner "
            f"{type(runner).__qualname__} has no {' and no '.join(f'{m}()' for m in missing)}: "
            "implement pytest_concur.FixtureRunner, or drop runs_fixtures to let "
            "pytest-concur run async fixtures on asyncio loops of its own.",
            pytrace=False,
        )
    return runner  # type: ignore[return-value]


def _as_sync(func: Callable[..., Any], runner: _Fixtures, *, own: bool) -> Callable[..., Any]:
    """The fixture as a sync one that pytest runs; ``runner`` runs its async part.

    A runner the fixture has to itself (``own``: a wider scope) is closed at its teardown:
    the loop must live as long as the value does (tasks it started keep running), so even a
    coroutine fixture is then a generator fixture, to pytest.
    """
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        def asyncgen_fixture(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from _one_value(func, runner.run_asyncgen_fixture(func, kwargs))
            finally:
                if own:
                    runner.close()

        # pytest must see a generator function to run the teardown half.
        del asyncgen_fixture.__wrapped__
        return asyncgen_fixture

    if own:

        @functools.wraps(func)
        def scoped_coroutine_fixture(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield runner.run_fixture(func, kwargs)
            finally:
                runner.close()

        del scoped_coroutine_fixture.__wrapped__
        return scoped_coroutine_fixture

    @functools.wraps(func)
    def coroutine_fixture(*args: Any, **kwargs: Any) -> Any:
        return runner.run_fixture(func, kwargs)

    del coroutine_fixture.__wrapped__
    return coroutine_fixture


@final
class _LoopFixtures:
    """pytest-concur's own fixture runner: async fixtures on one of its asyncio loops."""

    def __init__(self, loop: LoopRunner) -> None:
        self._loop = loop

    def run_fixture(self, function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        return self._loop.run(function(**kwargs))

    def run_asyncgen_fixture(
        self, function: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> Iterator[Any]:
        agen = function(**kwargs)
        yield self._loop.run(agen.__anext__())
        try:
            self._loop.run(agen.__anext__())
        except StopAsyncIteration:
            return
        self._loop.run(agen.aclose())
        pytest.fail(
            f"async fixture {function.__name__!r} yielded more than once; "
            "a fixture yields exactly one value.",
            pytrace=False,
        )

    def close(self) -> None:
        self._loop.close()


def _one_value(func: Callable[..., Any], steps: Iterator[Any]) -> Iterator[Any]:
    """Yield the one value of a runner's ``run_asyncgen_fixture``, then run its teardown."""
    try:
        value = next(steps)
    except StopIteration:
        pytest.fail(
            f"async fixture {func.__name__!r}: the backend's run_asyncgen_fixture() "
            "ended without yielding its value.",
            pytrace=False,
        )
    yield value
    for _ in steps:
        pytest.fail(
            f"async fixture {func.__name__!r}: the backend's run_asyncgen_fixture() "
            "yielded more than once; it yields the fixture's one value.",
            pytrace=False,
        )


def _claimed_by_pytest_asyncio(func: object, config: pytest.Config) -> bool:
    """Whether pytest-asyncio runs this async fixture (it does in auto mode, or when marked)."""
    if not config.pluginmanager.hasplugin("asyncio"):
        return False
    # pytest_asyncio.fixture marks the function so; its own check reads the same attribute.
    if getattr(func, "_force_asyncio_fixture", False):
        return True
    return bool(config.getini("asyncio_mode") == "auto")


def _bind(func: Callable[..., Any], request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Bind a fixture defined in a test class to the test's instance, as pytest does."""
    instance = request.instance
    bound_to = getattr(func, "__self__", None)
    if instance is not None and bound_to is not None and isinstance(instance, type(bound_to)):
        return func.__func__.__get__(instance)  # type: ignore[attr-defined, no-any-return]
    return func
