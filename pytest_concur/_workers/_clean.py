"""``expect_clean()``: a block that fails when its code leaves a thread, task or process.

``expect_clean()`` records, with the leak checks' own recordings (threads, tasks,
processes), what the code in its block starts, and judges it with their own verdicts when
the block ends, after the grace period (``concur_leak_grace``); ``async with`` waits for
that period without blocking the loop. It honours the test's allow-list, not
``checks_off`` (the block asked to be checked). What it judged it claims (``_claims``), so
the per-test checks do not report it again.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur._checks import _allow
from pytest_concur._checks._where import Site, here
from pytest_concur._workers._claims import claim

if TYPE_CHECKING:
    from pytest_concur._checks._leak import LeakWatch, Recording


@final
class CleanBlock:
    """The block of ``concur.expect_clean()``: ``with`` in sync code, ``async with`` in async."""

    def __init__(self, allow: _allow.Allow, grace: float) -> None:
        self._allow = allow
        self._grace = grace
        self._site: Site | None = None
        self._watches: list[tuple[Any, LeakWatch, Recording]] = []

    def __enter__(self) -> None:
        self._begin()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        self._end(exc)

    async def __aenter__(self) -> None:
        self._begin()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import asyncio

        # Give what the block started the grace period to end, without blocking the loop
        # (the verdicts would wait with time.sleep): then they judge at once.
        deadline = time.monotonic() + self._grace
        delay = 0.001
        while any(module.busy(state) for module, _, state in self._watches):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        for _, watch, _ in self._watches:
            watch.grace = 0.0
        self._end(exc)

    def _begin(self) -> None:
        from pytest_concur._checks import processes, tasks, threads
        from pytest_concur._checks._leak import Owner

        if self._site is not None:
            raise RuntimeError("an expect_clean() block cannot be entered twice")
        self._site = here()
        owner = Owner(
            subject="the block", who="the code in the block", until="before the block ends"
        )
        for module, watch_type in (
            (threads, threads.ThreadsWatch),
            (tasks, tasks.TasksWatch),
            (processes, processes.ProcessesWatch),
        ):
            watch = watch_type(self._allow, self._grace, owner)
            try:
                state = watch.record()
            except BaseException:
                self._close_recordings()
                raise
            self._watches.append((module, watch, state))

    def _close_recordings(self) -> None:
        watches, self._watches = self._watches, []
        for _, _, state in reversed(watches):
            state.close()

    def _end(self, exc: BaseException | None) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        problems: list[str] = []
        watches = list(self._watches)
        try:
            for module, watch, state in reversed(watches):
                try:
                    problem = watch.verdict(state)
                except Exception as error:  # a broken verdict must not hide the block's outcome
                    problem = f"check {module.NAME} failed: {error!r}"
                if problem:
                    problems.append(problem)
        finally:
            self._close_recordings()
            # Judged here: the test's own checks do not report the same things again.
            for module, _, state in watches:
                claim(module.recorded(state))
        if not problems:
            return
        text = (
            f"pytest-concur: expect_clean() at {self._site}: the code in the block left "
            "something behind\n\n" + "\n\n".join(reversed(problems))
        )
        if exc is None:
            pytest.fail(text, pytrace=False)
        if sys.version_info >= (3, 11):
            exc.add_note(f"\n{text}")
        else:  # pragma: no cover - exercised by the py310 tox env
            raise pytest.fail.Exception(f"{exc!r}\n\n{text}") from exc
