"""Schedule exploration with exact replay (see docs/explore.md): names handed on."""

from __future__ import annotations

from pytest_concur._explore._run import (
    WORKERINPUT_SEED,
    add_section,
    exploring,
    header,
    prepare,
    run,
    session,
    summary,
)

__all__ = [
    "WORKERINPUT_SEED",
    "add_section",
    "exploring",
    "header",
    "prepare",
    "run",
    "session",
    "summary",
]
