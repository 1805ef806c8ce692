"""The ``thread`` backend: the body runs in a fresh thread that is not the main thread."""

from __future__ import annotations

import threading
from typing import final

import pytest

from pytest_concur._backends.base import BodyCall


@final
class ThreadBackend:
    """Run each test body in a new, non-main thread; the main thread waits for it."""

    name = "thread"
    description = "the test body runs in a fresh thread that is not the main thread"

    def start(self, item: pytest.Item) -> _ThreadRunner:
        return _ThreadRunner()


@final
class _ThreadRunner:
    def run(self, call: BodyCall) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        error: list[BaseException] = []

        def body() -> None:
            try:
                call()
            except BaseException as exc:  # every outcome, skip and exit included, goes back
                error.append(exc)

        # A daemon thread: if the main thread gives up waiting (a timeout, ^C), a body that
        # never returns must not keep the interpreter alive at exit.
        worker = threading.Thread(target=body, name=f"concur-{call.item.name}", daemon=True)
        worker.start()
        # join() with no timeout is interruptible by signals (pytest-timeout, ^C) on POSIX.
        worker.join()
        if error:
            exc = error[0]
            error.clear()
            # The exception keeps its own traceback from the worker thread; raising it here
            # only prepends this frame, which pytest cuts off at the test function.
            raise exc

    def close(self) -> None:
        pass
