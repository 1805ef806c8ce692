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
_DEFAULT_WORKERS = pytest.StashKey[int]()
_DEFAULT_EXPLORE = pytest.StashKey[int]()


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


def marker_workers(mark: pytest.Mark) -> int | None:
    """The ``workers=`` of a ``backend(...)`` marker, or ``None``; ``pytest.fail`` if invalid."""
    if "workers" not in mark.kwargs:
        return None
    value = mark.kwargs["workers"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(
            f"@pytest.mark.backend(workers=...) takes a whole number of copies, 1 or more, "
            f'got {value!r}: write e.g. @pytest.mark.backend("thread", workers=8).'
        )
    return value


def parse_workers(value: object, origin: str) -> int:
    """A worker count from the option or the ini key; a usage error if it is not one."""
    try:
        count = int(str(value).strip())
    except ValueError:
        count = 0
    if count < 1:
        example = f"{WORKERS_OPTION}=8" if origin == WORKERS_OPTION else f"{WORKERS_INI} = 8"
        raise pytest.UsageError(
            f"pytest-concur: {origin} takes a whole number of copies, 1 or more, got "
            f"{value!r}: e.g. {example}."
        )
    return count


def default_workers(config: pytest.Config) -> int:
    """How many copies ``--concur-workers`` or the ``concur_workers`` ini key ask for (1)."""
    if _DEFAULT_WORKERS not in config.stash:
        option: object = config.getoption("concur_workers")
        if option is not None:
            count = parse_workers(option, WORKERS_OPTION)
        else:
            ini = str(config.getini(WORKERS_INI) or "").strip()
            count = parse_workers(ini, f"{WORKERS_INI} (ini)") if ini else 1
        config.stash[_DEFAULT_WORKERS] = count
    return config.stash[_DEFAULT_WORKERS]


def workers(item: pytest.Item) -> int:
    """How many copies of ``item``'s body run at once: the marker's ``workers=``, else the
    option, else the ini key, else 1. (Serial tests are the caller's business.)"""
    mark = item.get_closest_marker(MARKER)
    count = marker_workers(mark) if mark is not None else None
    return count if count is not None else default_workers(item.config)


def marker_explore(mark: pytest.Mark) -> int | None:
    """The ``explore=`` of a ``backend(...)`` marker, or ``None``; ``pytest.fail`` if invalid."""
    if "explore" not in mark.kwargs:
        return None
    value = mark.kwargs["explore"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(
            f"@pytest.mark.backend(explore=...) takes a whole number of schedules, 0 (off) or "
            f'more, got {value!r}: write e.g. @pytest.mark.backend("asyncio", explore=100).'
        )
    return value


def parse_explore(value: object, origin: str) -> int:
    """A schedule count from the option or the ini key; a usage error if it is not one."""
    try:
        count = int(str(value).strip())
    except ValueError:
        count = -1
    if count < 0:
        raise pytest.UsageError(
            f"pytest-concur: {origin} takes a whole number of schedules, 0 (off) or more, "
            f"got {value!r}: e.g. {EXPLORE_OPTION}=100."
        )
    return count


def default_explore(config: pytest.Config) -> int:
    """How many schedules ``--concur-explore`` or the ``concur_explore`` ini key ask for (0)."""
    if _DEFAULT_EXPLORE not in config.stash:
        option: object = config.getoption("concur_explore")
        if option is not None:
            count = parse_explore(option, EXPLORE_OPTION)
        else:
            ini = str(config.getini(EXPLORE_INI) or "").strip()
            count = parse_explore(ini, f"{EXPLORE_INI} (ini)") if ini else 0
        config.stash[_DEFAULT_EXPLORE] = count
    return config.stash[_DEFAULT_EXPLORE]


def explore(item: pytest.Item) -> int:
    """How many schedules ``item``'s body is explored under: the marker's ``explore=``, else
    the option, else the ini key, else 0 (the body runs once, as asyncio schedules it)."""
    mark = item.get_closest_marker(MARKER)
    count = marker_explore(mark) if mark is not None else None
    return count if count is not None else default_explore(item.config)


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
