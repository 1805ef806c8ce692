"""What the leak checks leave alone: the ``concur_allow`` marker and the ``concur_*`` ini keys.

The ini keys are declared in ``plugin.py`` (importing this module there would import the
backends, which ``pytest --version`` must not pay for); their names are the constants below.

Parsed once: the ini keys per session (a bad value is a usage error at session start), the
markers per item (a bad marker fails that test with a message naming the fix). Markers on
the module, the class and the function add up, on top of the ini keys.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import final

import pytest

from pytest_concur._checks._where import Site

MARKER = "concur_allow"
# Check names, as ``checks_off`` and ``concur_checks_off`` take them.
CHECKS = ("threads", "tasks", "processes", "blocked_loop", "futures", "callbacks")
# Keyword -> ini key of the patterns.
PATTERN_KEYS = {
    "threads": "concur_allow_threads",
    "tasks": "concur_allow_tasks",
    "processes": "concur_allow_processes",
    "started_by": "concur_allow_started_by",
}
CHECKS_OFF_INI = "concur_checks_off"
GRACE_INI = "concur_leak_grace"
DEFAULT_GRACE = 1.0

_INI_CACHE = pytest.StashKey["Allow"]()
_ITEM_CACHE = pytest.StashKey["Allow"]()
_MARKS_CACHE = pytest.StashKey[dict[str, tuple[pytest.Mark, ...]]]()


@final
@dataclasses.dataclass(frozen=True)
class Allow:
    """Patterns of things a test may leave behind, and the checks turned off for it."""

    threads: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    processes: tuple[str, ...] = ()
    started_by: tuple[str, ...] = ()
    checks_off: frozenset[str] = frozenset()

    def allows(self, kind: str, names: Iterable[str], site: Site) -> bool:
        """Whether a thing of ``kind`` with these names, started at ``site``, may stay."""
        patterns: tuple[str, ...] = getattr(self, kind)
        if patterns and _matches(patterns, names):
            return True
        return bool(self.started_by) and _matches(self.started_by, site.functions())

    def merged(self, other: Allow) -> Allow:
        return Allow(
            threads=self.threads + other.threads,
            tasks=self.tasks + other.tasks,
            processes=self.processes + other.processes,
            started_by=self.started_by + other.started_by,
            checks_off=self.checks_off | other.checks_off,
        )


def _matches(patterns: tuple[str, ...], names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def grace(config: pytest.Config) -> float:
    """The ``concur_leak_grace`` ini key, in seconds; a usage error if it is not a number."""
    value = config.getini(GRACE_INI)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise pytest.UsageError(
            f"pytest-concur: {GRACE_INI} = {value!r} is not a number of seconds; "
            f"write e.g. {GRACE_INI} = {DEFAULT_GRACE}"
        )
    return seconds


def from_ini(config: pytest.Config) -> Allow:
    """The session's allow-list from the ini keys; a usage error on an unknown check name."""
    cached = config.stash.get(_INI_CACHE, None)
    if cached is not None:
        return cached
    off = [str(name) for name in config.getini(CHECKS_OFF_INI)]
    unknown = [name for name in off if name not in CHECKS]
    if unknown:
        raise pytest.UsageError(
            f"pytest-concur: unknown check {unknown[0]!r} in {CHECKS_OFF_INI}; "
            f"the checks are: {', '.join(CHECKS)}."
        )
    patterns = {
        kind: tuple(str(p) for p in config.getini(key)) for kind, key in PATTERN_KEYS.items()
    }
    allow = config.stash[_INI_CACHE] = _make(patterns, off)
    return allow


def for_item(item: pytest.Item | pytest.Collector) -> Allow:
    """The ini keys plus every ``concur_allow`` marker on the item; a bad marker fails it.

    A collector (a module, a class) stands for the fixtures of its scope.
    """
    cached = item.stash.get(_ITEM_CACHE, None)
    if cached is not None:
        return cached
    allow = from_ini(item.config)
    for mark in marks(item, MARKER):
        allow = allow.merged(_parse(mark, item.name))
    item.stash[_ITEM_CACHE] = allow
    return allow


def marks(node: pytest.Item | pytest.Collector, name: str) -> tuple[pytest.Mark, ...]:
    """``node.iter_markers(name)``, closest first; what its parents have is cached on them.

    Asked before each body: walking the whole chain of nodes each time costs more than
    the checks' own work on a test that starts nothing.
    """
    own = tuple(mark for mark in node.own_markers if mark.name == name)
    parent = node.parent
    if parent is None:
        return own
    cache = parent.stash.get(_MARKS_CACHE, None)
    if cache is None:
        cache = parent.stash[_MARKS_CACHE] = {}
    inherited = cache.get(name)
    if inherited is None:
        inherited = cache[name] = marks(parent, name)
    return own + inherited


def _parse(mark: pytest.Mark, where: str) -> Allow:
    keywords = (*PATTERN_KEYS, "checks_off")
    example = '@pytest.mark.concur_allow(threads=["metrics-*"], checks_off=["processes"])'
    if mark.args:
        _bad(
            where,
            f"takes keyword arguments only, got {mark.args!r}. Write e.g. {example}",
        )
    values: dict[str, tuple[str, ...]] = {}
    for key, value in mark.kwargs.items():
        if key not in keywords:
            _bad(where, f"got an unknown keyword {key!r}; the keywords are: {', '.join(keywords)}.")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, str) for v in value
        ):
            _bad(
                where,
                f"{key}= takes a list of strings, got {value!r}. Write e.g. {example}",
            )
        values[key] = tuple(value)
    if not values:
        _bad(where, f"needs at least one keyword. Write e.g. {example}")
    off = values.pop("checks_off", ())
    unknown = [name for name in off if name not in CHECKS]
    if unknown:
        _bad(
            where,
            f"checks_off names an unknown check {unknown[0]!r}; the checks are: "
            f"{', '.join(CHECKS)}.",
        )
    return _make(values, off)


def _make(patterns: dict[str, tuple[str, ...]], off: Iterable[str]) -> Allow:
    return Allow(
        threads=patterns.get("threads", ()),
        tasks=patterns.get("tasks", ()),
        processes=patterns.get("processes", ()),
        started_by=patterns.get("started_by", ()),
        checks_off=frozenset(off),
    )


def _bad(where: str, problem: str) -> None:
    pytest.fail(f"In {where}: @pytest.mark.{MARKER} {problem}", pytrace=False)
