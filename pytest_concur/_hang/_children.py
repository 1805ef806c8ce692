"""The children of a hung test: their stacks, asked for with a signal or read from outside.

A child of the process backend (or a process forked from it, or from pytest) dumps its own
stacks on ``SIGURG`` (:data:`DUMP_SIGNAL`), whose default action is to be ignored, so a
child without the handler is not harmed; it follows faulthandler's dump with a report of
its own (between :data:`REPORT_START` and :data:`REPORT_END`, made by
:func:`pytest_concur._hang._at_deadline.report_in_child`). On Python 3.14+ any Python child is
read from outside (``_remote_debugging``), without its cooperation; otherwise what
``/proc`` says (command, state, kernel wait) is all there is.

The process backend registers the file each child writes its stacks to
(:func:`register_stack_file`) and asks whether a hang report already showed a child
(:func:`reported`), so that its own failure does not print the stacks twice.

Invariant (that of the whole report, see ``_at_deadline``): this runs in a signal handler in
the main thread; the table of stack files is guarded by a reentrant lock for that reason,
and every wait for a child is bounded (:data:`_CHILD_WAIT`, :data:`_ALL_CHILDREN_WAIT`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from pytest_concur import _locks
from pytest_concur._stacks import filter_dump

# The signal a child is asked to dump its stacks with (see also _backends/_child.py).
DUMP_SIGNAL = getattr(signal, "SIGURG", None)
# How long one child may take to write its stacks, and all children together.
_CHILD_WAIT = 1.0
_ALL_CHILDREN_WAIT = 4.0
# Where a child's stacks go when it dumps them: the file its faulthandler writes to. The
# process backend registers each of its children; children forked from this process (or
# from a registered child) inherit their parent's registration and file.
_STACK_FILES: dict[int, str] = {}
# Reentrant: the main thread may be interrupted by the deadline while it holds it.
_STACK_FILES_LOCK = _locks._real_rlock()  # made untracked whenever we are imported
# Children whose stacks a report already holds (the process backend then does not print
# them again).
_REPORTED: set[int] = set()
_HARNESS_CHILDREN = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def install_parent_handler() -> Callable[[], None] | None:
    """Make this process's forked children dump their stacks on DUMP_SIGNAL; the undo.

    A child forked from here inherits the handler and the file (this process never gets
    the signal itself). Children that ``exec`` (spawn, subprocess) lose both.
    """
    if DUMP_SIGNAL is None:
        return None
    import faulthandler
    import tempfile

    fd, path = tempfile.mkstemp(prefix="concur-stacks-", suffix=".txt")
    os.close(fd)
    try:
        stream = open(path, "a")  # noqa: SIM115 - open until the undo
        faulthandler.register(DUMP_SIGNAL, file=stream, all_threads=True)
    except (OSError, RuntimeError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    pid = os.getpid()
    named = f"/proc/{pid}/fd/{stream.fileno()}"
    if os.path.exists(named):
        # Linux: the open file is reachable without its name, so it has none from here on,
        # and a session that is killed outright (SIGKILL, a CI job's timeout) leaves no
        # file behind. The forked children write through the descriptor they inherit.
        with contextlib.suppress(OSError):
            os.unlink(path)
            path = named
    register_stack_file(pid, path)

    def undo() -> None:
        with contextlib.suppress(Exception):
            faulthandler.unregister(DUMP_SIGNAL)
        forget_stack_file(pid)
        stream.close()
        with contextlib.suppress(OSError):
            os.unlink(path)

    return undo


def register_stack_file(pid: int, path: str) -> None:
    """Note that child ``pid`` (and what it forks) writes its stacks to ``path``."""
    with _STACK_FILES_LOCK:
        _STACK_FILES[pid] = path


def forget_stack_file(pid: int) -> None:
    with _STACK_FILES_LOCK:
        _STACK_FILES.pop(pid, None)
        _REPORTED.discard(pid)


def reported(pid: int) -> bool:
    """Whether a hang report already shows the stacks of child ``pid``."""
    with _STACK_FILES_LOCK:
        return pid in _REPORTED


# What a child of the process backend writes after faulthandler's dump, when its main
# thread runs Python code again (see _backends/_child.py).
REPORT_START = "--- pytest-concur: the child's own report ---"
REPORT_END = "--- end of the child's report ---"


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``, parents before children (Linux ``/proc``; else [])."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        for child in _direct_children(parent):
            if child not in found:
                found.append(child)
                queue.append(child)
    return found


def _direct_children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(p) for p in f.read().split())
    return children


def children_report() -> str:
    """Every child process of this one (the harness's left out), with its stacks; '' if none."""
    pids = descendants(os.getpid())
    if not pids:
        import multiprocessing

        pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
    pids = [pid for pid in pids if not _is_harness(pid)]
    if not pids:
        return ""
    lines = ["Child processes:"]
    deadline = time.monotonic() + _ALL_CHILDREN_WAIT
    for pid in pids:
        lines.append(f"  pid {pid}: {_cmdline(pid) or '?'} [{_state(pid)}]")
        stacks = _child_stacks(pid, deadline)
        with _STACK_FILES_LOCK:
            _REPORTED.add(pid)
        lines.extend("    " + line for line in stacks.splitlines())
    return "\n".join(lines)


def _is_harness(pid: int) -> bool:
    """Whether ``pid`` is multiprocessing's own helper (its resource tracker, forkserver).

    A process the forkserver forked (a ``forkserver`` child of the process backend, or of
    the test) has the server's command line: it is told apart by its parent, the server.
    """
    command = _cmdline(pid)
    if not any(harness in command for harness in _HARNESS_CHILDREN):
        return False
    parent = _parent(pid)
    return parent is None or _cmdline(parent) != command


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return ""
    text = " ".join(p.decode(errors="replace") for p in parts if p)
    return text if len(text) <= 200 else text[:197] + "..."


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent...); None
    when the process is gone or there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name, in parentheses, may itself hold spaces and parentheses.
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _state(pid: int) -> str:
    """The kernel's view: running, sleeping... and the kernel function it waits in."""
    fields = proc_stat(pid)
    if not fields:
        return "state unknown"
    state = fields[0]
    words = {"R": "running", "S": "sleeping", "D": "disk wait", "Z": "zombie", "T": "stopped"}
    text = f"state {state} ({words.get(state, '?')})"
    with contextlib.suppress(OSError), open(f"/proc/{pid}/wchan") as f:
        wchan = f.read().strip()
        if wchan and wchan != "0":
            text += f", waiting in {wchan}"
    return text


def _stack_file(pid: int) -> str | None:
    """The file ``pid`` dumps its stacks to, if it has the handler.

    A registered child (the process backend's) has its own; a process forked from a
    registered one, or from this process when it is registered, inherited the handler and
    the file. A process that ran ``exec`` (spawn, forkserver, subprocess) has neither.
    """
    with _STACK_FILES_LOCK:
        files = dict(_STACK_FILES)
    current = pid
    for _ in range(32):
        if current in files:
            return files[current]
        parent = _parent(current)
        if parent is None or _cmdline(current) != _cmdline(parent):
            return None  # not a fork of its parent: the handler did not come along
        current = parent
    return None


def _parent(pid: int) -> int | None:
    fields = proc_stat(pid)
    try:
        return int(fields[1]) if fields else None
    except (ValueError, IndexError):
        return None


def _child_stacks(pid: int, deadline: float) -> str:
    with _STACK_FILES_LOCK:
        own = _STACK_FILES.get(pid)
    # Reading from outside needs no help from the child; asking needs its handler.
    remote = "" if own is not None else _remote_stacks(pid)
    if remote:
        return remote
    path = own or _stack_file(pid)
    if path is not None and DUMP_SIGNAL is not None and time.monotonic() < deadline:
        text = ask_for_stacks(pid, path, min(_CHILD_WAIT, deadline - time.monotonic()))
        if text:
            return filter_dump(text)
    return "(no Python stacks: not a process pytest-concur can ask, or it did not answer)"


def ask_for_stacks(pid: int, path: str, wait: float) -> str:
    """Send ``pid`` the dump signal and return what it wrote to ``path`` (may be '').

    A child with pytest-concur's own handler follows faulthandler's dump with a report of
    its own (:data:`REPORT_START`); when it comes in time, that report is the answer.
    """
    assert DUMP_SIGNAL is not None
    try:
        start = os.path.getsize(path)
        os.kill(pid, DUMP_SIGNAL)
    except OSError:
        return ""
    # faulthandler writes from the child's signal handler; read once the file stops growing.
    deadline = time.monotonic() + wait
    size, quiet, text = start, 0, ""
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            now = os.path.getsize(path)
        except OSError:
            return ""
        if now > size:
            size, quiet = now, 0
            text = _read(path, start, size)
            if REPORT_END in text:
                break
        elif now > start:
            quiet += 1
            # faulthandler's dump is whole; a report of our own, once begun, is awaited.
            if quiet >= 3 and (REPORT_START not in text or quiet >= 25):
                break
    if REPORT_START in text and REPORT_END in text:
        return text.split(REPORT_START, 1)[1].split(REPORT_END, 1)[0].strip("\n")
    return text.split(REPORT_START, 1)[0].rstrip()


def _read(path: str, start: int, end: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start).decode(errors="replace")
    except OSError:
        return ""


def _remote_stacks(pid: int) -> str:
    """Python 3.14+: read a Python child's threads from outside, without its cooperation."""
    try:
        remote: Any = importlib.import_module("_remote_debugging")
        traces = remote.RemoteUnwinder(pid, all_threads=True).get_stack_trace()
    except Exception:  # not Python, gone, or not ours to read
        return ""
    lines = []
    for info in _thread_infos(traces):
        lines.append(f"Thread {getattr(info, 'thread_id', '?')} (most recent call first):")
        for frame in getattr(info, "frame_info", None) or ():
            location = getattr(frame, "location", None)
            lineno = getattr(location, "lineno", None) or getattr(frame, "lineno", "?")
            lines.append(f'  File "{frame.filename}", line {lineno} in {frame.funcname}')
    return "\n".join(lines)


def _thread_infos(traces: Any) -> Iterator[Any]:
    for entry in traces or ():
        threads = getattr(entry, "threads", None)  # 3.15: per interpreter
        if threads is not None:
            yield from threads
        else:
            yield entry
