"""What a fixture's value reaches: the walk behind the threads check's ownership by object.

A thread or pool started while a method of an object a live fixture owns is on the starting
stack belongs to that fixture (see ``threads.owner_of``). An object is the fixture's when it
is the fixture's value or reachable from it in a few steps: attributes, slots, containers,
bound methods. :func:`_reaches` walks that graph breadth first, reading what an object holds
without running its code (no properties, no ``__getattr__``), within a bound on the objects
looked at per start (:data:`_BUDGET`), so that a start costs little however big the graph.

A leaf of the checks: it knows nothing of lineages or recordings.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import types
import weakref
from typing import Any

import pytest

# Steps from a fixture's value, and objects looked at in all, per start: a bound on the cost
# of a start while fixtures are live (a big graph is cut short, and its far objects are then
# taken for the body's: a report, never a silenced leak).
_DEPTH = 3
_BUDGET = 1000
_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    type(None),
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.FrameType,
)


# A test function's code, as (file, first line): plain data, a watch may be pickled.
Body = tuple[str, int]


def body_of(item: pytest.Item) -> Body | None:
    """The code of ``item``'s test function, where the starting stack stops being its own."""
    function = getattr(item, "obj", None)
    code = getattr(inspect.unwrap(function), "__code__", None) if callable(function) else None
    return None if code is None else (code.co_filename, code.co_firstlineno)


def _reaches(roots: list[object], targets: dict[int, object], budget: list[int]) -> bool:
    seen: set[int] = set()
    layer = roots
    for _ in range(_DEPTH + 1):
        below: list[object] = []
        for thing in layer:
            budget[0] -= 1  # every object looked at counts, a leaf too
            if budget[0] < 0:
                return False
            if isinstance(thing, _LEAVES) or id(thing) in seen:
                continue
            if id(thing) in targets:
                return True
            seen.add(id(thing))
            below.extend(_parts(thing))
        layer = below
    return False


def _parts(thing: object) -> list[object]:
    """What ``thing`` holds, read without running its code (no properties, no __getattr__)."""
    cls: Any = type(thing)  # (typed as object's type, mypy takes it for unhashable)
    try:
        if isinstance(thing, dict):
            return list(itertools.islice(thing.values(), _BUDGET))
        if isinstance(thing, (list, tuple, set, frozenset, collections.deque)):
            return list(itertools.islice(thing, _BUDGET))
        if isinstance(thing, types.MethodType):
            return [thing.__self__]
        if isinstance(thing, weakref.ref):
            return [thing()]
        parts: list[object] = []
        if cls.__dictoffset__:  # instances have a __dict__
            mapping = object.__getattribute__(thing, "__dict__")
            parts.extend(itertools.islice(mapping.values(), _BUDGET))
        for slot in _slots(cls):
            with contextlib.suppress(AttributeError):  # an empty slot
                parts.append(object.__getattribute__(thing, slot))
        return parts
    except (AttributeError, TypeError, RuntimeError):
        # No __dict__ after all, or one changed while we read it (another thread).
        return []


@functools.lru_cache(maxsize=512)
def _slots(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for klass in cls.__mro__:
        declared = klass.__dict__.get("__slots__", ())
        names.extend([declared] if isinstance(declared, str) else declared)
    return tuple(name for name in names if name not in ("__dict__", "__weakref__"))


def _bound_to(target: object) -> tuple[object, ...]:
    """The object a thread's target is a method of (through functools.partial), if any."""
    target = getattr(target, "func", target)  # functools.partial
    owner = getattr(target, "__self__", None)
    return () if owner is None or isinstance(owner, types.ModuleType) else (owner,)
