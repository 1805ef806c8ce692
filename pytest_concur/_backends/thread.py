"""The ``thread`` backend: the body runs in a fresh thread that is not the main thread."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import traceback
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

        # Not a daemon, as the main thread is not: the threads the body starts inherit that,
        # and must be what they are in a plain run (non-daemon unless told otherwise). If the
        # main thread gives up waiting (a timeout, ^C), the body's thread is guarded so that
        # it cannot keep the interpreter alive at exit (see _shutdown). It runs in a copy of
        # this thread's context, so context variables set by fixtures (decimal's context
        # among them) are seen by the body as in a plain run.
        context = contextvars.copy_context()
        worker = threading.Thread(
            target=context.run, args=(body,), name=f"concur-{call.item.name}", daemon=False
        )
        worker.start()
        try:
            # Interruptible by signals (pytest-timeout, ^C) on POSIX.
            worker.join()
        except BaseException as interruption:
            # We give up on the body (a timeout, ^C): it may never return to end its
            # checks' watches, which patched process-wide things; end them from here.
            for watch in reversed(call.watches):
                with contextlib.suppress(Exception):
                    watch.end(True)
            raise _interrupted(interruption, worker) from None
        if error:
            exc = error[0]
            error.clear()
            # The exception keeps its own traceback from the worker thread; raising it here
            # only prepends this frame, which pytest cuts off at the test function.
            raise exc

    def close(self) -> None:
        pass


def _interrupted(exc: BaseException, worker: threading.Thread) -> BaseException:
    """The exception that stopped our wait (a timeout, ^C), told where the body was.

    Its traceback would only show this thread waiting in ``Thread.join``: drop it, and say
    where the body's thread stands instead (pytest-concur's own deadline has said it all).
    """
    # In stress mode the copies run in threads named after the body's (see _stress).
    threads = [worker] + [
        t for t in threading.enumerate() if t.name.startswith(f"{worker.name}-copy")
    ]
    from pytest_concur import _shutdown

    _shutdown.guard(threads)  # given up on: they must not hold the interpreter at exit
    if getattr(exc, "concur_hang_report", False):
        return exc
    frames = sys._current_frames()
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        if frame is None:
            continue
        stack = "".join(traceback.format_stack(frame))
        note = f"The test body's thread {thread.name!r} was at:\n{stack.rstrip()}"
        if sys.version_info >= (3, 11):
            exc.add_note(note)
        else:  # pragma: no cover - exercised by the py310 tox env
            print(note, file=sys.stderr)  # shown with the failure, as captured stderr
    return exc.with_traceback(None)
