"""``--concur-claim``: run under the backends the async tests pytest-asyncio or anyio would run.

Without the claim, an async test that pytest-asyncio (``@pytest.mark.asyncio``, or every
``async def`` test in its auto mode) or anyio (``@pytest.mark.anyio``, or anyio's auto
mode) runs is theirs, and ``--concur-backends`` leaves it alone. With
``--concur-claim=asyncio,anyio`` (or the ``concur_claim`` ini key) pytest-concur takes
such a test when it can give the test what it relies on, and leaves it to its plugin,
counted in the collection summary with the reason, when it cannot.

The invariants:

* **Exactly one plugin runs a body.** A claimed item is rebuilt at collection as a
  :class:`ClaimedFunction`, whose ``runtest`` calls ``pytest_pyfunc_call`` without the
  implementations of pytest-asyncio and anyio (pluggy's ``subset_hook_caller``), so
  neither can run the body, however the plugins are ordered. pytest-asyncio's own item
  classes are replaced, so it never adds its runner fixture (and its loop) to the item.
* **A function-scoped async fixture shares the body's loop.** The fixtures of a claimed
  item that its plugin would have run on the test's own loop (pytest-asyncio:
  function scope and ``loop_scope``; anyio: function scope) run on the item's loop, as
  ``pytest_concur._async_fixtures`` runs every async fixture of a backend item.
* **A loop wider than the test is never faked.** A test that shares a loop with other
  tests or with wider-scoped fixtures (pytest-asyncio ``loop_scope`` other than
  ``function``, or custom loop factories; anyio with an async fixture wider than the
  function, since anyio runs it and the test on one loop) stays with its plugin, which
  runs it as before. pytest-asyncio fixtures with a wider ``loop_scope`` used by a
  claimed test stay pytest-asyncio's: they never shared the test's loop.
* **anyio's trio runs stay anyio's.** Backends run asyncio only. A claimed item whose
  ``anyio_backend`` parameter is not plain asyncio is skipped at collection with the
  reason (its ``[trio]`` variant runs when the claim is off); a non-parametrized
  ``anyio_backend`` fixture that turns out not to be asyncio fails the item, saying why.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, final

import pytest

from pytest_concur._state import FIXTURE

OPTION = "--concur-claim"
INI = "concur_claim"
# What the claim can name -> (the plugin that runs those tests, its name in the plugin manager).
CLAIMABLE = {
    "asyncio": ("pytest-asyncio", "asyncio"),
    "anyio": ("anyio", "anyio"),
}

_CLAIMS = pytest.StashKey[frozenset[str]]()
# On a claimed item: which plugin's test it is ("asyncio" or "anyio").
CLAIMED = pytest.StashKey[str]()
_PYFUNC_CALL = pytest.StashKey[Any]()


def claims(config: pytest.Config) -> frozenset[str]:
    """The plugins ``--concur-claim`` or the ``concur_claim`` ini key name; a usage error if
    a name is unknown."""
    if _CLAIMS not in config.stash:
        option: str | None = config.getoption("concur_claim")
        origin, value = (OPTION, option) if option is not None else (f"{INI} (ini)", None)
        if value is None:
            value = str(config.getini(INI) or "")
        names = [part for part in re.split(r"[\s,]+", value) if part]
        unknown = [name for name in names if name not in CLAIMABLE]
        if unknown:
            raise pytest.UsageError(
                f"pytest-concur: unknown name {unknown[0]!r} in {origin}: it takes "
                f"{', '.join(sorted(CLAIMABLE))} (the async plugins whose tests pytest-concur "
                f"can run), e.g. {OPTION}=asyncio,anyio."
            )
        config.stash[_CLAIMS] = frozenset(names)
    return config.stash[_CLAIMS]


def pytest_sessionstart(session: pytest.Session) -> None:
    claims(session.config)  # a bad name is a usage error before any test is collected


def owner(function: pytest.Function) -> str | None:
    """``"asyncio"`` or ``"anyio"`` when that plugin would run this async test, else None."""
    if not inspect.iscoroutinefunction(function.obj):
        return None
    config = function.config
    plugins = config.pluginmanager
    # The markers first, in the order pytest_concur._marker.claimed_by reads them.
    for marker in ("asyncio", "anyio", "trio"):
        if function.get_closest_marker(marker) is not None and plugins.hasplugin(marker):
            return marker if marker in CLAIMABLE else None
    if plugins.hasplugin("asyncio") and config.getini("asyncio_mode") == "auto":
        return "asyncio"
    if plugins.hasplugin("anyio") and _ini(config, "anyio_mode") == "auto":
        return "anyio"
    return None


@final
class Decision:
    """What the claim does with one async test another plugin would run."""

    __slots__ = ("left_to", "owner")

    def __init__(self, owner: str, left_to: str | None) -> None:
        self.owner = owner
        # None: pytest-concur runs it; else who runs it and why, for the collection summary.
        self.left_to = left_to


def decide(function: pytest.Function) -> Decision | None:
    """The claim's verdict on ``function``, or None when the claim does not cover it."""
    name = owner(function)
    if name is None or name not in claims(function.config):
        return None
    reason = _asyncio_refusal(function) if name == "asyncio" else _anyio_refusal(function)
    plugin = CLAIMABLE[name][0]
    return Decision(name, None if reason is None else f"{plugin} ({reason})")


def summary_hint(config: pytest.Config, left_to: str) -> str:
    """What to add to a "left to <plugin>" summary line: how the claim would take them."""
    for name, (plugin, _) in CLAIMABLE.items():
        if left_to.startswith(f"{plugin} (") and name not in claims(config):
            return f"; {OPTION}={name} runs them under the backends"
    return ""


def _asyncio_refusal(function: pytest.Function) -> str | None:
    config = function.config
    mark = function.get_closest_marker("asyncio")
    kwargs = mark.kwargs if mark is not None else {}
    scope = kwargs.get("loop_scope") or kwargs.get("scope")
    scope = scope or _ini(config, "asyncio_default_test_loop_scope") or "function"
    if scope != "function":
        return (
            f"loop_scope={scope!r}: it shares one loop with other tests, and a backend runs "
            "each body on a loop of its own; give it loop_scope='function' to claim it"
        )
    factories = getattr(config.hook, "pytest_asyncio_loop_factories", None)
    if "loop_factories" in kwargs or (factories is not None and factories.get_hookimpls()):
        return "custom loop factories, which a backend's loop does not use"
    return None


def _anyio_refusal(function: pytest.Function) -> str | None:
    for name, scope in _async_fixture_scopes(function):
        if scope != "function":
            return (
                f"its {scope}-scoped async fixture {name!r} runs on the test's loop, and a "
                "backend runs each body on a loop of its own"
            )
    return None


def _async_fixture_scopes(function: pytest.Function) -> list[tuple[str, str]]:
    # The fixture closure as pytest resolved it for this test. _fixtureinfo is private, but
    # it is the only place that knows which definition of a name applies (pytest 8.0-9.2
    # all have it, and pytest-asyncio and anyio read it too).
    info = getattr(function, "_fixtureinfo", None)
    defs: dict[str, Any] = getattr(info, "name2fixturedefs", {})
    found = []
    for name, fixturedefs in defs.items():
        if not fixturedefs:
            continue
        fixturedef = fixturedefs[-1]
        func = fixturedef.func
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            found.append((name, str(fixturedef.scope)))
    return found


def runs_fixture(item: pytest.Item, fixturedef: pytest.FixtureDef[Any]) -> bool:
    """Whether pytest-concur runs this pytest-asyncio fixture of a claimed item itself, on
    the item's loop: it is function-scoped and pytest-asyncio would run it on the test's
    loop (its ``loop_scope``, else ``asyncio_default_fixture_loop_scope``, is function)."""
    if item.stash.get(CLAIMED, None) != "asyncio" or fixturedef.scope != "function":
        return False
    func = getattr(fixturedef.func, "__func__", fixturedef.func)
    default = _ini(item.config, "asyncio_default_fixture_loop_scope")
    loop_scope = getattr(func, "_loop_scope", None) or default
    return loop_scope in (None, "", "function", "fixture-scope")


@final
class ClaimedFunction(pytest.Function):
    """An async test another plugin would run, run by pytest-concur under a backend."""

    def runtest(self) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        if self.stash.get(CLAIMED, None) == "anyio" and "anyio_backend" in self.funcargs:
            _check_anyio_backend(self, self.funcargs["anyio_backend"])
        config = self.config
        call = config.stash.get(_PYFUNC_CALL, None)
        if call is None:
            plugins = config.pluginmanager
            others = [plugins.get_plugin(name) for _, name in CLAIMABLE.values()]
            call = config.stash[_PYFUNC_CALL] = plugins.subset_hook_caller(
                "pytest_pyfunc_call", [plugin for plugin in others if plugin is not None]
            )
        call(pyfuncitem=self)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Any:
    # Outermost, so that it sees the items after pytest-asyncio has made them its own.
    result = yield
    if not claims(collector.config) or not result:
        return result
    if isinstance(result, list):
        return [_adopt(node) for node in result]
    return _adopt(result)


def _adopt(node: Any) -> Any:
    """A claimed item rebuilt as a :class:`ClaimedFunction`; any other node unchanged."""
    if not isinstance(node, pytest.Function) or isinstance(node, ClaimedFunction):
        return node
    callspec = getattr(node, "callspec", None)
    if callspec is None or not isinstance(callspec.params.get(FIXTURE), str):
        return node  # not selected for a backend: the claim leaves it be
    decision = decide(node)
    if decision is None or decision.left_to is not None:
        return node
    assert node.parent is not None
    item = ClaimedFunction.from_parent(
        node.parent,
        name=node.name,
        callspec=callspec,
        callobj=node.obj,
        # Private, as for _async_fixture_scopes: it holds the pseudo-fixtures of direct
        # parametrization, which recomputing it would lose.
        fixtureinfo=node._fixtureinfo,
        keywords=node.keywords,
        originalname=node.originalname,
    )
    item.own_markers = node.own_markers  # pytest-asyncio's auto mode marks the item itself
    item.stash[CLAIMED] = decision.owner
    if decision.owner == "anyio" and "anyio_backend" in callspec.params:
        reason = _anyio_backend_problem(callspec.params["anyio_backend"])
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
    return item


def _anyio_backend_problem(backend: object) -> str | None:
    # anyio takes "name" or ("name", {options}); backends honour no options.
    plain = backend == "asyncio" or (
        isinstance(backend, tuple)
        and len(backend) == 2
        and backend[0] == "asyncio"
        and not backend[1]
    )
    if plain:
        return None
    return (
        f"pytest-concur runs anyio's tests on asyncio without options ({OPTION}=anyio), "
        f"and this one's anyio_backend is {backend!r}: without {OPTION}=anyio, anyio runs it"
    )


def _check_anyio_backend(item: pytest.Item, backend: object) -> None:
    problem = _anyio_backend_problem(backend)
    if problem is not None:
        pytest.fail(
            f"{item.name}: {problem}. Parametrize the anyio_backend fixture "
            "(params=[...]) so that pytest-concur can tell at collection.",
            pytrace=False,
        )


def _ini(config: pytest.Config, name: str) -> Any:
    """An ini value another plugin declares, or None when that plugin does not declare it."""
    try:
        return config.getini(name)
    except ValueError:
        return None
