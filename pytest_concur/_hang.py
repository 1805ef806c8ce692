"""The report of a test that hung without a deadlock pytest-concur could prove.

When a backend test reaches its deadline (see ``_timeout``), this module describes where
everything of the test stands, for a person to act on:

- every thread, with its stack, the tracked locks it holds and the tracked wait it is in;
- every pending asyncio task, with its await chain and what it awaits;
- every child process, with its Python stacks when they can be had: a child of the
  process backend (or a process forked from it, or from pytest) dumps its own stacks on
  ``SIGURG``, whose default action is to be ignored, so a child without the handler is not
  harmed; on Python 3.14+ any Python child is read from outside (``_remote_debugging``),
  without its cooperation; otherwise what ``/proc`` says (command, state, kernel wait).

It also lets the stuck threads go where it can (:func:`release`): tracked waits raise
:class:`HangError`, and threads the test started that run Python code are sent
``HangError`` asynchronously. A thread blocked in C code keeps waiting; ``_shutdown`` then
keeps it from holding the interpreter open at exit.

Invariant: this code runs in a signal handler in the main thread, which may hold any of
the plugin's locks at that moment; it never blocks on a lock (it reads the tracker's
tables without its mutex, retrying on a concurrent change) and bounds every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from pytest_concur import _locks
from pytest_concur._checks._where import callable_name
from pytest_concur._locks import HangError
from pytest_concur._loopwatch import task_lines

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


def report(body_thread: int | None, passive: frozenset[int], main_frame: FrameType | None) -> str:
    """Every thread, task and child of the test, as text.

    ``body_thread`` runs the test body (``None`` when it runs in a child process);
    ``passive`` threads only wait for the body and are left out; ``main_frame`` is the
    frame the main thread was interrupted in, when this runs in a signal handler.
    """
    sections = [_threads(body_thread, passive, main_frame)]
    tasks = _tasks()
    if tasks:
        sections.append(tasks)
    children = _children()
    if children:
        sections.append(children)
    return "\n\n".join(section for section in sections if section)


# What a child of the process backend writes after faulthandler's dump, when its main
# thread runs Python code again (see _backends/_child.py).
REPORT_START = "--- pytest-concur: the child's own report ---"
REPORT_END = "--- end of the child's report ---"


def report_in_child(main_frame: FrameType | None) -> str:
    """The threads and tasks of this process (a child), for its parent's report."""
    tracker = _locks.TRACKER
    body = tracker.body_thread if tracker is not None else threading.get_ident()
    sections = [_threads(body, frozenset(), main_frame, in_child=True), _tasks()]
    return "\n\n".join(section for section in sections if section)


# -- threads ---------------------------------------------------------------------------


def _threads(
    body_thread: int | None,
    passive: frozenset[int],
    main_frame: FrameType | None,
    *,
    in_child: bool = False,
) -> str:
    frames = sys._current_frames()
    me = threading.get_ident()
    if main_frame is not None:
        frames[me] = main_frame
    tracker = _locks.TRACKER
    started = set() if tracker is None else {t.ident for t in list(tracker.started)}
    names = {t.ident: t for t in threading.enumerate()}
    order = sorted(
        (ident for ident in frames if ident not in passive),
        key=lambda ident: (ident != body_thread, ident not in started, _name(names, ident)),
    )
    lines = ["Threads (most recent call last):"]
    for ident in order:
        stack = _stack(frames[ident])
        # (A forked child's stack starts with its parent's frames, waiting included.)
        if ident == me and not in_child and main_frame is not None and waits_for_body(main_frame):
            continue  # pytest's thread, waiting for the body's thread or process
        thread = names.get(ident)
        role = []
        if ident == body_thread:
            role.append("the test body")
        elif ident in started:
            role.append("started by the test")
        elif tracker is not None and ident in tracker.foreign_at_start:
            role.append("running before the test began")
        if thread is not None and thread.daemon:
            role.append("daemon")
        label = f"  Thread {_name(names, ident)}" + (f" ({', '.join(role)})" if role else "")
        lines.append(label + ":")
        if not stack:
            target = getattr(thread, "_target", None)  # private, but the only clue left
            stack = [f"(no Python frames of its own: it runs {callable_name(target)})"]
        lines.extend("    " + line for line in stack)
        if tracker is not None:
            held = _copy(lambda ident=ident: list(tracker.held.get(ident, ())))
            for lock in held or ():
                kind = "RLock" if lock._reentrant else "Lock"
                lines.append(f"    holds {kind} created at {lock.site}")
            wait = _copy(lambda ident=ident: tracker.waits.get(ident))
            if wait is not None:
                lines.append(f"    {wait.describe()} (at {wait.site})")
    return "\n".join(lines) if len(lines) > 1 else ""


def _name(names: dict[int | None, threading.Thread], ident: int) -> str:
    thread = names.get(ident)
    return repr(thread.name) if thread is not None else f"<thread {ident}>"


def _copy(read: Any) -> Any:
    """Read a table another thread may be changing, without its lock (see the invariant)."""
    for _ in range(10):
        with contextlib.suppress(RuntimeError):
            return read()
    return None


# Frames that are never where a test stands: pytest's and pluggy's calls down to the test,
# the interpreter's start, an event loop's own running, a thread's start.
_NOISE = (
    os.sep + "_pytest" + os.sep,
    os.sep + "pluggy" + os.sep,
    os.path.join("pytest", "__main__.py"),
    "<frozen runpy>",
    os.path.join("asyncio", "base_events.py"),
    os.path.join("asyncio", "events.py"),
    os.path.join("asyncio", "runners.py"),
    os.path.join("multiprocessing", "process.py"),
    os.path.join("multiprocessing", "popen_fork.py"),
    os.path.join("multiprocessing", "context.py"),
)
_THREAD_START = ("run", "_bootstrap", "_bootstrap_inner")


def _is_noise(filename: str, name: str) -> bool:
    if filename.startswith(_locks._PACKAGE) or any(part in filename for part in _NOISE):
        return True
    return filename.endswith("threading.py") and name in _THREAD_START


def _stack(frame: FrameType | None) -> list[str]:
    """A thread's stack, oldest call first, without the frames of :data:`_NOISE`."""
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), capture_locals=False)
    entries = [entry for entry in reversed(summary) if not _is_noise(entry.filename, entry.name)]
    text = "".join(traceback.StackSummary.from_list(entries).format())
    return text.rstrip("\n").splitlines()


def waits_for_body(frame: FrameType | None) -> bool:
    """Whether a thread stopped at ``frame`` is a backend waiting for the body to end."""
    waiting = {
        os.path.join(_locks._PACKAGE, "_backends", name) for name in ("thread.py", "process.py")
    }
    while frame is not None:
        code = frame.f_code
        if code.co_filename in waiting and code.co_name == "run":
            return True
        frame = frame.f_back
    return False


def _filter_dump(text: str) -> str:
    """A faulthandler dump without the frames of :data:`_NOISE`."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith('File "') and " in " in stripped:
            filename = stripped[len('File "') :].split('"', 1)[0]
            name = stripped.rsplit(" in ", 1)[-1]
            if _is_noise(filename, name):
                continue
        kept.append(line)
    return "\n".join(kept)


# -- tasks -----------------------------------------------------------------------------


def _pending_tasks() -> dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]]:
    """Pending tasks of every event loop of the process, found through the collector.

    A loop running in another thread cannot be asked for from here, and asyncio keeps no
    public list of loops; its tasks are all live objects, though.
    """
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and not obj.done():
            with contextlib.suppress(Exception):
                loops.setdefault(obj.get_loop(), []).append(obj)
    return loops


def _tasks() -> str:
    lines = []
    for loop in _pending_tasks():
        if loop.is_closed():
            continue
        lines.append(f"Tasks of event loop {type(loop).__name__} at 0x{id(loop):x}:")
        lines.extend("  " + line if line else "" for line in task_lines(loop))
    return "\n".join(lines)


# -- children --------------------------------------------------------------------------


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


def _children() -> str:
    pids = descendants(os.getpid())
    if not pids:
        import multiprocessing

        pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
    pids = [pid for pid in pids if not any(h in _cmdline(pid) for h in _HARNESS_CHILDREN)]
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


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return ""
    text = " ".join(p.decode(errors="replace") for p in parts if p)
    return text if len(text) <= 200 else text[:197] + "..."


def _state(pid: int) -> str:
    """The kernel's view: running, sleeping... and the kernel function it waits in."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return "state unknown"
    state = stat.rsplit(")", 1)[-1].split()[0]
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
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
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
            return _filter_dump(text)
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


# -- letting go ------------------------------------------------------------------------


def release(passive: frozenset[int]) -> list[threading.Thread]:
    """Unblock what can be unblocked; the threads of the test still alive (to be reported)."""
    tracker = _locks.TRACKER
    if tracker is not None:
        tracker.abandon("pytest-concur gave up on this test at its deadline")
    me = threading.get_ident()
    started = [] if tracker is None else [t for t in list(tracker.started) if t.is_alive()]
    body = [] if tracker is None else [tracker.body_thread]
    targets = [
        ident
        for ident in {t.ident for t in started} | set(body)
        if ident is not None and ident != me and ident not in passive
    ]
    if not targets:
        return started
    # The threads die of HangError; that is our doing, not news for the thread-exception
    # hooks (pytest's would blame whatever test runs next). The quiet hook stays until
    # they are all gone (see settle), however late the exception reaches them.
    _quiet_hook_install([t for t in started if t.ident in targets])
    for ident in targets:
        _raise_in(ident)
    deadline = time.monotonic() + 0.5
    for thread in started:
        remaining = deadline - time.monotonic()
        if remaining > 0 and thread.ident in targets:
            _locks._real_join(thread, remaining)
    settle()
    return [thread for thread in started if thread.is_alive()]


_SENT: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_previous_hook: Any = None


def _quiet(args: Any) -> object:
    if isinstance(args.exc_value, HangError):
        return None
    previous = _previous_hook or threading.__excepthook__
    return previous(args)


def _quiet_hook_install(threads: list[threading.Thread]) -> None:
    global _previous_hook
    with _STACK_FILES_LOCK:
        _SENT.update(threads)
        if threading.excepthook is not _quiet:
            _previous_hook = threading.excepthook
            threading.excepthook = _quiet


def settle() -> None:
    """Put the thread-exception hook back once every thread sent HangError is gone."""
    global _previous_hook
    with _STACK_FILES_LOCK:
        if _previous_hook is None or any(t.is_alive() for t in list(_SENT)):
            return
        if threading.excepthook is _quiet:
            threading.excepthook = _previous_hook
        _previous_hook = None


def _raise_in(ident: int) -> None:
    """Ask a thread to raise HangError when it next runs Python code (CPython only)."""
    if sys.implementation.name != "cpython":  # pragma: no cover - other interpreters
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(HangError)
        )
