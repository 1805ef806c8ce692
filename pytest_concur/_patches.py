"""Every process-wide replacement pytest-concur makes, recorded and put back here.

This module is the one owner of the standard library's attributes that the plugin replaces
(class and module attributes alike). Each replacement is a :class:`Swap` that remembers
what it replaced; undoing one puts that back only where the replacement is still in place
(one made by someone else after ours is theirs: left alone), and undoing the later of two
of our own swaps of one attribute first, or the earlier first, both end with the original.
Three ways in:

- :func:`listen` on a *site* below, for the checks' hooks on library methods;
- :func:`replace`, for a hot path whose wrapper keeps its own switch (once per process);
- :func:`swap_many`, for what is swapped for a span and undone by whoever swapped it (the
  deadlock check's lock factories and channels for a body, or for the session; the threads
  check's ``threading.excepthook``).

Not here, each with a comment where it is: the signal handlers of ``_timeout`` and of the
``process`` backend's child (handlers set through the API that owns them, not
replacements), and ``_checks/tasks.py``'s hook on ``warnings`` (left for a later change).

Sites: process-wide hooks on library classes, replaced once, switched on and off per body.

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
_MISSING: Any = object()  # an attribute the owner did not have itself (inherited, or none)


@final
class Swap:
    """One replacement in place: ``owner.attribute`` was ``original``, is ``replacement``."""

    __slots__ = ("attribute", "original", "owner", "replacement")

    def __init__(self, owner: Any, attribute: str, original: Any, replacement: Any) -> None:
        self.owner = owner
        self.attribute = attribute
        self.original = original
        self.replacement = replacement


# Every replacement of ours in place, oldest first (under _lock).
_SWAPS: list[Swap] = []


def _swap(owner: Any, attribute: str, replacement: Any) -> Swap:
    record = Swap(owner, attribute, owner.__dict__.get(attribute, _MISSING), replacement)
    setattr(owner, attribute, replacement)
    _SWAPS.append(record)
    return record


def _undo(record: Swap) -> bool:
    """Put back what ``record`` replaced, if ours is still in place; whether it was.

    Under a later swap of ours of the same attribute, the later one inherits what this one
    replaced (its own undo puts that back) and this record goes, though the later wrapper
    may still call ours. Under someone else's, it stays recorded: theirs calls through to
    ours, which is still ours. Both answer False.
    """
    index = next((i for i, swap in enumerate(_SWAPS) if swap is record), None)
    if index is None:
        return True  # undone already
    owner, attribute = record.owner, record.attribute
    current = owner.__dict__.get(attribute, _MISSING)
    if current is not record.replacement:
        for later in _SWAPS[index + 1 :]:
            if later.owner is owner and later.attribute == attribute:
                if later.original is record.replacement:
                    later.original = record.original
                    del _SWAPS[index]
                break
        return False
    if record.original is _MISSING:
        delattr(owner, attribute)
    else:
        setattr(owner, attribute, record.original)
    del _SWAPS[index]
    return True


@final
class _Site:
    """One hooked attribute: where it lives, how it is wrapped, and who listens."""

    __slots__ = ("attribute", "installed", "kind", "listeners", "path")

    def __init__(self, path: str, attribute: str, kind: str) -> None:
        self.path = path  # "module:Class"
        self.attribute = attribute
        self.kind = kind  # "around", "before", "after", or "exitcode" (a property)
        self.listeners: tuple[Callable[..., Any], ...] = ()
        self.installed: Swap | None = None  # our wrapper's, while it is in place

    def install(self) -> None:
        module, _, name = self.path.partition(":")
        owner = getattr(importlib.import_module(module), name)
        original = owner.__dict__[self.attribute]
        self.installed = _swap(owner, self.attribute, _WRAPPERS[self.kind](self, original))

    def uninstall(self) -> None:
        if self.installed is None or self.listeners:
            return
        if _undo(self.installed):
            self.installed = None
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
_REPLACED: dict[tuple[int, str], Swap] = {}


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
    if entry is not None and owner.__dict__.get(attribute) is entry.replacement:
        return
    with _lock:
        entry = _REPLACED.get(key)
        if entry is not None and owner.__dict__.get(attribute) is entry.replacement:
            return
        if entry is not None and entry in _SWAPS:
            _SWAPS.remove(entry)  # replaced over (pytest puts its excepthook back): forgotten
        _REPLACED[key] = _swap(owner, attribute, make(owner.__dict__[attribute]))


def swap_many(swaps: Iterable[tuple[Any, str, Any]]) -> Callable[[], bool]:
    """Put each ``(owner, attribute, replacement)`` in place; the function returned undoes them.

    One already in place is left as it is, and not undone. The undo goes in reverse order,
    puts back only what is still ours (see :func:`_undo`), forgets the rest, and returns
    whether every one was put back; called again, it does nothing.
    """
    with _lock:
        made = [
            _swap(owner, attribute, replacement)
            for owner, attribute, replacement in swaps
            if owner.__dict__.get(attribute, _MISSING) is not replacement
        ]

    def undo() -> bool:
        with _lock:
            gone = [_undo(record) for record in reversed(made)]
            for record in made:  # someone else's is over ours: theirs, and no longer ours
                if record in _SWAPS:
                    _SWAPS.remove(record)
            made.clear()
        return all(gone)

    return undo


def uninstall() -> None:
    """Put the originals back where nothing listens and nobody wrapped ours since.

    The sites' wrappers and :func:`replace`'s, newest first; what :func:`swap_many` swapped
    is its caller's to undo.
    """
    with _lock:
        kept = {id(site.installed): site for site in _SITES if site.installed is not None}
        replaced = {id(entry): key for key, entry in _REPLACED.items()}
        for record in reversed(_SWAPS[:]):
            site = kept.get(id(record))
            if site is not None:
                site.uninstall()
            elif id(record) in replaced:
                if not _undo(record) and record in _SWAPS:
                    # Replaced over (pytest 8.0 puts its per-phase excepthook back itself):
                    # nothing of ours to put back, and the wrapper keeps its own switch.
                    _SWAPS.remove(record)
                del _REPLACED[replaced[id(record)]]


def replacements() -> list[tuple[Any, str, Any]]:
    """Every replacement of ours in place, as ``(owner, attribute, original)`` (for tests)."""
    with _lock:
        return [(swap.owner, swap.attribute, swap.original) for swap in _SWAPS]


def listening() -> list[str]:
    """The sites something listens to now, as ``module:Class.attribute`` (for tests)."""
    return [f"{site.path}.{site.attribute}" for site in _SITES if site.listeners]
