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
``HangError`` asynchronously (an event loop such a thread runs is woken, so that it runs
Python code again). A thread blocked in C code keeps waiting; ``_shutdown`` then keeps it
from holding the interpreter open at exit. The HangError a thread dies of is kept from the
thread-exception hooks, however late it lands.

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
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from pytest_concur import _locks
from pytest_concur._checks._where import callable_name
from pytest_concur._errors import HangError
from pytest_concur._loopwatch import task_lines
from pytest_concur._stacks import filter_dump, stack_lines

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
# The running version, typed so that mypy (set to the oldest one) keeps every branch.
_PYTHON: tuple[int, ...] = tuple(sys.version_info[:2])


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
    sections = [
        _section("threads", lambda: _threads(body_thread, passive, main_frame)),
        _section("tasks", _tasks),
        _section("child processes", _children),
    ]
    text = "\n\n".join(section for section in sections if section)
    return text or "(no thread, task or child process of the test was found)"


def _section(what: str, make: Callable[[], str]) -> str:
    """One part of a report; a part that fails says so instead of losing the rest.

    The report runs in a signal handler, at whatever moment the deadline struck: a thread
    or task in an odd state must not turn the test's failure into a crash of ours.
    """
    try:
        return make()
    except Exception as exc:
        return f"(pytest-concur could not list the {what}: {type(exc).__name__}: {exc})"


# What a child of the process backend writes after faulthandler's dump, when its main
# thread runs Python code again (see _backends/_child.py).
REPORT_START = "--- pytest-concur: the child's own report ---"
REPORT_END = "--- end of the child's report ---"


def report_in_child(main_frame: FrameType | None, *, runs_the_body: bool = True) -> str:
    """The threads and tasks of this process (a child), for its parent's report.

    ``runs_the_body`` is false in a process the body's process forked: its thread that
    has the body thread's ident (a fork keeps it) is not the body.
    """
    tracker = _locks.TRACKER
    body: int | None = tracker.body_thread if tracker is not None else threading.get_ident()
    if not runs_the_body:
        body = None
    sections = [
        _section("threads", lambda: _threads(body, frozenset(), main_frame, in_child=True)),
        _section("tasks", _tasks),
    ]
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
    waits = _locks.waits_now(tracker, frames)
    waited_on = [w.lock for w in waits.values() if w.holder() is not None and w.lock is not None]
    # Threads alike (a pool's idle workers, copies of one loop) are shown once, as one
    # block: (roles, lines) -> the names of the threads it stands for.
    blocks: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for ident in order:
        # (A forked child's stack starts with its parent's frames, waiting included.)
        if ident == me and not in_child and main_frame is not None and waits_for_body(main_frame):
            continue  # pytest's thread, waiting for the body's thread or process
        thread = names.get(ident)
        role = []
        if ident == body_thread:
            role.append("the test body")
        elif ident in started:
            role.append("started by the test")
        elif thread is not None and _locks.left_behind(thread):
            role.append("left running by an earlier test")
        elif tracker is not None and ident in tracker.foreign_at_start:
            role.append("running before the test began")
        elif thread is None:
            role.append("not a threading.Thread: started by C code or _thread")
        if thread is not None and thread.daemon:
            role.append("daemon")
        body = stack_lines(frames[ident])
        state: list[str] = []
        held: list[_locks.TrackedLock] = []
        if tracker is not None:
            held = _copy(lambda ident=ident: list(tracker.held.get(ident, ()))) or []
        # And the locks someone waits on that this thread holds, however it took them
        # (before the test, say): the holder of every lock a stuck thread waits on is named.
        held += [lock for lock in waited_on if lock.owner == ident and lock not in held]
        for lock in held:
            kind = "RLock" if lock._reentrant else "Lock"
            state.append(f"holds {kind} created at {lock.site}")
        wait = waits.get(ident)
        if wait is not None:
            state.append(f"{wait.describe()} (at {wait.site})")
        if not body:
            target = getattr(thread, "_target", None)  # private, but the only clue left
            if target is not None:
                body = [f"(no Python frames of its own: it runs {callable_name(target)})"]
            elif ident in (me, body_thread) or ident in started or state:
                body = ["(only pytest's and pytest-concur's own frames: between steps of the test)"]
            else:
                continue  # the harness's (an xdist or pytest thread): nothing of the test's
        body += state
        roles = f" ({', '.join(role)})" if role else ""
        blocks.setdefault((roles, tuple(body)), []).append(_name(names, ident))
    lines = ["Threads (most recent call last):"]
    for shown, ((roles, block), members) in enumerate(blocks.items()):
        if shown == _MAX_THREAD_BLOCKS:
            rest = [name for group in list(blocks.values())[shown:] for name in group]
            lines.append(f"  ... and {len(rest)} more threads, not shown: {_some(rest)}")
            break
        if len(members) == 1:
            lines.append(f"  Thread {members[0]}{roles}:")
        else:
            lines.append(f"  {len(members)} threads alike, {_some(members)}{roles}:")
        lines.extend("    " + line for line in block)
    return "\n".join(lines) if len(lines) > 1 else ""


# A report stays readable, however many threads a test left: alike threads share a block,
# and past this many blocks only names are given.
_MAX_THREAD_BLOCKS = 40


def _some(names: list[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 7 more``."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _name(names: dict[int | None, threading.Thread], ident: int) -> str:
    thread = names.get(ident)
    return repr(thread.name) if thread is not None else f"<thread {ident}>"


def _copy(read: Any) -> Any:
    """Read a table another thread may be changing, without its lock (see the invariant)."""
    for _ in range(10):
        with contextlib.suppress(RuntimeError):
            return read()
    return None


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


# -- tasks -----------------------------------------------------------------------------


def _pending_tasks() -> dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]]:
    """Pending tasks of every event loop of the process.

    A loop running in another thread cannot be asked for from here, and asyncio keeps no
    public list of loops; it keeps a registry of every task, though (see :func:`_all_tasks`).
    """
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]] = {}
    for task in _all_tasks():
        with contextlib.suppress(Exception):
            if not task.done():
                loops.setdefault(task.get_loop(), []).append(task)
    return loops


# asyncio's own registries of every task, all threads' (what asyncio.all_tasks filters).
_TASK_REGISTRIES = ("_all_tasks", "_scheduled_tasks", "_eager_tasks")


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Every task of the process.

    Up to Python 3.13 asyncio registers every task in module-level sets, which are cheap to
    read. From 3.14 its C tasks live in per-thread lists that can only be asked for one
    loop at a time, and the loops are not listed anywhere: the collector's list of live
    objects is walked instead, which costs a few tenths of a second in a process of
    millions of objects.
    """
    if _PYTHON < (3, 14):
        found: list[asyncio.Task[Any]] = []
        for name in _TASK_REGISTRIES:
            registry = getattr(asyncio.tasks, name, None)
            if registry is not None:
                found.extend(_copy(lambda registry=registry: list(registry)) or ())
        return found
    return [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task)]


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
    loops = _running_loops(targets)
    # Waited for: the threads the test started, and a thread whose loop we end (the
    # body's, under the thread backend), so that the teardown finds the loop stopped.
    waited = {t.ident for t in started} | set(loops)
    joined = [t for t in threading.enumerate() if t.ident in targets and t.ident in waited]
    # The threads die of HangError; that is our doing, not news for the thread-exception
    # hooks (pytest's would blame whatever test runs when it lands, maybe much later).
    for thread in joined:
        _quiet(thread)
    if _async_exceptions_safe():
        for ident in targets:
            _raise_in(ident)
        for loop in loops.values():
            # A loop waiting in select() runs no Python code that HangError could land in.
            with contextlib.suppress(Exception):
                loop.call_soon_threadsafe(_wake)
    else:
        for loop in loops.values():
            # No HangError to end the loop's run: stop it, so its thread returns and the
            # item's teardown can close it.
            with contextlib.suppress(Exception):
                loop.call_soon_threadsafe(loop.stop)
    deadline = time.monotonic() + 0.5
    for thread in joined:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            _locks._real_join(thread, remaining)
    # What is still alive was reported with this test: to every later test it is a thread
    # an earlier test left running (labelled so; no wait of theirs counts on it).
    _locks.note_left_behind(t for t in threading.enumerate() if t.ident in targets)
    return [thread for thread in started if thread.is_alive()]


def _quiet(thread: threading.Thread) -> None:
    """Keep the thread's HangError from the thread-exception hooks; others pass on.

    ``Thread`` hands an exception that ends its ``run`` to its own ``_invoke_excepthook``,
    which calls ``threading.excepthook``. That global hook is replaced and put back by
    others (pytest, the checks, the lock tracking) as tests come and go, and HangError may
    land long after this test; the thread's own attribute stays ours.
    """
    invoke = getattr(thread, "_invoke_excepthook", None)  # private; CPython 3.8+
    if invoke is None or getattr(invoke, "concur_quiet", False):
        return

    def quiet(thread: threading.Thread) -> None:
        if isinstance(sys.exc_info()[1], HangError):
            return
        invoke(thread)

    quiet.concur_quiet = True  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        setattr(thread, "_invoke_excepthook", quiet)  # noqa: B010 - typeshed lacks it


def _running_loops(idents: list[int]) -> dict[int, asyncio.AbstractEventLoop]:
    """The event loop running in each of these threads that runs one, from its stack."""
    frames = sys._current_frames()
    loops: dict[int, asyncio.AbstractEventLoop] = {}
    for ident in idents:
        frame = frames.get(ident)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "run_forever" and code.co_filename.endswith(_LOOP_FILE):
                loop = frame.f_locals.get("self")
                if isinstance(loop, asyncio.AbstractEventLoop):
                    loops[ident] = loop
                break
            frame = frame.f_back
    return loops


_LOOP_FILE = os.path.join("asyncio", "base_events.py")


def _wake() -> None:
    """A callback that does nothing: the loop's thread runs Python code again."""


def _async_exceptions_safe() -> bool:
    """Whether HangError may be sent to threads that are maybe blocked in C code.

    On Python 3.11, while an exception sent to a thread is pending (its thread blocked in
    C code, perhaps for ever), every thread that is traced (coverage, a debugger) spins
    on the first Python call it makes: the interpreter would hang. Other versions are not
    affected.
    """
    if _PYTHON != (3, 11):
        return True
    return sys.gettrace() is None and threading.gettrace() is None


def _raise_in(ident: int) -> None:
    """Ask a thread to raise HangError when it next runs Python code (CPython only)."""
    if sys.implementation.name != "cpython":  # pragma: no cover - other interpreters
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(HangError)
        )
