"""The process-wide hooks the checks listen to (pytest_concur/_patches.py)."""

from __future__ import annotations

import _thread
import importlib
import inspect
import multiprocessing
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_concur import _patches


@pytest.fixture
def clean_hooks() -> Iterator[None]:
    """Whatever a test installs is put back after it (nothing listens by then)."""
    assert _patches.listening() == []
    try:
        yield
    finally:
        assert _patches.listening() == []
        _patches.uninstall()


@pytest.mark.usefixtures("clean_hooks")
def test_around_listener_sees_the_start_and_its_end() -> None:
    seen: list[str] = []

    def listener(thread: threading.Thread) -> Any:
        seen.append(f"before {thread.name} alive={thread.is_alive()}")
        return lambda: seen.append(f"after {thread.name} started={thread.ident is not None}")

    stop = _patches.listen(_patches.THREAD_START, listener)
    try:
        thread = threading.Thread(target=lambda: None, name="t1")
        thread.start()
        thread.join()
    finally:
        stop()
    assert seen == ["before t1 alive=False", "after t1 started=True"]
    # Stopped: the next start is not seen, and stopping twice does no harm.
    threading.Thread(target=lambda: None).start()
    stop()
    assert len(seen) == 2


@pytest.mark.usefixtures("clean_hooks")
def test_after_listener_gets_the_object_once_it_is_made() -> None:
    commands: list[object] = []
    stop = _patches.listen(_patches.POPEN_INIT, lambda popen, result: commands.append(popen.args))
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        with pytest.raises(FileNotFoundError):
            subprocess.Popen(["/nonexistent/concur-command"])  # never made: never told
    finally:
        stop()
    assert commands == [[sys.executable, "-c", "pass"]]


@pytest.mark.usefixtures("clean_hooks")
def test_before_listener_gets_the_calls_arguments() -> None:
    import concurrent.futures

    calls: list[tuple[object, ...]] = []

    def callback(future: object) -> None:
        calls.append(("called",))

    stop = _patches.listen(
        _patches.FUTURE_ADD_DONE_CALLBACK,
        lambda future, args, kwargs: calls.append((args, kwargs, future.done())),
    )
    try:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        future.add_done_callback(callback)
        future.set_result(None)
    finally:
        stop()
    assert calls == [((callback,), {}, False), ("called",)]


@pytest.mark.usefixtures("clean_hooks")
def test_exitcode_listener_is_told_only_of_a_known_code() -> None:
    codes: list[int] = []
    stop = _patches.listen(_patches.PROCESS_EXITCODE, lambda process, code: codes.append(code))
    try:
        process = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,))
        assert process.exitcode is None  # not started: nothing to tell
        process.start()
        process.join()
        assert process.exitcode == 3
    finally:
        stop()
    assert codes == [3]


@pytest.mark.usefixtures("clean_hooks")
def test_wrappers_keep_the_signature_and_go_away_at_uninstall() -> None:
    original = subprocess.Popen.__dict__["__init__"]
    stop = _patches.listen(_patches.POPEN_INIT, lambda popen, result: None)
    assert subprocess.Popen.__dict__["__init__"] is not original
    assert inspect.signature(subprocess.Popen) == inspect.signature(original).replace(
        parameters=list(inspect.signature(original).parameters.values())[1:]
    )
    _patches.uninstall()  # something listens: it stays
    assert subprocess.Popen.__dict__["__init__"] is not original
    stop()
    _patches.uninstall()
    assert subprocess.Popen.__dict__["__init__"] is original


@pytest.mark.usefixtures("clean_hooks")
def test_a_wrapper_put_over_ours_is_left_in_place() -> None:
    original = threading.Thread.__dict__["start"]
    stop = _patches.listen(_patches.THREAD_START, lambda thread: None)
    ours = threading.Thread.__dict__["start"]
    calls: list[str] = []

    def theirs(thread: threading.Thread) -> None:
        calls.append("theirs")
        ours(thread)

    threading.Thread.start = theirs  # type: ignore[method-assign]
    try:
        stop()
        _patches.uninstall()
        assert threading.Thread.__dict__["start"] is theirs  # not ours to undo
        seen: list[threading.Thread] = []
        stop = _patches.listen(_patches.THREAD_START, seen.append)  # ours below is reused
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        stop()
        assert calls == ["theirs"]
        assert seen == [thread]
    finally:
        threading.Thread.start = ours  # type: ignore[method-assign]
        _patches.uninstall()
    assert threading.Thread.__dict__["start"] is original


@pytest.mark.usefixtures("clean_hooks")
def test_replace_installs_once() -> None:
    made: list[object] = []

    class Owner:
        def method(self) -> str:
            return "real"

    def make(original: Any) -> Any:
        made.append(original)
        return lambda self: "ours:" + original(self)

    _patches.replace(Owner, "method", make)
    _patches.replace(Owner, "method", make)
    assert Owner().method() == "ours:real"
    assert len(made) == 1
    _patches.uninstall()
    assert Owner().method() == "real"


# The head of the test modules below: a fixture whose thread outlives its setup.
_HELPER = """
import asyncio, subprocess, sys, threading
import pytest

@pytest.fixture
def helper():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    yield
    thread.join()
"""


def test_a_session_puts_every_hook_back(pytester: pytest.Pytester) -> None:
    import asyncio.base_events
    import asyncio.events

    places = [
        (threading.Thread, "start"),
        (threading.Thread, "join"),
        (subprocess.Popen, "__init__"),
        (asyncio.base_events.BaseEventLoop, "__init__"),
        (asyncio.base_events.BaseEventLoop, "create_task"),
        (asyncio.events.Handle, "_run"),
    ]
    before = [owner.__dict__[name] for owner, name in places]
    pytester.makepyfile(
        _HELPER
        + textwrap.dedent(
            """
        @pytest.mark.backend("thread", "process", "asyncio")
        def test_starts_things(helper):
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        @pytest.mark.backend("asyncio")
        async def test_a_task():
            await asyncio.create_task(asyncio.sleep(0))
        """
        )
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=4)
    assert [owner.__dict__[name] for owner, name in places] == before


@pytest.mark.usefixtures("clean_hooks")
def test_swaps_undo_in_either_order_and_leave_a_later_replacement_alone() -> None:
    class Owner:
        attribute = "original"

    first = _patches.swap_many([(Owner, "attribute", "first")])
    second = _patches.swap_many([(Owner, "attribute", "second")])
    assert first() is False  # under the second: it inherits what the first replaced
    assert Owner.attribute == "second"
    assert second() is True
    assert Owner.attribute == "original"

    undo = _patches.swap_many([(Owner, "attribute", "ours")])
    Owner.attribute = "theirs"
    assert undo() is False  # not ours to undo
    assert Owner.attribute == "theirs"
    assert _patches.swap_many([(Owner, "attribute", "theirs")])() is True  # in place: no swap
    assert (Owner, "attribute", "original") not in _patches.replacements()


@pytest.mark.parametrize("backend", ["thread", "process", "asyncio"])
def test_an_inline_session_puts_every_patched_attribute_back(
    pytester: pytest.Pytester, backend: str
) -> None:
    import asyncio.base_events
    import asyncio.events
    import multiprocessing.connection
    import queue
    import signal

    _patches.uninstall()  # this session's own hooks, if any: nothing listens now
    ours_before = _patches.replacements()
    places: list[tuple[Any, str]] = [
        (threading, "Lock"),
        (threading, "RLock"),
        (threading, "_allocate_lock"),
        (threading, "excepthook"),
        (threading.Thread, "join"),
        (queue, "SimpleQueue"),
        (signal, "signal"),
        (asyncio.events.Handle, "_run"),
        (_thread, "allocate_lock"),
        (_thread, "RLock"),
        *(
            (asyncio.base_events.BaseEventLoop, name)
            for name in ("call_soon", "call_soon_threadsafe", "call_later", "call_at")
        ),
        (asyncio.base_events.BaseEventLoop, "call_exception_handler"),
        *((multiprocessing.connection._ConnectionBase, name) for name in ("recv", "recv_bytes")),
    ]
    for site in _patches._SITES:
        module, _, name = site.path.partition(":")
        places.append((getattr(importlib.import_module(module), name), site.attribute))
    before = [owner.__dict__.get(name) for owner, name in places]

    class AtSessionEnd:
        """What the inner session has replaced when it finishes (before it unconfigures)."""

        def __init__(self) -> None:
            self.replaced: list[tuple[Any, str, Any]] = []

        def pytest_sessionfinish(self) -> None:
            self.replaced = _patches.replacements()

    at_end = AtSessionEnd()
    pytester.makepyfile(
        _HELPER
        + textwrap.dedent(
            f"""
        import concurrent.futures, multiprocessing, queue

        @pytest.mark.backend({backend!r})
        def test_starts_things(helper):
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                assert pool.submit(lambda: 1).result() == 1
            left, right = multiprocessing.Pipe()
            right.send(1)
            assert left.recv() == 1
            simple = queue.SimpleQueue()
            simple.put(1)
            assert simple.get() == 1

        @pytest.mark.backend({backend!r})
        async def test_a_task():
            await asyncio.create_task(asyncio.sleep(0))
            asyncio.get_running_loop().call_soon(lambda: None)
        """
        )
    )
    pytester.runpytest_inprocess(plugins=[at_end]).assert_outcomes(passed=2)
    after = [owner.__dict__.get(name) for owner, name in places]
    assert [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for (owner, name), was, now in zip(places, before, after, strict=True)
        if now is not was
    ] == []
    # Every attribute the session still had replaced at its end is one of those looked at.
    new = [
        (owner, name) for owner, name, _ in at_end.replaced if (owner, name, _) not in ours_before
    ]
    assert new, "the inner session replaced nothing: the test measures nothing"
    assert [place for place in new if place not in places] == []
    assert _patches.replacements() == ours_before
