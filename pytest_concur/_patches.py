"""Process-wide hooks on library classes: replaced once, switched on and off per body.

The checks see what a body starts by hooking methods of library classes
(``threading.Thread.start``, ``subprocess.Popen.__init__``, ``asyncio.Handle._run`` ...).
Replacing a class attribute is not free: CPython invalidates the type's caches (and those
of its subclasses) each time, which in a whole run cost several microseconds per hook per
test, more than the checks' own work on a test that starts nothing. So each one is
replaced once, the first time something listens to it, by a wrapper that calls the real
method and tells whoever listens at that moment; with nobody listening it only calls
through. Listening and stopping is a tuple swap under a lock: a wrapper reads the tuple
once, without the lock and without relying on the GIL.

The wrappers stay until :func:`uninstall` (the plugin's ``pytest_unconfigure``) puts the
originals back, where nobody replaced them after us and nothing listens any more.

Two kinds of site:

- *around* (``THREAD_START``, ``PROCESS_START``, ``FUTURE_RESULT`` ...): ``listener(obj)`` is called before the
  real method and may return a callable, called after it returned or raised;
- *before* (``FUTURE_ADD_DONE_CALLBACK``): ``listener(obj, args, kwargs)`` is called with
  the call's arguments before the real method;
- *after* (every other): ``listener(obj, result)`` is called once the real method returned.
"""

from __future__ import annotations

import _thread
import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any, final

# Our own lock, taken at import: the deadlock check replaces threading.Lock during bodies.
_lock = _thread.allocate_lock()


@final
class _Site:
    """One hooked attribute: where it lives, how it is wrapped, and who listens."""

    __slots__ = ("attribute", "installed", "kind", "listeners", "original", "owner", "path")

    def __init__(self, path: str, attribute: str, kind: str) -> None:
        self.path = path  # "module:Class"
        self.attribute = attribute
        self.kind = kind  # "around", "before", "after", or "exitcode" (a property)
        self.listeners: tuple[Callable[..., Any], ...] = ()
        self.owner: Any = None
        self.original: Any = None
        self.installed: Any = None  # our wrapper, while it is in place

    def install(self) -> None:
        module, _, name = self.path.partition(":")
        owner = getattr(importlib.import_module(module), name)
        original = owner.__dict__[self.attribute]
        wrapper = _WRAPPERS[self.kind](self, original)
        setattr(owner, self.attribute, wrapper)
        self.owner, self.original, self.installed = owner, original, wrapper

    def uninstall(self) -> None:
        if self.installed is None or self.listeners:
            return
        if self.owner.__dict__.get(self.attribute) is self.installed:
            setattr(self.owner, self.attribute, self.original)
            self.owner = self.original = self.installed = None
        # Else someone wrapped ours: it stays below theirs, calling through, still ours.


def _around(site: _Site, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
        listeners = site.listeners
        if not listeners:
            return original(obj, *args, **kwargs)
        afters = [after for listener in listeners if (after := listener(obj)) is not None]
        try:
            return original(obj, *args, **kwargs)
        finally:
            for after in reversed(afters):
                after()

    return wrapper


def _after(site: _Site, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(obj, *args, **kwargs)
        for listener in site.listeners:
            listener(obj, result)
        return result

    return wrapper


def _before(site: _Site, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
        for listener in site.listeners:
            listener(obj, args, kwargs)
        return original(obj, *args, **kwargs)

    return wrapper


def _exitcode(site: _Site, original: property) -> property:
    getter = original.fget
    assert getter is not None

    def exitcode(process: Any) -> Any:
        code = getter(process)
        if code is not None:
            for listener in site.listeners:
                listener(process, code)
        return code

    return property(exitcode, original.fset, original.fdel, original.__doc__)


_WRAPPERS: dict[str, Callable[[_Site, Any], Any]] = {
    "around": _around,
    "after": _after,
    "before": _before,
    "exitcode": _exitcode,
}

THREAD_START = _Site("threading:Thread", "start", "around")
PROCESS_START = _Site("multiprocessing.process:BaseProcess", "start", "around")
PROCESS_EXITCODE = _Site("multiprocessing.process:BaseProcess", "exitcode", "exitcode")
# A process its parent stopped: its exit status was asked for, not unnoticed.
PROCESS_TERMINATE = _Site("multiprocessing.process:BaseProcess", "terminate", "before")
PROCESS_KILL = _Site("multiprocessing.process:BaseProcess", "kill", "before")
POPEN_INIT = _Site("subprocess:Popen", "__init__", "after")
POOL_INIT = _Site("multiprocessing.pool:Pool", "__init__", "after")
PROCESS_POOL_INIT = _Site("concurrent.futures.process:ProcessPoolExecutor", "__init__", "after")
THREAD_POOL_INIT = _Site("concurrent.futures.thread:ThreadPoolExecutor", "__init__", "after")
LOOP_INIT = _Site("asyncio.base_events:BaseEventLoop", "__init__", "after")
LOOP_CREATE_TASK = _Site("asyncio.base_events:BaseEventLoop", "create_task", "after")
# concurrent.futures.Future, of every executor: made, failed, and looked at.
FUTURE_INIT = _Site("concurrent.futures._base:Future", "__init__", "after")
FUTURE_SET_EXCEPTION = _Site("concurrent.futures._base:Future", "set_exception", "after")
FUTURE_RESULT = _Site("concurrent.futures._base:Future", "result", "around")
FUTURE_EXCEPTION = _Site("concurrent.futures._base:Future", "exception", "around")
FUTURE_ADD_DONE_CALLBACK = _Site("concurrent.futures._base:Future", "add_done_callback", "before")
_SITES = (
    THREAD_START,
    PROCESS_START,
    PROCESS_EXITCODE,
    PROCESS_TERMINATE,
    PROCESS_KILL,
    POPEN_INIT,
    POOL_INIT,
    PROCESS_POOL_INIT,
    THREAD_POOL_INIT,
    LOOP_INIT,
    LOOP_CREATE_TASK,
    FUTURE_INIT,
    FUTURE_SET_EXCEPTION,
    FUTURE_RESULT,
    FUTURE_EXCEPTION,
    FUTURE_ADD_DONE_CALLBACK,
)

# Attributes replaced outright by a wrapper that keeps its own switch (see ``replace``).
_REPLACED: dict[tuple[int, str], tuple[Any, str, Any, Any]] = {}


def listen(site: _Site, listener: Callable[..., Any]) -> Callable[[], None]:
    """Call ``listener`` at ``site`` from now on; the function returned stops it."""
    return listen_many(((site, listener),))


def listen_many(pairs: Iterable[tuple[_Site, Callable[..., Any]]]) -> Callable[[], None]:
    """Call each listener at its site from now on; the function returned stops them all."""
    # Emptied when stopped: a listener is often a bound method of an object that keeps
    # this ``stop``; left here, the pair would be garbage only the cycle collector frees.
    held = list(pairs)
    with _lock:
        for site, listener in held:
            if site.installed is None:
                site.install()
            site.listeners = (*site.listeners, listener)

    def stop() -> None:
        with _lock:
            for site, listener in held:
                listeners = site.listeners
                if listener in listeners:
                    index = listeners.index(listener)
                    site.listeners = listeners[:index] + listeners[index + 1 :]
            held.clear()

    return stop


def replace(owner: Any, attribute: str, make: Callable[[Any], Any]) -> None:
    """Put ``make(original)`` in place of ``owner.attribute``, once per process.

    For a hot path whose wrapper checks a switch of its own (the deadlock check's
    ``Thread.join``, the blocked-loop check's ``Handle._run``): called again, it does
    nothing while our wrapper is there.
    """
    key = (id(owner), attribute)
    entry = _REPLACED.get(key)  # asked before every body: mostly there already
    if entry is not None and owner.__dict__.get(attribute) is entry[3]:
        return
    with _lock:
        entry = _REPLACED.get(key)
        if entry is not None and owner.__dict__.get(attribute) is entry[3]:
            return
        original = owner.__dict__[attribute]
        wrapper = make(original)
        setattr(owner, attribute, wrapper)
        _REPLACED[key] = (owner, attribute, original, wrapper)


def uninstall() -> None:
    """Put the originals back where nothing listens and nobody wrapped ours since."""
    with _lock:
        for site in _SITES:
            site.uninstall()
        for key, (owner, attribute, original, wrapper) in list(_REPLACED.items()):
            if owner.__dict__.get(attribute) is wrapper:
                setattr(owner, attribute, original)
                del _REPLACED[key]


def listening() -> list[str]:
    """The sites something listens to now, as ``module:Class.attribute`` (for tests)."""
    return [f"{site.path}.{site.attribute}" for site in _SITES if site.listeners]
