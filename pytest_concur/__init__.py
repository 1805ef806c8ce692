"""pytest-concur: run one test body under threads, processes and asyncio.

The public API of the package is what this module exports; everything in modules whose name
starts with an underscore is private.

The names are handed on lazily (PEP 562): importing the package, as the ``pytest11`` entry
point does in every pytest run, imports none of the machinery behind them. Each name is
imported from its module on first access and then kept here, so it is looked up once.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from pytest_concur._backends._child import run_job
    from pytest_concur._backends.base import (
        Backend,
        BodyCall,
        Check,
        FixtureRunner,
        Runner,
        Watch,
    )
    from pytest_concur._backends.jobs import pack_jobs, raise_outcomes
    from pytest_concur._errors import (
        DeadlockError,
        HangError,
        PotentialDeadlockWarning,
        WorkerProcessTraceback,
        WorkerTimeoutError,
    )
    from pytest_concur._workers._concur import Concur
    from pytest_concur._workers._worker import Worker

__version__ = "0.1.0.dev0"

__all__ = [
    "Backend",
    "BodyCall",
    "Check",
    "Concur",
    "DeadlockError",
    "FixtureRunner",
    "HangError",
    "PotentialDeadlockWarning",
    "Runner",
    "Watch",
    "Worker",
    "WorkerProcessTraceback",
    "WorkerTimeoutError",
    "__version__",
    "pack_jobs",
    "raise_outcomes",
    "run_job",
]

# Where each public name lives (the TYPE_CHECKING imports above say the same to type checkers).
_HOMES = {
    "Backend": "pytest_concur._backends.base",
    "BodyCall": "pytest_concur._backends.base",
    "Check": "pytest_concur._backends.base",
    "FixtureRunner": "pytest_concur._backends.base",
    "Runner": "pytest_concur._backends.base",
    "Watch": "pytest_concur._backends.base",
    "pack_jobs": "pytest_concur._backends.jobs",
    "raise_outcomes": "pytest_concur._backends.jobs",
    "run_job": "pytest_concur._backends._child",
    "DeadlockError": "pytest_concur._errors",
    "HangError": "pytest_concur._errors",
    "PotentialDeadlockWarning": "pytest_concur._errors",
    "WorkerProcessTraceback": "pytest_concur._errors",
    "WorkerTimeoutError": "pytest_concur._errors",
    "Concur": "pytest_concur._workers._concur",
    "Worker": "pytest_concur._workers._worker",
}


def __getattr__(name: str) -> typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # next time, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
