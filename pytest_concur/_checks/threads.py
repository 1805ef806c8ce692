"""The ``threads`` check: threads the body started are over when it returns, and their
exceptions are seen.

Design. From ``begin`` to ``end`` (where the body runs: the backend's thread, the event
loop's thread, the child process) two process-wide hooks are in place, both taken off in
``end`` whatever happens:

- ``threading.Thread.start`` is listened to (``pytest_concur._patches``) to record each
  thread started by the body's thread or, transitively, by a thread the body started,
  with the user's frames of the start call. Threads that were running before ``begin``
  (fixtures', the harness's) and threads started by them are never recorded, so they are
  never reported.
- ``threading.excepthook`` (replaced through ``_patches`` when the first thread is
  recorded) records the exceptions of recorded threads, formatted where they happen, and
  hands every other thread's exception to the hook that was there before.

A thread or pool that a method of a live fixture's object starts is handed to that
fixture's lineage instead (``owner_of``, below), and judged at its teardown.

At ``end``, recorded threads still alive are given the grace period (``concur_leak_grace``)
to finish; those still running then are reported. When a fixture of the test has a
teardown, they are judged after the item's whole teardown instead (``_leak.later_for``). Python cannot stop a thread, so they are
left running, except the workers of a ``ThreadPoolExecutor`` the body never shut down:
the executor is shut down, which ends its idle workers. Workers of the running loop's
default executor belong to the loop, which its owner shuts down when it closes it; threads
of process pools and multiprocessing queues belong to the ``processes`` check.

Invariant: the recording state is only touched under its own lock; the GIL is not relied on.

Where the parts live: this module records, follows fixtures' lineages and judges;
``_reach`` walks what a fixture's value reaches (ownership by object), ``_thread_kinds``
tells the threads no test answers for (process-wide caches, pools' own threads).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

import _pytest
import pluggy
import pytest

import pytest_concur
from pytest_concur import _patches, _primitives
from pytest_concur._checks._leak import TEST, LeakCheck, LeakWatch, Owner, Recording, later_for
from pytest_concur._checks._reach import _BUDGET, Body, _bound_to, _reaches, body_of
from pytest_concur._checks._thread_kinds import (
    _belongs_to_processes,
    _executor_of,
    _is_loop_executor,
    _loop_executor,
    _process_wide,
)
from pytest_concur._checks._where import (
    Site,
    callable_name,
    format_exception,
    here,
    plural,
    settle,
)
from pytest_concur._state import backend_of

if TYPE_CHECKING:
    from types import FrameType

NAME = "threads"
# Taken at import, before any check runs: the deadlock check swaps threading.Lock for a
# tracked one during the body, and our own bookkeeping must not be tracked.
_real_lock = _primitives.allocate_lock


@final
class ThreadsCheck(LeakCheck):
    """Threads started by the body are finished when it returns; their exceptions fail it."""

    name = NAME
    description = "threads the body starts end with it, and their exceptions are not lost"

    def watch(self, item: pytest.Item) -> LeakWatch | None:
        watch = super().watch(item)
        if isinstance(watch, ThreadsWatch):
            if backend_of(item) is None:
                # A plain test (--concur-check-all) is watched outside the loop that its
                # plugin (pytest-asyncio, anyio) runs it on, and which that plugin closes later.
                watch.loop_pools_are_loops = True
            watch.later = later_for(item)
            watch.pid = os.getpid()
            watch.body = body_of(item)
        return watch


@final
class ThreadsWatch(LeakWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    # Whether the workers of every event loop's default executor are left to that loop's
    # owner, not only the running loop's: set when a fixture is judged, outside any loop.
    loop_pools_are_loops = False
    # Where the body's leftovers wait for the item's teardown (``_leak.later_for``), and the
    # process that may run them there (a watch sent to a child judges in the child).
    later: list[Callable[[], str | None]] | None = None
    pid = 0
    # The test function's code, where ownership by object stops looking (see ``owner_of``).
    body: Body | None = None

    def record(self) -> _Recording:
        recording = _Recording()
        recording.body = self.body
        return recording

    def verdict(self, state: Recording) -> str | None:
        assert isinstance(state, _Recording)
        with state.lock:
            if not state.started and not state.errors and not state.executors:
                return None  # the common case: the body started nothing
        ignored = _loop_executor()
        later = self.later if self.pid == os.getpid() else None
        problems = []
        if later is not None and any(_running(state, ignored, self.loop_pools_are_loops)):
            # A fixture torn down later may stop them: judged after the item's teardown.
            later.append(functools.partial(self._after_teardown, state, ignored))
        else:
            problems.extend(self._leaks(state, ignored))
        with state.lock:
            errors = list(state.errors)
        problems.extend(
            f"pytest-concur: an exception was raised in thread {name!r} started at {site} "
            f"(nobody joined it to see it)\n{text.rstrip()}"
            for name, site, text in errors
        )
        return "\n\n".join(problems) or None

    def _after_teardown(self, state: _Recording, ignored: object) -> str | None:
        return "\n\n".join(self._leaks(state, ignored, after_teardown=True)) or None

    def _leaks(self, state: _Recording, ignored: object, after_teardown: bool = False) -> list[str]:
        """Reports of the threads and pools still running after the grace period."""
        loop_pools = self.loop_pools_are_loops
        leaked, pools = _running(state, ignored, loop_pools)
        if leaked:
            settle(lambda: any(t.is_alive() for t, _ in leaked), self.grace)
            leaked, pools = _running(state, ignored, loop_pools)
        problems = []
        leaked = [
            (t, r) for t, r in leaked if not self.allow.allows(NAME, (t.name, r.target), r.site)
        ]
        if leaked:
            problems.append(_leak_report(leaked, self.owner, after_teardown))
            from pytest_concur import _locks, _shutdown

            # Reported; if one never ends, it must not hold the interpreter open at exit,
            # nor stand for a thread that might end a later test's wait.
            _shutdown.guard(t for t, _ in leaked)
            _locks.note_left_behind(t for t, _ in leaked)
        open_pools = [
            (executor, workers)
            for executor, workers in pools.items()
            if not all(self.allow.allows(NAME, (t.name, r.target), r.site) for t, r in workers)
        ]
        if open_pools:
            problems.append(self._close_pools(open_pools, after_teardown))
        return problems

    def _close_pools(
        self,
        pools: list[tuple[Any, list[tuple[threading.Thread, _Started]]]],
        after_teardown: bool = False,
    ) -> str:
        lines = [
            f"pytest-concur: {self.owner.subject} left {plural(len(pools), 'thread pool')} open"
            + (_AFTER_TEARDOWN if after_teardown else "")
        ]
        stuck: list[threading.Thread] = []
        for executor, workers in pools:
            first = workers[0][1]
            prefix = workers[0][0].name.rsplit("_", 1)[0]
            lines.append(
                f"  {type(executor).__name__} {prefix!r} with "
                f"{plural(len(workers), 'worker thread')}, created at {first.site}, "
                "was never shut down"
            )
            try:
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception as exc:  # pragma: no cover - a broken executor subclass
                lines.append(f"  (shutting it down failed: {exc!r})")
            stuck.extend(t for t, _ in workers)
        settle(lambda: any(t.is_alive() for t in stuck), self.grace)
        still = [t.name for t in stuck if t.is_alive()]
        lines.append(
            "  pytest-concur shut it down (pending work cancelled). Use the executor as a "
            "context manager (with ThreadPoolExecutor() as pool: ...) or call shutdown()"
            + (_OR_A_FIXTURE if after_teardown else ".")
        )
        if still:
            lines.append(
                f"  Still busy and left running: {', '.join(still)} (a worker cannot be "
                "stopped while its task runs)."
            )
        return "\n".join(lines)


@final
class _Started:
    __slots__ = ("site", "target")

    def __init__(self, target: str, site: Site) -> None:
        self.target = target
        self.site = site


class _Recording:
    """The process-wide hooks of one watch, and what they saw."""

    def __init__(self) -> None:
        self.lock = _real_lock()
        self.active = True
        # The body's thread and every thread started from the family: the threads whose
        # children are recorded.
        self.family: set[threading.Thread] = {threading.current_thread()}
        self.started: dict[threading.Thread, _Started] = {}
        self.errors: list[tuple[str, Site, str]] = []
        # Thread pools the family created: only their workers are judged as pools.
        self.executors: list[tuple[weakref.ref[Any], Site]] = []
        # Installed with the first thread recorded: most bodies start none.
        self._hook: Any = None
        self._previous_hook: Any = None
        self._unhook: Callable[[], bool] | None = None  # undoes our excepthook (_patches)
        self._stop_listening = _listen(self)

    def _on_start(self, thread: threading.Thread) -> None:
        if self.active:
            self._record(thread)

    def _on_executor(self, executor: Any, result: None) -> None:
        with self.lock:
            if not self.active or threading.current_thread() not in self.family:
                return
        site = here()
        owner: _Recording = self._owner_of((executor,)) or self
        with owner.lock:
            owner.executors.append((weakref.ref(executor), site))

    def _owner_of(self, things: tuple[object, ...]) -> Lineage | None:
        """The fixture a thread or pool the family starts belongs to, if not the body.

        A body's recording hands what the methods of a fixture's objects start to that
        fixture's lineage (see ``owner_of``); a lineage keeps all it sees.
        """
        return None if isinstance(self, Lineage) else owner_of(things, self.body)

    def created(self) -> dict[Any, Site]:
        """The thread pools the family created that still exist, with where."""
        with self.lock:
            executors = list(self.executors)
        return {executor: site for ref, site in executors if (executor := ref()) is not None}

    def _record(self, thread: threading.Thread) -> None:
        with self.lock:
            if threading.current_thread() not in self.family:
                return
        started = _Started(_target_name(thread), here())
        owner = self._owner_of((thread, *_bound_to(getattr(thread, "_target", None))))
        if owner is not None:
            owner.adopt(thread, started)
            return
        with self.lock:
            self.family.add(thread)
            self.started[thread] = started
            first = self._hook is None
            if first:
                self._hook = self._excepthook
        if first and self.catches_exceptions:
            self._previous_hook = threading.excepthook
            self._unhook = _patches.swap_many([(threading, "excepthook", self._hook)])

    # A fixture's lineage leaves its threads' exceptions to pytest.
    catches_exceptions = True
    body: Body | None = None

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        with self.lock:
            started = self.started.get(args.thread) if args.thread is not None else None
            active = self.active
        if started is None or not active or _is_deadlock_error(args.exc_value):
            self._previous_hook(args)
            return
        exc = args.exc_value
        if exc is None:  # pragma: no cover - CPython always passes the exception
            text = "".join(traceback.format_exception_only(args.exc_type, exc))
        else:
            text = format_exception(exc)
        name = args.thread.name if args.thread is not None else "?"
        with self.lock:
            self.errors.append((name, started.site, text))

    def threads(self) -> list[tuple[threading.Thread, _Started]]:
        with self.lock:
            return list(self.started.items())

    def close(self) -> None:
        """Stop listening; the excepthook goes back unless someone replaced ours since."""
        with self.lock:
            self.active = False
        self._stop_listening()
        unhook, self._unhook = self._unhook, None
        if unhook is not None and unhook():
            self._hook = self._previous_hook = None  # the bound method would hold us


# -- lineages: the threads that act for a fixture, followed for as long as it lives --------
#
# A fixture's recording lives from its setup to its teardown, across the tests that use it,
# while bodies come and go with recordings of their own. It listens to Thread.start like a
# body's recording, but installs no excepthook: exceptions of a fixture's threads stay
# pytest's to report, as before. A thread joins a lineage when a member starts it; the
# thread that sets the fixture up is a member only while the fixture's own code runs
# (``enter`` / ``leave``).

_lineages_lock = _real_lock()
_LINEAGES: list[Lineage] = []


@final
class Lineage(_Recording):
    """A fixture's threads: the ones its code starts, and the ones those start."""

    catches_exceptions = False

    def __init__(self) -> None:  # no super().__init__(): not the body's
        self.lock = _real_lock()
        self.active = True
        self.family = set()
        self.started = {}
        self.errors = []
        self.executors = []
        # The fixture's value, once set up (see ``own``).
        self.values: list[object] = []
        # The fixture's recordings of the other checks, by check name: what a body's
        # recording hands over when a method of the fixture's objects starts it.
        self.takers: dict[str, Recording] = {}
        self._hook = self._previous_hook = None
        with _lineages_lock:
            _LINEAGES.append(self)
        self._stop_listening = _listen(self)

    def own(self, value: object) -> None:
        """What the fixture returned or yields: what its methods start is the fixture's."""
        with self.lock:
            if self.active:
                self.values.append(value)

    def adopt(self, thread: threading.Thread, started: _Started) -> None:
        """A thread started on behalf of the fixture's objects: a member from now on."""
        with self.lock:
            self.family.add(thread)
            self.started[thread] = started

    def enter(self) -> None:
        """The calling thread acts for the fixture (its setup or teardown runs)."""
        with self.lock:
            self.family.add(threading.current_thread())

    def leave(self) -> None:
        """The calling thread no longer acts for the fixture."""
        with self.lock:
            self.family.discard(threading.current_thread())

    def acting(self) -> bool:
        """Whether the calling thread acts for the fixture."""
        with self.lock:
            return self.active and threading.current_thread() in self.family

    def close(self) -> None:
        with self.lock:
            self.active = False
            self.values.clear()
            self.takers.clear()
        self._stop_listening()
        with _lineages_lock:
            if self in _LINEAGES:
                _LINEAGES.remove(self)


def _target_name(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)
    return callable_name(target) if target is not None else f"{type(thread).__qualname__}.run"


def _listen(recording: _Recording) -> Any:
    return _patches.listen_many(
        (
            (_patches.THREAD_START, recording._on_start),
            (_patches.THREAD_POOL_INIT, recording._on_executor),
        )
    )


def acting_for_a_fixture() -> bool:
    """Whether the calling thread belongs to a live fixture's lineage."""
    with _lineages_lock:
        lineages = list(_LINEAGES)
    return any(lineage.acting() for lineage in lineages)


# -- ownership by object: what a fixture's objects start is the fixture's ---------------------
#
# A fixture's value (an executor, an observer, an actor system) may start its worker on
# first use, inside whichever test uses it first, and stop it at the fixture's teardown.
# The rule: a thread or pool started while a method of an object the fixture owns is on
# the starting stack (``self`` of a frame, the thread itself, the object its target is bound
# to) belongs to that fixture. An object is the fixture's when it is the fixture's value or
# reachable from it in a few steps (attributes, slots, containers, bound methods): what the
# fixture made and kept. What a test body builds itself reaches no fixture's value, so a
# body that abandons its own worker is still the body's fault. The walk of what a fixture's
# value reaches is ``_reach``'s.

# Frames never acting for a user's object: ours and pytest's machinery around the body.
_MACHINERY = tuple(
    os.path.join(os.path.dirname(module.__file__ or ""), "")
    for module in (pytest_concur, pluggy, _pytest)
)


def owner_of(things: tuple[object, ...] = (), body: Body | None = None) -> Lineage | None:
    """The live fixture that owns ``things`` or an object acting on the calling stack.

    The stack is read from the start call up to the test function (``body``): what calls
    the test (a runner fixture's event loop, the backend) does not act for it.
    """
    with _lineages_lock:
        lineages = [lineage for lineage in _LINEAGES if lineage.values]
    if not lineages:
        return None  # the common case outside fixtures: nothing to walk
    candidates = {id(thing): thing for thing in things}
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if body is not None and (code.co_filename, code.co_firstlineno) == body:
            break
        if (
            code.co_argcount
            and code.co_varnames[0] == "self"
            and not code.co_filename.startswith(_MACHINERY)
        ):
            me = frame.f_locals.get("self")
            candidates[id(me)] = me
        frame = frame.f_back
    # The innermost fixture first: it was set up last, and it is torn down first.
    for lineage in reversed(lineages):
        with lineage.lock:
            values = list(lineage.values)
        if any(id(value) in candidates for value in values):
            return lineage
    budget = [_BUDGET]  # shared by all the fixtures: the cost of one start is bounded
    for lineage in reversed(lineages):
        with lineage.lock:
            values = list(lineage.values)
        if _reaches(values, candidates, budget):
            return lineage
    return None


def started_for_a_fixture(thread: threading.Thread) -> Site | None:
    """Where a live fixture's lineage started ``thread``, if one did."""
    with _lineages_lock:
        lineages = list(_LINEAGES)
    for lineage in lineages:
        with lineage.lock:
            started = lineage.started.get(thread)
        if started is not None:
            return started.site
    return None


def _running(
    state: _Recording, ignored: object, loop_pools: bool = False
) -> tuple[
    list[tuple[threading.Thread, _Started]],
    dict[Any, list[tuple[threading.Thread, _Started]]],
]:
    """Threads still alive: plain recorded ones, and workers of executors left open.

    A worker belongs to its executor: it is judged with it, and only if the owner created
    the executor. A pool made before (a library's module-level one, a fixture's) starts
    its workers when first used, and they are meant to outlive the test.
    """
    leaked: list[tuple[threading.Thread, _Started]] = []
    created = state.created()
    pools: dict[Any, list[tuple[threading.Thread, _Started]]] = {}
    for executor, site in created.items():
        if (
            executor is ignored
            or (loop_pools and _is_loop_executor(executor))
            or getattr(executor, "_shutdown", False)
            or _claimed(executor)
        ):
            continue
        # An executor nobody shut down keeps its idle workers forever: no use waiting.
        workers = [t for t in list(getattr(executor, "_threads", ())) if t.is_alive()]
        if workers:
            pools[executor] = [(t, _Started(_target_name(t), site)) for t in workers]
    for thread, started in state.threads():
        if (
            not thread.is_alive()
            or _belongs_to_processes(thread)
            or _claimed(thread)
            or _process_wide(thread)
        ):
            continue
        executor = _executor_of(thread)
        if executor is not None and (executor not in created or executor in pools):
            continue  # not the owner's pool, or one reported as a pool
        if executor is not None and (
            executor is ignored or (loop_pools and _is_loop_executor(executor))
        ):
            continue
        leaked.append((thread, started))  # a plain thread, or a worker finishing its work
    return leaked, pools


def _is_deadlock_error(exc: BaseException | None) -> bool:
    # The deadlock check raises it in threads to unblock them, and reports the deadlock
    # itself; the hook it installed before ours keeps quiet about it.
    from pytest_concur._errors import DeadlockError

    return isinstance(exc, DeadlockError)


# What a report of leftovers judged after the item's teardown adds: no fixture stopped them.
_AFTER_TEARDOWN = ", still after its fixtures' teardown"
_OR_A_FIXTURE = (
    "; or let a fixture own it (made by the fixture, or started by the fixture's objects) "
    "and end it in the fixture's teardown."
)


def _leak_report(
    leaked: list[tuple[threading.Thread, _Started]],
    owner: Owner = TEST,
    after_teardown: bool = False,
) -> str:
    lines = [
        f"pytest-concur: {owner.subject} left {plural(len(leaked), 'thread')} running"
        + (_AFTER_TEARDOWN if after_teardown else "")
    ]
    for thread, started in leaked:
        daemon = ", daemon" if thread.daemon else ""
        lines.append(
            f"  Thread {thread.name!r} (target={started.target}{daemon}) started at {started.site.with_test_line()}"
        )
    them, are = ("it", "it is") if len(leaked) == 1 else ("them", "they are")
    when = "" if owner is TEST else f" {owner.until}"  # a test's message stays as it was
    if after_teardown:
        lines.append(
            f"  Python cannot stop a thread from outside, so {are} left running. Make "
            f"{owner.who} stop and join {them}, or start {them} from a fixture's objects and "
            f"stop {them} in that fixture's teardown (a fixture owns what its objects start), "
            f'or allow {them}: @pytest.mark.concur_allow(threads=["{leaked[0][0].name}"]).'
        )
        return "\n".join(lines)
    lines.append(
        f"  Python cannot stop a thread from outside, so {are} left running. Make {owner.who} "
        f"stop and join {them}{when}, or allow {them}: "
        f'@pytest.mark.concur_allow(threads=["{leaked[0][0].name}"]).'
    )
    return "\n".join(lines)


# -- for the concur fixture (pytest_concur/_workers/) -----------------------------------------


def _claimed(thing: object) -> bool:
    # The concur fixture reports its workers' threads itself, and expect_clean() what its
    # block left: one report each. Not imported when it never ran: nothing is claimed then.
    claims = sys.modules.get("pytest_concur._workers._claims")
    return claims is not None and bool(claims.claimed(thing))


def recorded(state: Recording) -> list[threading.Thread]:
    """The threads a recording saw started."""
    assert isinstance(state, _Recording)
    return [thread for thread, _ in state.threads()]


def busy(state: Recording) -> bool:
    """Whether a thread the verdict would give the grace period still runs."""
    assert isinstance(state, _Recording)
    leaked, _ = _running(state, _loop_executor())
    return any(thread.is_alive() for thread, _ in leaked)


ThreadsCheck.watch_type = ThreadsWatch
