"""Claims: the threads, tasks and processes the ``concur`` fixture reports itself.

No double reports. The thread, task or process of each worker is *claimed* when it starts
(:func:`claimed`): the leak checks (per test, per fixture, and ``expect_clean()``) leave
claimed things to this package. ``expect_clean()`` claims what it judged, so the per-test
checks do not report it again.

The leak checks look this module up in ``sys.modules`` instead of importing it: as long as
it was never imported, nothing is claimed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

from pytest_concur import _primitives

_claims_lock = _primitives.allocate_lock()
_claims: weakref.WeakSet[Any] = weakref.WeakSet()


def claim(things: Iterable[object]) -> None:
    """Take over reporting ``things``: the leak checks leave them alone."""
    with _claims_lock:
        for thing in things:
            # Not weakly referenceable: never claimed, the leak checks keep it.
            with contextlib.suppress(TypeError):
                _claims.add(thing)


def claimed(thing: object) -> bool:
    """Whether this module reports ``thing`` (a worker's thread, task or process) itself."""
    with _claims_lock:
        try:
            return thing in _claims
        except TypeError:
            return False
