"""The hooks around each test: run an item under its backend, and keep its books.

Every item of a session passes through these, so they stay cheap for an item that runs
plainly; a session in which no item runs under a backend unregisters them after collection
(see ``plugin.pytest_collection_finish``). Registered by ``plugin.py`` right after it, as
``concur-items``, so that they keep its place among the other plugins.

What runs a body (threads, multiprocessing, asyncio, stress mode, exploration) is imported
by the first item that needs it.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest

from pytest_concur import _marker, _registry
from pytest_concur._state import BACKEND_NAME, CURRENT_ITEM, RUNNER, item_began
from pytest_concur._state import parametrized_backend as _backend_name

# Functions whose backend marker was rejected, by nodeid: the message their items fail with.
MARKER_ERRORS = pytest.StashKey[dict[str, str]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    config = item.config
    config.stash[CURRENT_ITEM] = item
    item_began()
    try:
        return (yield)
    finally:
        config.stash[CURRENT_ITEM] = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    name = _backend_name(item)
    if name is not None:
        item.stash[BACKEND_NAME] = name
    errors = item.config.stash.get(MARKER_ERRORS, None)
    if errors and isinstance(item, pytest.Function):
        # Every item of a function whose marker was rejected (it may have other parameters).
        message = errors.get(f"{item.parent.nodeid}::{item.originalname}" if item.parent else "")
        if message is not None:
            pytest.fail(message, pytrace=False)
    if name is None:
        return
    if _marker.explore(item) or item.config.getoption("concur_replay") is not None:
        from pytest_concur._explore import prepare

        prepare(item)  # before the fixtures make the item's loop
    backend = item.config.stash[_registry.REGISTRY][name]
    if getattr(backend, "runs_fixtures", False):
        from pytest_concur._async_fixtures import start_fixture_runner

        # Its runner runs the item's async fixtures, then its body.
        item.stash[RUNNER] = start_fixture_runner(backend, item)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    name = pyfuncitem.stash.get(BACKEND_NAME, None)
    if name is None:
        return None
    from pytest_concur._backends.base import BodyCall
    from pytest_concur._stress import copies

    config = pyfuncitem.config
    backend = config.stash[_registry.REGISTRY][name]

    def make_call() -> BodyCall:
        watches = [check.watch(pyfuncitem) for check in _registry.checks(config)]
        return BodyCall(
            item=pyfuncitem,
            function=pyfuncitem.obj,
            kwargs=_body_kwargs(pyfuncitem),
            run_coroutine=functools.partial(_run_on_item_loop, pyfuncitem),
            watches=[watch for watch in watches if watch is not None],
            workers=copies(pyfuncitem),
        )

    call = make_call()
    runner = pyfuncitem.stash.get(RUNNER, None)
    if runner is None:
        runner = pyfuncitem.stash[RUNNER] = backend.start(pyfuncitem)
    if "pytest_concur._explore" in sys.modules:
        from pytest_concur._explore import exploring, run

        if exploring(pyfuncitem):
            run(pyfuncitem, runner, call, make_call)  # each run with fresh watches
            return True
    runner.run(call)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    if call.excinfo is not None and "pytest_concur._locks" in sys.modules:
        from pytest_concur._report import end_at_the_wait

        end_at_the_wait(call.excinfo)  # a deadlock or a hang, under a backend or not
    report = yield
    if call.when == "call" and BACKEND_NAME in item.stash:
        from pytest_concur._report import apply_longrepr

        apply_longrepr(item, call, report)
        from pytest_concur._stress import add_section

        add_section(item, report)
        if "pytest_concur._explore" in sys.modules:
            from pytest_concur._explore import add_section as add_schedule_section

            add_schedule_section(item, report)
    return report


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    __tracebackhide__ = True  # the plugin's frames are not the user's
    try:
        yield
    finally:
        if BACKEND_NAME in item.stash:
            _close(item)


def _run_on_item_loop(item: pytest.Item, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the item's own loop, made on first use: a sync body never needs one."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._item_loops import item_loop

    return item_loop(item).run(coro)


def _close(item: pytest.Item) -> None:
    runner = item.stash.get(RUNNER, None)
    try:
        if runner is not None:
            del item.stash[RUNNER]
            runner.close()
    finally:
        # No module, no loop: a session of sync bodies need not import asyncio to say so.
        loops = sys.modules.get("pytest_concur._item_loops")
        if loops is not None:
            loops.close_item_loop(item)


def _body_kwargs(item: pytest.Function) -> dict[str, Any]:
    """The fixture values and parameters the test function itself takes."""
    funcargs = item.funcargs
    function = item.obj
    if inspect.ismethod(function):  # a method's items are bound to instances of their own
        names = _parameter_names(function.__func__)[1:]
    else:
        names = _parameter_names(function)
    return {name: funcargs[name] for name in names if name in funcargs}


@functools.lru_cache(maxsize=4096)
def _parameter_names(function: Callable[..., Any]) -> tuple[str, ...]:
    """The names ``function`` takes by keyword: read once per test function, not per item."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins and the like
        return ()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
