"""Threads no test answers for, by what they are: the threads check's exemptions by kind.

- workers of a process-wide cache of idle threads (trio's, anyio's), kept by design for
  whoever needs one next (:data:`PROCESS_WIDE_CACHES`);
- threads of multiprocessing pools and queues and of process pools, which live as long as
  their pool: the ``processes`` check reports the pool;
- workers of a ``ThreadPoolExecutor`` (:func:`_executor_of`: judged with their executor),
  and of the running loop's default executor, which the loop's owner shuts down.

A leaf of the checks: each answer is read from the thread or executor alone.
"""

from __future__ import annotations

import fnmatch
import sys
import threading
import weakref
from typing import Any


def _is_loop_executor(executor: object) -> bool:
    # asyncio names the workers of every loop's default executor so (3.9+); the loop's
    # owner shuts it down when it closes the loop.
    return str(getattr(executor, "_thread_name_prefix", "")).startswith("asyncio")


# Idle worker threads that libraries keep process-wide, by design, for whoever needs one
# next (like asyncio's default executor, which its loop owns): whichever test first made
# the library start one is not at fault. As ``module.qualname`` of what the thread runs.
PROCESS_WIDE_CACHES = (
    # trio.to_thread.run_sync (and anyio's trio backend): idle for 10 s, then exits.
    "trio._core._thread_cache.*",
    # anyio.to_thread.run_sync on asyncio: idle for 10 s, stopped with the event loop.
    "anyio._backends._asyncio.WorkerThread.*",
)


def _process_wide(thread: threading.Thread) -> bool:
    runs: Any = getattr(thread, "_target", None) or type(thread).run
    runs = getattr(runs, "__func__", runs)
    name = f"{getattr(runs, '__module__', '')}.{getattr(runs, '__qualname__', '')}"
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in PROCESS_WIDE_CACHES)


def _belongs_to_processes(thread: threading.Thread) -> bool:
    # Handler threads of multiprocessing.Pool, feeder threads of multiprocessing queues and
    # ProcessPoolExecutor's manager live as long as their pool: the processes check reports
    # the pool.
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or type(thread).__module__
    return module.startswith(("multiprocessing", "concurrent.futures.process"))


def _executor_of(thread: threading.Thread) -> Any:
    """The ThreadPoolExecutor a worker thread serves, if it is one and it still exists."""
    target = getattr(thread, "_target", None)
    if getattr(target, "__module__", None) != "concurrent.futures.thread":
        return None
    args = getattr(thread, "_args", ())
    reference = args[0] if args else None
    return reference() if isinstance(reference, weakref.ref) else None


def _loop_executor() -> object:
    """The default executor of the loop running in this thread: its owner closes it."""
    if "asyncio" not in sys.modules:
        return None
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return getattr(loop, "_default_executor", None)
