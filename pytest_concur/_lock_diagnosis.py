"""What the deadlock check tells a person: where locks were made and threads wait, the reports.

The lock and its tracker (``_locks``) decide; this module says where and what: the site a
lock was made at or a thread waits at (the first frame outside the locking machinery,
captured as plain data and formatted only when a report names it), the blocking call a wait
is in, the text of a deadlock or a lock-order inversion, and their graphs as data for the
reports (``_summary``, ``_html``). It knows locks and waits only by the few attributes
below (:class:`_Made`, :class:`_Waiting`), so it imports nothing of ``_locks``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any, Protocol

from pytest_concur._stacks import PACKAGE, short_path, stack_lines

_PACKAGE = PACKAGE  # (see _stacks)


class _Made(Protocol):
    """A tracked lock, as a report names it."""

    @property
    def site(self) -> str: ...


class _Waiting(Protocol):
    """A thread's wait, as a report tells it."""

    site: str
    began: float

    def describe(self) -> str: ...


# Frames in these files are the machinery between a user's call and a lock.
_STDLIB_SYNC = (
    "<frozen ",
    os.path.join("threading.py"),
    os.path.join("queue.py"),
    os.path.join("concurrent", "futures", "_base.py"),
    os.path.join("concurrent", "futures", "thread.py"),
    os.path.join("asyncio", ""),
    os.path.join("multiprocessing", ""),
    # All of pytest-concur: the concur fixture's joins, the wrappers of Thread.start,
    # Popen.__init__ and of a child's target (the checks').
    PACKAGE,
)
# The public blocking calls we name in diagnoses, by the stdlib function that blocks.
_BLOCKING_CALLS = {
    "Event.wait": "Event",
    "Condition.wait": "Condition",
    "Condition.wait_for": "Condition",
    "Semaphore.acquire": "Semaphore",
    "BoundedSemaphore.acquire": "BoundedSemaphore",
    "Barrier.wait": "Barrier",
    "Queue.get": "Queue (get)",
    "Queue.put": "Queue (put)",
    "Queue.join": "Queue (join: waits for task_done)",
    "Future.result": "concurrent.futures.Future",
    "Future.exception": "concurrent.futures.Future",
}


def _is_machinery(frame: FrameType) -> bool:
    return is_machinery_file(frame.f_code.co_filename)


def is_machinery_file(filename: str) -> bool:
    """Whether code of this file is locking machinery (the stdlib's, ours), not the user's."""
    # Asked for every frame a lock is made under, for every lock of the session: cached.
    known = _MACHINERY_FILES.get(filename)
    if known is None:
        known = _MACHINERY_FILES[filename] = any(part in filename for part in _STDLIB_SYNC)
    return known


_MACHINERY_FILES: dict[str, bool] = {}


def user_site(frame: FrameType | None, *, with_caller: bool = False) -> str:
    """``file:line in function`` of the first frame outside the locking machinery.

    A lock made in an ``__init__`` is one of many alike (every ``Account`` has one): the
    caller that made the object is added, so two of them can be told apart.
    """
    return _format_site(_capture_site(frame, with_caller=with_caller))


# Where a lock was made, as plain data: formatting (relpath) waits for a report, since
# every lock of the session is made through us and most are never reported.
_Site = tuple[str, int, str, str, int] | None


def _capture_site(frame: FrameType | None, *, with_caller: bool = False) -> _Site:
    while frame is not None and _is_machinery(frame):
        frame = frame.f_back
    if frame is None:
        return None
    code = frame.f_code
    caller = frame.f_back
    while caller is not None and caller.f_code.co_filename.startswith(_PACKAGE):
        caller = caller.f_back  # our hooks' wrappers (see _patches) call __init__ for the user
    if (with_caller or code.co_name == "__init__") and caller is not None:
        where = caller.f_code.co_filename, caller.f_lineno
        return (code.co_filename, frame.f_lineno, code.co_name, *where)
    return (code.co_filename, frame.f_lineno, code.co_name, "", 0)


def _format_site(site: _Site) -> str:
    if site is None:
        return "<unknown>"
    filename, lineno, function, caller_file, caller_line = site
    text = f"{short_path(filename)}:{lineno} in {function}"
    if caller_file:
        text += f" (from {short_path(caller_file)}:{caller_line})"
    return text


def _blocking_call(frame: FrameType | None) -> tuple[str, object] | None:
    """The outermost known blocking stdlib call on the stack, with its ``self``."""
    found = None
    while frame is not None and _is_machinery(frame):
        code = frame.f_code
        qualname = getattr(code, "co_qualname", None) or code.co_name
        for call, kind in _BLOCKING_CALLS.items():
            if (
                qualname == call
                or qualname.endswith("." + call)
                or (
                    code.co_name == call.split(".")[1]
                    and type(frame.f_locals.get("self")).__name__ == call.split(".")[0]
                )
            ):
                found = (kind, frame.f_locals.get("self"))
        frame = frame.f_back
    return found


def _thread_name(ident: int | None) -> str:
    if ident is None:
        return "nobody"
    for thread in threading.enumerate():
        if thread.ident == ident:
            return repr(thread.name)
    return f"thread {ident}"


_KINDS = {
    "cycle": "a wait-for cycle (each thread waits for the next)",
    "self": "a thread waits for a lock it holds itself, and no other thread is left running "
    "that could release it",
    "blocked": "every thread of the test is blocked, and nothing left running can end the waits",
}


def _render(finding: tuple[str, tuple[int, ...]], waits: Mapping[int, _Waiting]) -> str:
    kind, idents = finding
    frames = sys._current_frames()
    lines = [f"pytest-concur: deadlock: {_KINDS[kind]}"]
    for ident in idents:
        wait = waits[ident]
        lines.append(f"  thread {_thread_name(ident)} {wait.describe()}")
        lines.append(f"    at {wait.site}")
    # How quickly it was found (the summary's and the JUnit XML's detection latency).
    latency = (time.monotonic() - max(waits[ident].began for ident in idents)) * 1000
    lines.append(f"  found {latency:.1f} ms after the last of these waits began")
    for ident in idents:
        frame = frames.get(ident)
        if frame is None:
            continue
        lines.append("")
        lines.append(f"Stack of thread {_thread_name(ident)}:")
        lines.extend(stack_lines(frame))
    return "\n".join(lines)


def _inversion_graph(
    locks: tuple[_Made, _Made], earlier: tuple[str, str], later: tuple[str, str]
) -> dict[str, Any]:
    """A lock-order inversion as the deadlock it allows (see :func:`wait_for_graph`).

    ``locks`` is (B, A): A was taken while holding B at ``later``, after B had been taken
    while holding A at ``earlier``. Each of the two takings is drawn as a thread that holds
    the first lock and waits for the second: what happens when they meet.
    """
    held, taken = locks
    lock_a = {
        "id": "lock-a",
        "type": "lock",
        "label": "Lock A",
        "detail": f"created at {taken.site}",
    }
    lock_b = {
        "id": "lock-b",
        "type": "lock",
        "label": "Lock B",
        "detail": f"created at {held.site}",
    }
    nodes: list[dict[str, str]] = []
    edges = []
    for index, ((name, site), first, then) in enumerate(
        [(earlier, lock_a, lock_b), (later, lock_b, lock_a)], start=1
    ):
        key = f"taker-{index}"
        label = f"thread {name!r}" if name else f"thread {index}"
        # Listed round the cycle (thread, the lock it waits for, ...), as drawn.
        nodes.append({"id": key, "type": "thread", "label": label, "detail": f"at {site}"})
        nodes.append(then)
        edges.append({"from": key, "to": first["id"], "label": "holds"})
        edges.append({"from": key, "to": then["id"], "label": "waits for"})
    return {
        "kind": "lock-order inversion",
        "title": "pytest-concur: potential deadlock: two locks are taken in both orders",
        "nodes": nodes,
        "edges": edges,
    }


# Graphs of what the deadlock check reported for the body that just ran, for its test's
# report (see _checks/deadlock.py, and _summary, which takes them). A process backend's
# child sends its own back with the body's outcome.
_GRAPHS: list[dict[str, Any]] = []


def note_graphs(graphs: Iterable[dict[str, Any]]) -> None:
    """Keep these graphs for the report of the test that runs now."""
    for graph in graphs:
        if graph not in _GRAPHS:  # stress mode: every copy may report the same one
            _GRAPHS.append(graph)


def take_graphs() -> list[dict[str, Any]]:
    """The graphs kept for the test that runs now; none are kept after this."""
    graphs = _GRAPHS[:]
    del _GRAPHS[:]
    return graphs


def _inversion_report(held: _Made, taken: _Made, site: str, earlier_site: str) -> str:
    # Named in the order they were first nested: A, then B inside it.
    return (
        "pytest-concur: potential deadlock: two locks are taken in both orders\n"
        f"  Lock A created at {taken.site}\n"
        f"  Lock B created at {held.site}\n"
        f"  B taken while holding A at {earlier_site}\n"
        f"  A taken while holding B at {site}\n"
        "Two threads taking them at these two places at the same time deadlock. Take the "
        "locks in one order everywhere."
    )
