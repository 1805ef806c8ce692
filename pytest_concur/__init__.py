"""pytest-concur: run one test body under threads, processes and asyncio.

The public API of the package is what this module exports; everything in modules whose name
starts with an underscore is private.
"""

from __future__ import annotations

from pytest_concur._backends.base import Backend, BodyCall, Check, Runner, Watch
from pytest_concur._locks import DeadlockError, HangError
from pytest_concur._workers import Concur, Worker, WorkerProcessTraceback, WorkerTimeoutError

__version__ = "0.1.0.dev0"

__all__ = [
    "Backend",
    "BodyCall",
    "Check",
    "Concur",
    "DeadlockError",
    "HangError",
    "Runner",
    "Watch",
    "Worker",
    "WorkerProcessTraceback",
    "WorkerTimeoutError",
    "__version__",
]
