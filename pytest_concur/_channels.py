"""Waits on channels the deadlock rules can see: ``queue.SimpleQueue``, multiprocessing pipes.

A lock or an event is waited on in Python code we replaced (see :mod:`_locks`), so a
thread blocked on one is known to be blocked. Two other waits are common in concurrent
code and were invisible: ``queue.SimpleQueue.get`` (a C type, the work queue of every
``ThreadPoolExecutor``) and ``Connection.recv`` on a multiprocessing pipe (under
``multiprocessing.Queue.get`` too). While a body is tracked:

* ``queue.SimpleQueue`` made by the body is a subclass whose blocking ``get`` waits in
  slices, as a tracked lock does: blocked while the queue is empty. Only a thread can put
  into it, so the rule "every thread of the test is blocked" applies unchanged.
* ``Connection.recv``, ``recv_bytes`` and ``recv_bytes_into`` wait in slices of ``poll``.
  The other end may be in a child process, so the wait counts as blocked only while no
  data has come *and* every child of the test process is provably idle: exited, or every
  thread of it blocked reading a pipe or a Unix socket (Linux: ``/proc/<pid>/task/*``,
  ``wchan``). A child doing anything else (running, sleeping, waiting on a lock or on the
  network) might still write: no verdict, and the deadline's report says what each side
  waits on. Under ``forkserver`` the children are the server's: its own wait for requests
  does not count, its children do. Elsewhere than Linux no child is provably idle.

Waits with a timeout, non-blocking calls, waits of threads that only wait for the body and
waits begun after a verdict (a pool's idle worker asking for work as the test unwinds) go
straight to the originals.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
from collections.abc import Callable
from typing import Any, final

from pytest_concur import _lock_diagnosis, _locks

# What a thread blocked reading a pipe or a Unix socket shows in /proc/.../wchan (newer
# kernels say anon_pipe_read: any name ending in pipe_read is one).
_READ_WAITS = frozenset(
    {"pipe_read", "pipe_wait", "unix_stream_read_generic", "unix_stream_data_wait"}
)
_RECEIVERS = ("recv", "recv_bytes", "recv_bytes_into")


@final
class TrackedSimpleQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """A ``queue.SimpleQueue`` whose blocking ``get`` the deadlock rules can see."""

    def __init__(self) -> None:
        super().__init__()
        self._made_at = _lock_diagnosis._capture_site(sys._getframe(1))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        tracker = _locks.TRACKER
        if (
            tracker is None
            or not block
            or timeout is not None
            or _locks._get_ident() in tracker.passive_threads
            # After a verdict: a pool's idle worker asking for work is not part of the
            # deadlock, and a DeadlockError would kill it with a logged "Exception in worker".
            or tracker.decided()
        ):
            return super().get(block, timeout)
        box: list[Any] = []
        get = super().get

        def attempt(slice_: float) -> bool:
            try:
                box.append(get(timeout=slice_) if slice_ > 0 else get(block=False))
            except queue.Empty:
                return False
            return True

        site = _lock_diagnosis._format_site(self._made_at)
        wait = _locks.Wait(
            kind="channel", blocked=self.empty, what=f"SimpleQueue (get) created at {site}"
        )
        try:
            tracker.wait_for(wait, attempt)
        except BaseException:
            if box:  # taken as the verdict came: not the test's to lose
                super().put(box[0])
            raise
        return box[0]


def _tracked_receiver(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def receive(self: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        tracker = _locks.TRACKER
        if (
            tracker is None
            or _locks._get_ident() in tracker.passive_threads
            or os.getpid() != tracker.pid  # a forked child: its parent may write
            or tracker.decided()  # begun after the verdict: not part of the deadlock
            or _ready(self, 0)
            or _machinery(sys._getframe(1))
        ):
            return original(self, *args, **kwargs)

        def blocked() -> bool:
            return not _ready(self, 0) and children_idle()

        wait = _locks.Wait(kind="channel", blocked=blocked, what=_describe(self, sys._getframe(1)))
        tracker.wait_for(wait, lambda slice_: _ready(self, slice_))
        return original(self, *args, **kwargs)

    receive.concur_original = original  # type: ignore[attr-defined]
    return receive


def _machinery(caller: Any) -> bool:
    """Whether multiprocessing itself receives (a start's handshake with the forkserver,
    the resource tracker): its peers are servers we do not judge. ``Queue.get`` is the
    user's wait."""
    filename = caller.f_code.co_filename if caller is not None else ""
    return _MULTIPROCESSING in filename and not filename.endswith(_QUEUES)


_MULTIPROCESSING = os.path.join("multiprocessing", "")


def _ready(connection: Any, timeout: float) -> bool:
    try:
        return bool(connection.poll(timeout))
    except (OSError, ValueError):  # closed: the original call says so
        return True


def _describe(connection: Any, caller: Any) -> str:
    idle = "and every child process idle (exited, or blocked reading)"
    code = caller.f_code if caller is not None else None
    if code is not None and code.co_filename.endswith(_QUEUES) and code.co_name == "get":
        return f"multiprocessing Queue (get): nothing in it, {idle}"
    fd = getattr(connection, "_handle", "?")
    return f"multiprocessing {type(connection).__name__} (recv, fd {fd}): no data, {idle}"


_QUEUES = os.path.join("multiprocessing", "queues.py")


def patches() -> list[tuple[Any, str, Any]]:
    """The (owner, name, replacement) swaps for a tracked body; multiprocessing's if imported.

    Asked at every body's start: the receivers' wrappers are made once, when
    multiprocessing is first seen.
    """
    global _RECEIVER_SWAPS
    if not _RECEIVER_SWAPS:
        connection = sys.modules.get("multiprocessing.connection")
        if connection is None and "multiprocessing" in sys.modules:
            # multiprocessing.Pipe() and Queue() import it on first use, maybe in the body.
            import multiprocessing.connection as connection
        if connection is not None:
            base = connection._ConnectionBase
            # (An abandoned body's wrappers may still be in place: wrap what they wrap.)
            _RECEIVER_SWAPS = [
                (base, name, _tracked_receiver(getattr(method, "concur_original", method)))
                for name in _RECEIVERS
                if (method := base.__dict__.get(name)) is not None
            ]
    return [(queue, "SimpleQueue", TrackedSimpleQueue), *_RECEIVER_SWAPS]


_RECEIVER_SWAPS: list[tuple[Any, str, Any]] = []


# -- children ------------------------------------------------------------------------------


def children_idle() -> bool:
    """Whether every child process of this one is provably idle (see the module)."""
    pids = _children(os.getpid())
    if pids is None:
        return False
    server = _forkserver_pid()
    for pid in pids:
        if pid == server:
            grandchildren = _children(pid)
            if grandchildren is None or not all(_idle(child) for child in grandchildren):
                return False
        elif not _idle(pid):
            return False
    return True


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` (Linux), or ``None`` where it cannot be told."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found.extend(int(child) for child in file.read().split())
    except FileNotFoundError:
        return []  # gone: no children either
    except (OSError, ValueError):
        return None
    return found


def _idle(pid: int) -> bool:
    """Whether every thread of process ``pid`` has exited or is blocked reading."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                continue
            with open(f"{base}/wchan") as file:
                wchan = file.read().strip()
        except FileNotFoundError:
            continue  # the thread just ended
        except (OSError, IndexError):
            return False
        if state != "S" or not (wchan in _READ_WAITS or wchan.endswith("pipe_read")):
            return False
    return True


def _forkserver_pid() -> int | None:
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None
