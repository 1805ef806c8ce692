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
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, final, runtime_checkable

import pytest


@runtime_checkable
class Runner(Protocol):
    """Runs one item's body under a backend; made by :meth:`Backend.start`."""

    def run(self, call: BodyCall) -> None:
        """Run the test body and return when it is over; raise what the body raised."""

    def close(self) -> None:
        """Release what this runner holds; called once, at the end of the item's teardown."""


@runtime_checkable
class Backend(Protocol):
    """A concurrency model that test bodies can be run under.

    ``name`` is what users write in ``@pytest.mark.backend(...)`` and ``--concur-backends``
    and what appears in test ids (``test_x[name]``); it must be a valid Python identifier.
    ``description`` is one line shown in ``pytest --markers``.
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
    time.
    """

    item: pytest.Item
    function: Callable[..., Any]
    kwargs: Mapping[str, Any]
    run_coroutine: Callable[[Coroutine[Any, Any, Any]], Any]

    @property
    def is_async(self) -> bool:
        """Whether the body is an ``async def`` function."""
        return inspect.iscoroutinefunction(self.function)

    def __call__(self) -> None:
        """Run the body in the calling thread; an async body runs on the item's loop."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.is_async:
            self.run_coroutine(self.function(**self.kwargs))
        else:
            check_result(self.item.nodeid, self.function(**self.kwargs))

    async def call_async(self) -> None:
        """Run the body inside the running event loop: awaited if async, else called."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.is_async:
            await self.function(**self.kwargs)
        else:
            check_result(self.item.nodeid, self.function(**self.kwargs))


def check_result(nodeid: str, result: object) -> None:
    """Warn as pytest does when a test body returns something other than ``None``."""
    if result is None:
        return
    if inspect.iscoroutine(result):
        result.close()  # never leave a coroutine unawaited behind us
    warnings.warn(
        pytest.PytestReturnNotNoneWarning(
            f"Test functions should return None, but {nodeid} returned {type(result)!r}.\n"
            "Did you mean to use `assert` instead of `return`?"
        ),
        stacklevel=3,
    )
