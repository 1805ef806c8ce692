"""Which backends a test runs under: the ``backend`` marker, the option and the ini key.

Resolution, in one place (:func:`select`): the closest ``@pytest.mark.backend(...)`` on the
test (function, then class, then module ``pytestmark``) wins; otherwise
``--concur-backends``; otherwise the ``concur_backends`` ini key; otherwise the test is left
alone. The option and the ini key never take a test that another async plugin runs
(pytest-asyncio, anyio, pytest-trio): those stay theirs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn, final

import pytest

from pytest_concur import _claim

if TYPE_CHECKING:
    from pytest_concur._registry import BackendRegistry

MARKER = "backend"
OPTION = "--concur-backends"
INI = "concur_backends"
WORKERS_OPTION = "--concur-workers"
WORKERS_INI = "concur_workers"
EXPLORE_OPTION = "--concur-explore"
EXPLORE_INI = "concur_explore"
# The keywords backend(...) takes.
_KEYWORDS = ("workers", "explore")

# Markers by which other plugins claim an async test, and what to call them in messages.
# marker -> (the plugin that runs tests so marked, its name in the plugin manager)
_OTHER_RUNNERS = {
    "asyncio": ("pytest-asyncio", "asyncio"),
    "anyio": ("anyio", "anyio"),
    "trio": ("pytest-trio", "trio"),
}

_DEFAULT = pytest.StashKey["Selection | None"]()
# Tests --concur-backends left to the plugin that runs them, by that plugin (for the report).
_LEFT_TO_OTHERS = pytest.StashKey[dict[str, int]]()


@final
@dataclasses.dataclass(frozen=True)
class Selection:
    """The backends one test runs under and where that choice came from."""

    names: tuple[str, ...]
    origin: str

    @property
    def explicit(self) -> bool:
        """Whether the test asked for these backends itself, with the marker."""
        return self.origin.startswith("@")


def parse_marker(mark: pytest.Mark) -> tuple[str, ...]:
    """The backend names a ``backend(...)`` marker asks for; ``pytest.fail`` if malformed.

    Its keywords are checked too (see :func:`marker_workers` for their values).
    """
    unknown_keywords = sorted(set(mark.kwargs) - set(_KEYWORDS))
    if unknown_keywords:
        unknown = ", ".join(unknown_keywords)
        import difflib  # only for a typo: not paid by every session

        close = difflib.get_close_matches(unknown_keywords[0], _KEYWORDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        _fail(
            f"@pytest.mark.backend() got unexpected keyword argument(s): {unknown}.{hint} "
            f"It takes backend names as strings and the keyword(s) {', '.join(_KEYWORDS)}: "
            '@pytest.mark.backend("thread", "process", "asyncio", workers=8).'
        )
    marker_workers(mark)
    marker_explore(mark)
    names: list[str] = []
    for arg in mark.args:
        if isinstance(arg, str):
            names.append(arg)
        elif isinstance(arg, (list, tuple)) and all(isinstance(a, str) for a in arg):
            names.extend(arg)
        else:
            _fail(
                f"@pytest.mark.backend() takes backend names as strings, got {arg!r} "
                f"({type(arg).__name__}): write "
                '@pytest.mark.backend("thread", "process", "asyncio").'
            )
    if not names:
        _fail(
            "@pytest.mark.backend() needs at least one backend name, for example "
            '@pytest.mark.backend("thread", "asyncio").'
        )
    return _dedupe(names)


@dataclasses.dataclass(frozen=True)
class _Count:
    """A whole-number setting of the marker (``workers=``, ``explore=``) with its option and
    ini key: one reading of marker, then option, then ini key, then default, for each."""

    keyword: str
    option: str
    dest: str
    ini: str
    least: int
    default: int
    what: str  # "copies, 1 or more"
    marker_example: str  # '"thread", workers=8'
    example: str  # the value in examples: "8"
    key: pytest.StashKey[int]

    def from_marker(self, mark: pytest.Mark) -> int | None:
        """The marker's value, or ``None``; ``pytest.fail`` if invalid."""
        if self.keyword not in mark.kwargs:
            return None
        value = mark.kwargs[self.keyword]
        if isinstance(value, bool) or not isinstance(value, int) or value < self.least:
            _fail(
                f"@pytest.mark.backend({self.keyword}=...) takes a whole number of "
                f"{self.what}, got {value!r}: write e.g. "
                f"@pytest.mark.backend({self.marker_example})."
            )
        return value

    def parse(self, value: object, origin: str) -> int:
        """A value from the option or the ini key; a usage error if it is not one."""
        try:
            count = int(str(value).strip())
        except ValueError:
            count = self.least - 1
        if count < self.least:
            example = (
                f"{self.option}={self.example}"
                if origin == self.option
                else f"{self.ini} = {self.example}"
            )
            raise pytest.UsageError(
                f"pytest-concur: {origin} takes a whole number of {self.what}, got "
                f"{value!r}: e.g. {example}."
            )
        return count

    def session_default(self, config: pytest.Config) -> int:
        """What the option or the ini key ask for, else the default (read once)."""
        if self.key not in config.stash:
            option: object = config.getoption(self.dest)
            if option is not None:
                count = self.parse(option, self.option)
            else:
                ini = str(config.getini(self.ini) or "").strip()
                count = self.parse(ini, f"{self.ini} (ini)") if ini else self.default
            config.stash[self.key] = count
        return config.stash[self.key]

    def of(self, item: pytest.Item) -> int:
        """The item's value: its marker's, else the session's default."""
        mark = item.get_closest_marker(MARKER)
        count = self.from_marker(mark) if mark is not None else None
        return count if count is not None else self.session_default(item.config)


_WORKERS = _Count(
    keyword="workers",
    option=WORKERS_OPTION,
    dest="concur_workers",
    ini=WORKERS_INI,
    least=1,
    default=1,
    what="copies, 1 or more",
    marker_example='"thread", workers=8',
    example="8",
    key=pytest.StashKey[int](),
)
_EXPLORE = _Count(
    keyword="explore",
    option=EXPLORE_OPTION,
    dest="concur_explore",
    ini=EXPLORE_INI,
    least=0,
    default=0,
    what="schedules, 0 (off) or more",
    marker_example='"asyncio", explore=100',
    example="100",
    key=pytest.StashKey[int](),
)

marker_workers = _WORKERS.from_marker
parse_workers = _WORKERS.parse
default_workers = _WORKERS.session_default
marker_explore = _EXPLORE.from_marker
parse_explore = _EXPLORE.parse
default_explore = _EXPLORE.session_default


def workers(item: pytest.Item) -> int:
    """How many copies of ``item``'s body run at once: the marker's ``workers=``, else the
    option, else the ini key, else 1. (Serial tests are the caller's business.)"""
    return _WORKERS.of(item)


def explore(item: pytest.Item) -> int:
    """How many schedules ``item``'s body is explored under: the marker's ``explore=``, else
    the option, else the ini key, else 0 (the body runs once, as asyncio schedules it)."""
    return _EXPLORE.of(item)


def parse_list(value: str) -> tuple[str, ...]:
    """Backend names from the option or ini: separated by commas and/or white space."""
    return _dedupe(part for part in re.split(r"[\s,]+", value) if part)


def default_selection(config: pytest.Config) -> Selection | None:
    """What ``--concur-backends`` or the ``concur_backends`` ini key asks for, if anything."""
    if _DEFAULT not in config.stash:
        option: str | None = config.getoption("concur_backends")
        if option is not None:
            names = parse_list(option)
            if not names:
                raise pytest.UsageError(
                    f"{OPTION} was given an empty list; name one or more backends, "
                    f"e.g. {OPTION}=thread,process,asyncio (or leave the option out)."
                )
            config.stash[_DEFAULT] = Selection(names, OPTION)
        else:
            names = parse_list(str(config.getini(INI) or ""))
            config.stash[_DEFAULT] = Selection(names, f"{INI} (ini)") if names else None
    return config.stash[_DEFAULT]


def check(selection: Selection, registry: BackendRegistry) -> str | None:
    """A message naming the first unknown backend of ``selection``, or ``None``."""
    for name in selection.names:
        if name not in registry:
            import difflib  # only for a typo: not paid by every session

            close = difflib.get_close_matches(name, list(registry), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return (
                f"unknown backend {name!r} in {selection.origin}.{hint} "
                f"Available backends: {registry.describe()}."
            )
    return None


def left_to_others(config: pytest.Config) -> dict[str, int]:
    """How many tests the default backends left to another plugin, by that plugin."""
    left: dict[str, int] = config.stash.get(_LEFT_TO_OTHERS, {})
    return dict(left)


def claimed_by(function: pytest.Function) -> str | None:
    """The other plugin that runs this async test, if one does."""
    if not inspect.iscoroutinefunction(function.obj):
        return None
    claim = _claim.decide(function)  # --concur-claim: ours, or left with the reason
    if claim is not None:
        return claim.left_to
    config = function.config
    for marker, (plugin, name) in _OTHER_RUNNERS.items():
        # A marker whose plugin is not loaded (-p no:asyncio, not installed) runs nothing.
        if function.get_closest_marker(marker) is not None and config.pluginmanager.hasplugin(name):
            return f"{plugin} (its @pytest.mark.{marker})"
    if config.pluginmanager.hasplugin("asyncio") and config.getini("asyncio_mode") == "auto":
        return "pytest-asyncio (asyncio_mode = auto)"
    return None


def select(function: pytest.Function, registry: BackendRegistry) -> Selection | None:
    """The backends ``function`` runs under, or ``None`` to leave it alone.

    ``pytest.fail``, with a message that names the test, on a malformed marker, an unknown
    backend, or a test that both this plugin and another async plugin were asked to run
    (the plugin makes it an error of that test alone, at its setup).
    """
    mark = function.get_closest_marker(MARKER)
    if mark is not None:
        try:
            names = parse_marker(mark)
        except pytest.fail.Exception as exc:
            _fail(f"In {function.name}: {exc.msg}")  # which test, whatever the problem
        selection = Selection(names, "@pytest.mark.backend")
        other = claimed_by(function)
        if other is not None:
            _fail(
                f"{function.name} is marked for pytest-concur with @pytest.mark.backend and "
                f"for {other}; only one plugin can run an async test. Remove one of the two."
            )
    else:
        default = default_selection(function.config)
        if default is None:
            return None
        other = claimed_by(function)
        if other is not None:
            left = function.config.stash.setdefault(_LEFT_TO_OTHERS, {})
            left[other] = left.get(other, 0) + 1
            return None
        selection = default
    problem = check(selection, registry)
    if problem is not None:
        _fail(f"In {function.name}: {problem}")
    return selection


def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _fail(message: str) -> NoReturn:
    __tracebackhide__ = True
    pytest.fail(message, pytrace=False)
