"""Naming what held an event loop, for the ``blocked_loop`` check's report.

A step is named by its task, the user's coroutine it runs and the lines it ran between;
a callback by its name and where it is defined. Before every step of a followed loop only
the await chain's frames and their offsets are noted (:func:`_chain`, which formats
nothing); lines, sites and names are worked out here only for a step over the threshold.
"""

from __future__ import annotations

from types import CodeType, CoroutineType, FrameType, GeneratorType
from typing import TYPE_CHECKING, Any

from pytest_concur._checks._where import _is_library, callable_name
from pytest_concur._stacks import short_path

if TYPE_CHECKING:
    import asyncio

# Await chains deeper than this are cut (the user's line is almost always in the first few).
_MAX_CHAIN = 32
# How far past co_firstlineno (the first decorator) a ``def`` line is looked for.
_MAX_DECORATOR_LINES = 50


def _user_frame(frame: FrameType | None) -> tuple[str, int, str] | None:
    """The innermost frame of the user's code on a stack: (file, line, function)."""
    while frame is not None:
        code = frame.f_code
        if not _is_library(code.co_filename):
            return code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name)
        frame = frame.f_back
    return None


def _blocked_at(looks: dict[tuple[str, int, str], int]) -> str:
    """The line the sampler found a step at most often, with its source."""
    import linecache

    (filename, lineno, function), count = max(looks.items(), key=lambda item: item[1])
    total = sum(looks.values())
    text = linecache.getline(filename, lineno).strip()
    where = f"at {short_path(filename)}:{lineno} in {function}" + (f": {text}" if text else "")
    if total > count:
        where += f" ({count} of {total} looks)"
    return where


# An await chain as noted before a step: each frame with its f_lasti then (reading
# f_lineno would cost a walk of the line table per frame, on every step).
_Chain = list[tuple[FrameType, int]]
_NO_CHAIN: _Chain = []


def _chain(coro: Any) -> _Chain:
    """Each frame of a coroutine's await chain with the offset it stands at, outermost first.

    Called before every step of a followed loop: it formats nothing, and the frames are
    dropped when the step is over (a suspended coroutine keeps them alive anyway).
    """
    found: _Chain = []
    while len(found) < _MAX_CHAIN:
        kind = type(coro)
        if kind is CoroutineType:
            frame = coro.cr_frame
            following = coro.cr_await
        elif kind is GeneratorType:  # a generator-based coroutine, as asyncio.sleep(0) uses
            frame = coro.gi_frame
            following = coro.gi_yieldfrom
        else:
            break  # a future, or something we cannot look into
        if frame is None:
            break  # finished
        found.append((frame, frame.f_lasti))
        coro = following
    return found


def _site(chain: _Chain, *, before: bool) -> str | None:
    """Where the user's code stood in an await chain, before or after a step.

    The innermost frame of user code, as ``file:line``; when that is a coroutine the task's
    own awaits, the line of the task's own coroutine is added, as the blocking call is
    often there, between the two calls.
    """
    user = [(frame, lasti) for frame, lasti in chain if not _is_library(frame.f_code.co_filename)]
    if not user:
        return None
    frame, lasti = user[-1]
    code = frame.f_code
    if before and _unstarted(code, lasti):
        return f"its start ({_def_site(code.co_filename, code.co_firstlineno)})"
    text = _frame_site(frame, lasti)
    outer, outer_lasti = user[0]
    if outer is not frame:
        name = getattr(code, "co_qualname", code.co_name)
        text += f" in {name}() (called at {_frame_site(outer, outer_lasti)})"
    return text


def _frame_site(frame: FrameType, lasti: int) -> str:
    lineno = _line_at(frame.f_code, lasti) if lasti >= 0 else None
    return f"{short_path(frame.f_code.co_filename)}:{lineno or frame.f_lineno}"


def _unstarted(code: CodeType, lasti: int) -> bool:
    """Whether a coroutine frame at ``lasti`` has not run yet (before its first RESUME)."""
    if lasti < 0:
        return True  # 3.10
    import dis

    for instruction in dis.get_instructions(code):
        if instruction.opname == "RESUME":  # 3.11+: the first one is where a frame starts
            return lasti < instruction.offset
    return False


def _line_at(code: CodeType, lasti: int) -> int | None:
    """The line of the instruction at byte offset ``lasti`` (what f_lineno said then)."""
    for start, stop, lineno in code.co_lines():
        if start <= lasti < stop:
            return lineno
    return None


def _def_site(filename: str, first_line: int) -> str:
    """``file:line`` of a function's ``def``, past its decorators (``co_firstlineno``)."""
    import linecache

    if not filename:
        return "an unknown place"
    lineno = first_line
    for offset in range(_MAX_DECORATOR_LINES):
        text = linecache.getline(filename, first_line + offset).lstrip()
        if text.startswith(("def ", "async def ")):
            lineno = first_line + offset
            break
        if not text:
            break  # no source to read: keep the first line
    return f"{short_path(filename)}:{lineno}"


def _runs_sync_body(task: asyncio.Task[Any], body_task: asyncio.Task[Any] | None) -> bool:
    """Whether ``task`` is pytest-concur's own task that calls a sync body."""
    if task is body_task:
        return True
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and _is_pytest_concur(code.co_filename)


def _coroutine_name(task: asyncio.Task[Any], body_name: str) -> str:
    """The user's coroutine the task runs, past pytest-concur's and asyncio's own."""
    coro: Any = task.get_coro()
    top = coro
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and not _is_library(code.co_filename):
            return str(getattr(coro, "__qualname__", None) or code.co_name)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    code = getattr(top, "cr_code", None)
    if code is not None and _is_pytest_concur(code.co_filename):
        # pytest-concur's task that awaits the body (or a stress-mode copy of it), whose
        # coroutine has finished by now.
        return body_name
    return str(getattr(top, "__qualname__", None) or type(top).__name__)


def _is_pytest_concur(filename: str) -> bool:
    import pytest_concur

    return filename.startswith(pytest_concur.__path__[0])


def _task_name(task: asyncio.Task[Any]) -> str:
    # 3.13 may leave a task unnamed (get_name() is None) until someone names it.
    return task.get_name() or f"Task at 0x{id(task):x}"


def describe_callable(callback: Any) -> tuple[str, str]:
    """The name of a callback and ``file:line`` of its definition ("" if it has none)."""
    function = callback
    while hasattr(function, "func"):  # functools.partial
        function = function.func
    function = getattr(function, "__func__", function)  # a bound method
    code = getattr(function, "__code__", None)
    site = f"{short_path(code.co_filename)}:{code.co_firstlineno}" if code is not None else ""
    return callable_name(function), site


def _describe_callback(callback: Any) -> tuple[tuple[str, ...], str, str]:
    """Key, name and definition site of a plain callback."""
    name, site = describe_callable(callback)
    owner = getattr(callback, "__self__", None)
    protocol = getattr(owner, "_protocol", None)
    if protocol is not None:
        # A transport's callback runs the user's protocol (data_received and the like).
        name = f"{name} (for protocol {type(protocol).__qualname__})"
    who = f"callback {name}" + (f" (defined at {site})" if site else "")
    return ("callback", name, site), who, ""
