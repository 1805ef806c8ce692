"""Async fixtures of tests that run under a backend.

pytest itself refuses ``async def`` fixtures. For an item that runs under a pytest-concur
backend we run them: function-scoped ones on the item's own event loop (the loop its async
body will run on, under every backend but ``process``, whose child has a loop of its own),
wider-scoped ones each on a loop of their own that lives until the fixture is torn down.

We do it the way pytest's public hooks allow: around ``pytest_fixture_setup`` the fixture's
function is swapped for a synchronous one that drives the coroutine or async generator, and
restored right after. Async fixtures of other items are left to whichever plugin claims
them (pytest-asyncio, anyio), exactly as without pytest-concur.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_concur import _claim
from pytest_concur._state import CURRENT_ITEM, backend_of

if TYPE_CHECKING:
    from pytest_concur._item_loops import LoopRunner


def is_async_fixture(func: object) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    func = fixturedef.func
    item = request.config.stash.get(CURRENT_ITEM, None)
    if not is_async_fixture(func) or item is None or backend_of(item) is None:
        return (yield)
    if _claimed_by_pytest_asyncio(func, request.config) and not _claim.runs_fixture(
        item, fixturedef
    ):
        return (yield)
    from pytest_concur._item_loops import LoopRunner, item_loop  # asyncio: only once needed

    target = _bind(func, request)
    if fixturedef.scope == "function":
        runner = item_loop(item)
        driver = _drive(target, runner, own_loop=False)
    else:
        driver = _drive(target, LoopRunner(), own_loop=True)
    # functools.wraps copied pytest-asyncio's mark (in the function's __dict__) onto the
    # driver: drop it, or pytest-asyncio would run our synchronous driver on a loop of its own.
    vars(driver).pop("_force_asyncio_fixture", None)
    fixturedef.func = driver  # type: ignore[misc]
    try:
        return (yield)
    finally:
        fixturedef.func = func  # type: ignore[misc]


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


def _drive(func: Callable[..., Any], runner: LoopRunner, *, own_loop: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        def asyncgen_fixture(*args: Any, **kwargs: Any) -> Iterator[Any]:
            agen = func(*args, **kwargs)
            try:
                yield runner.run(agen.__anext__())
                try:
                    runner.run(agen.__anext__())
                except StopAsyncIteration:
                    pass
                else:
                    runner.run(agen.aclose())
                    pytest.fail(
                        f"async fixture {func.__name__!r} yielded more than once; "
                        "a fixture yields exactly one value.",
                        pytrace=False,
                    )
            finally:
                if own_loop:
                    runner.close()

        # pytest must see a generator function to run the teardown half.
        del asyncgen_fixture.__wrapped__
        return asyncgen_fixture

    if own_loop:
        # Its loop must live as long as its value does (tasks it started keep running), so
        # it ends with the fixture's teardown: a generator fixture, to pytest.
        @functools.wraps(func)
        def scoped_coroutine_fixture(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield runner.run(func(*args, **kwargs))
            finally:
                runner.close()

        del scoped_coroutine_fixture.__wrapped__
        return scoped_coroutine_fixture

    @functools.wraps(func)
    def coroutine_fixture(*args: Any, **kwargs: Any) -> Any:
        return runner.run(func(*args, **kwargs))

    del coroutine_fixture.__wrapped__
    return coroutine_fixture
