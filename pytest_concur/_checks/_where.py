"""Where a thread, task, process or coroutine was started, and how long to wait for it.

The start call a person wants to see is the first frame of their own code: the stack is
walked past the frames of the modules that do the starting on their behalf (threading,
asyncio, concurrent.futures, multiprocessing, subprocess) and past pytest-concur's own. Only
a few strings per frame are kept, never the frames, so a record keeps no locals alive and
pickles (the ``process`` backend sends reports from a child).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import final

from pytest_concur._stacks import PACKAGE, is_ours, short_path

# How many frames of user code are kept for matching ``started_by`` allow patterns.
_KEPT = 12


# Found from threading's place in the standard library, without importing the others:
# this module is imported at session start, and asyncio or multiprocessing may never be.
_STDLIB = os.path.dirname(threading.__file__)
_LIBRARY = (
    os.path.join(_STDLIB, "threading.py"),
    os.path.join(_STDLIB, "subprocess.py"),
    os.path.join(_STDLIB, "asyncio", ""),
    os.path.join(_STDLIB, "concurrent", ""),
    os.path.join(_STDLIB, "multiprocessing", ""),
    PACKAGE,
)


@functools.lru_cache(maxsize=1024)  # lru_cache is thread-safe: no lock of ours needed
def _is_library(filename: str) -> bool:
    return filename.startswith(_LIBRARY)


@final
@dataclasses.dataclass(frozen=True)
class Site:
    """The user's frames of a start call, innermost first: (file, line, function, module)."""

    frames: tuple[tuple[str, int, str, str], ...]

    def __str__(self) -> str:
        if not self.frames:
            return "an unknown place"
        filename, lineno, function, _ = self.frames[0]
        return f"{short_path(filename)}:{lineno} in {function}"

    def with_test_line(self) -> str:
        """``str(self)``, and the line of the test's own code that led there, if elsewhere.

        A thread started in a library's ``__init__`` (or a method the test called) is
        named where the library starts it; which test line built the object, or called
        the method, is what tells one leak from the other (a lock's creation site says
        the same, see the deadlock report).
        """
        text = str(self)
        if not self.frames or is_test_file(self.frames[0][0]):
            return text
        for index, (filename, lineno, function, _) in enumerate(self.frames[1:], 1):
            if is_test_file(filename):
                built = any(f.endswith("__init__") for _, _, f, _ in self.frames[:index])
                how = "object made at" if built else "called from"
                return f"{text} ({how} {short_path(filename)}:{lineno} in {function})"
        return text

    def functions(self) -> Iterable[str]:
        """Every function on the way, as ``qualname`` and as ``module.qualname``."""
        for _, _, function, module in self.frames:
            yield function
            if module:
                yield f"{module}.{function}"


UNKNOWN = Site(())

# pytest's python_files patterns (set by the checks at configure), and conftest.py.
_TEST_FILES: tuple[str, ...] = ("test_*.py", "*_test.py")


def set_test_files(patterns: Iterable[str]) -> None:
    global _TEST_FILES
    _TEST_FILES = tuple(patterns)
    _is_test_file.cache_clear()


def is_test_file(filename: str) -> bool:
    """Whether ``filename`` is a test module or a ``conftest.py`` (the user's test code)."""
    return _is_test_file(filename)


@functools.lru_cache(maxsize=1024)
def _is_test_file(filename: str) -> bool:
    import fnmatch

    name = os.path.basename(filename)
    return name == "conftest.py" or any(fnmatch.fnmatch(name, p) for p in _TEST_FILES)


def here(frame: FrameType | None = None) -> Site:
    """The user's frames of the current stack (or of ``frame`` and its callers)."""
    if frame is None:
        frame = sys._getframe(1)
    kept: list[tuple[str, int, str, str]] = []
    current: FrameType | None = frame
    while current is not None and len(kept) < _KEPT:
        code = current.f_code
        if not _is_library(code.co_filename):
            name = getattr(code, "co_qualname", code.co_name)
            module = current.f_globals.get("__name__", "")
            kept.append((code.co_filename, current.f_lineno, name, str(module)))
        current = current.f_back
    return Site(tuple(kept))


def from_origin(origin: tuple[tuple[str, int, str], ...] | None) -> Site:
    """The site of a coroutine's ``cr_origin`` (see ``sys.set_coroutine_origin_tracking_depth``)."""
    if not origin:
        return UNKNOWN
    return Site(
        tuple(
            (filename, lineno, function, "")
            for filename, lineno, function in origin
            if not _is_library(filename)
        )[:_KEPT]
    )


def format_exception(exc: BaseException) -> str:
    """``traceback.format_exception`` of ``exc``, without pytest-concur's own frames.

    A tracked lock's ``release`` or our hooks' wrappers are in the way of some of the
    user's calls; the C calls they stand for would show no frame at all.
    """
    import traceback

    formatted = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    part: traceback.TracebackException | None = formatted
    while part is not None and id(part) not in seen:
        seen.add(id(part))
        part.stack = traceback.StackSummary.from_list(
            [frame for frame in part.stack if not is_ours(frame.filename)]
        )
        part = part.__cause__ or part.__context__
    return "".join(formatted.format())


def callable_name(function: object) -> str:
    """A readable name of a thread's or process's target."""
    if function is None:
        return "None"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    if name is None:
        inner = getattr(function, "func", None)  # functools.partial
        return f"partial({callable_name(inner)})" if inner is not None else repr(function)
    return str(name)


def how_it_ended(exitcode: int | None) -> str:
    """``exited with code 3`` or ``was killed by signal SIGKILL (9)``, for a process."""
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            return f"was killed by signal {signal.Signals(-exitcode).name} ({-exitcode})"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def settle(pending: Callable[[], bool], grace: float) -> None:
    """Wait until ``pending()`` is false, for at most ``grace`` seconds.

    Things a test started may finish a moment after its body returns (a pool's workers
    exiting, a thread finishing its last line); they are not leaks. Polled as goleak does,
    with a backoff of 1, 2, 4 ... ms (at most 50 ms between looks), so a test that leaves
    nothing does not wait at all and one that leaves something waits little longer than it
    takes to finish.
    """
    if not pending():
        return
    deadline = time.monotonic() + grace
    delay = 0.001
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(delay, remaining))
        if not pending():
            return
        delay = min(delay * 2, 0.05)
