"""The contract between pytest-concur and a backend.

A backend is a concurrency model a test body can run under. Its lifecycle for one test item:

1. **start**: when the item's body is about to run (its fixtures are set up by then),
   pytest-concur calls :meth:`Backend.start` and gets a :class:`Runner` for this item.
2. **run**: :meth:`Runner.run` runs the body, given as a :class:`BodyCall`, under the
   backend's model and returns when it is over. It reports the body's outcome by returning
   (passed) or raising the body's exception (failed, or skipped/xfailed through pytest's
   outcome exceptions), so pytest's own reporting applies unchanged.
3. **close**: :meth:`Runner.close` is called at the end of the item's teardown, after its
   function-scoped fixtures are finalized, whatever happened before (even when ``start``
   or ``run`` raised). It releases what the runner holds.

A backend object itself is shared by all items of the session and should keep per-item
state in its runners.

A backend with an event loop of its own (trio, say) may also run the item's ``async def``
fixtures, so that they and the body share that loop. It says so with a true class
attribute ``runs_fixtures``, and its runners implement :class:`FixtureRunner` as well. Then
the lifecycle changes in one place: **start** comes at the beginning of the item's setup,
before its first fixture, and the same runner runs its function-scoped async fixtures, then
its body. An async fixture of a wider scope gets a runner of its own from
:meth:`Backend.start` (given the first item that asks for it), closed when the fixture is
torn down. Sync fixtures run in pytest's thread, as always.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Protocol, final, runtime_checkable

import pytest

# Running a body between its watches is a leaf module of its own, which stress mode and the
# process child import too, without importing the contract.
from pytest_concur._watching import run_watched, run_watched_async


@runtime_checkable
class Runner(Protocol):
    """Runs one item's body under a backend; made by :meth:`Backend.start`."""

    def run(self, call: BodyCall) -> None:
        """Run the test body and return when it is over; raise what the body raised."""

    def close(self) -> None:
        """Release what this runner holds; called once, at the end of the item's teardown."""


@runtime_checkable
class FixtureRunner(Runner, Protocol):
    """A :class:`Runner` that also runs async fixtures: of a backend with ``runs_fixtures``.

    Both methods are called from pytest's thread, during setup, with the fixture function
    (bound, for a fixture of a test class) and the values of the fixtures and parameters it
    takes. An exception they raise is the fixture's error, as pytest reports it.
    """

    def run_fixture(
        self, function: Callable[..., Awaitable[Any]], kwargs: Mapping[str, Any]
    ) -> Any:
        """Await an ``async def`` fixture to completion; return its value."""

    def run_asyncgen_fixture(
        self, function: Callable[..., AsyncIterator[Any]], kwargs: Mapping[str, Any]
    ) -> Iterator[Any]:
        """Run an async generator fixture as a generator: yield its one value; on resumption,
        finish it (its teardown).

        Keep its setup and its teardown in one task, if the loop needs that (a trio nursery
        or cancel scope opened before the ``yield`` is closed after it).
        """


@runtime_checkable
class Backend(Protocol):
    """A concurrency model that test bodies can be run under.

    ``name`` is what users write in ``@pytest.mark.backend(...)`` and ``--concur-backends``
    and what appears in test ids (``test_x[name]``); it must be a valid Python identifier.
    ``description`` is one line shown in ``pytest --markers``. An optional class attribute
    ``runs_fixtures = True`` asks for the item's async fixtures too (see
    :class:`FixtureRunner`).
    """

    name: str
    description: str

    def start(self, item: pytest.Item) -> Runner:
        """Prepare to run ``item``'s body and return the runner that will do it."""


@final
@dataclasses.dataclass(frozen=True)
class BodyCall:
    """One call of a test body, as a backend receives it.

    ``function`` is the test function (bound, for methods) and ``kwargs`` the fixture values
    and parameters it takes. ``run_coroutine`` runs a coroutine to completion on the item's
    own event loop: the loop that the item's function-scoped async fixtures ran on, created
    for this item and closed after its teardown. It may be called from any one thread at a
    time. ``workers`` is how many copies of the body run at once (stress mode): calling
    the ``BodyCall`` runs them all, each with its own ``worker_index``, and returns when
    the last has finished. Calling it also calls the ``pytest_concur_copy_setup`` and
    ``pytest_concur_copy_teardown`` hooks around each copy (a single one included), where
    that copy runs.
    """

    item: pytest.Item
    function: Callable[..., Any]
    kwargs: Mapping[str, Any]
    run_coroutine: Callable[[Coroutine[Any, Any, Any]], Any]
    # The checks watching this body (see pytest_concur.Check); run around it wherever it runs.
    watches: Sequence[Watch] = ()
    # How many copies of the body run at once (see pytest_concur._stress).
    workers: int = 1

    @property
    def is_async(self) -> bool:
        """Whether the body is an ``async def`` function."""
        return inspect.iscoroutinefunction(self.function)

    def __call__(self) -> None:
        """Run the body in the calling thread; an async body runs on the item's loop."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.is_async:
            self.run_coroutine(self.call_async())
        elif self.workers > 1:
            from pytest_concur._stress import run_threads

            run_threads(self)
        else:
            run_watched(self.watches, self.item.nodeid, self._one_copy(), self.kwargs)

    async def call_async(self) -> None:
        """Run the body inside the running event loop: awaited if async, else called."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.workers > 1:
            from pytest_concur._stress import run_tasks

            await run_tasks(self)
        elif self.is_async:
            await run_watched_async(self.watches, self._one_copy(), self.kwargs)
        else:
            run_watched(self.watches, self.item.nodeid, self._one_copy(), self.kwargs)

    def _one_copy(self) -> Callable[..., Any]:
        """The body as the only copy: with the copy hooks around it, if there are any."""
        from pytest_concur._stress import with_copy_hooks

        return with_copy_hooks(self.item, 0, 1, self.function)


@runtime_checkable
class Watch(Protocol):
    """One check watching one run of a body; made by :meth:`Check.watch`.

    ``begin`` and ``end`` are called where the body runs (in the backend's thread, inside its
    event loop, in its child process), right before and right after it, so a watch sees
    what the body sees. Under the ``spawn`` and ``forkserver`` start methods a watch is
    pickled to reach the child: keep it plain data plus methods.
    """

    def begin(self) -> None:
        """Right before the body runs."""

    def end(self, failed: bool) -> str | None:
        """Right after the body, whether it failed or not: a report of what is wrong, or None.

        A report fails a body that passed; for a body that failed, it is added to the
        failure. Clean up what can be cleaned, so the next test starts clean.
        """


@runtime_checkable
class Check(Protocol):
    """Something pytest-concur verifies about every body that runs under a backend.

    ``name`` identifies the check in options and markers; ``description`` is one line for
    people. :meth:`watch` is called in pytest's own thread before each body; it returns the
    :class:`Watch` for that run, or ``None`` when the check does not apply to the item.
    """

    name: str
    description: str

    def watch(self, item: pytest.Item) -> Watch | None:
        """The watch for one run of ``item``'s body, or ``None`` to skip it."""
