"""The ``threads`` check: threads the body started are over when it returns, and their
exceptions are seen.

Design. From ``begin`` to ``end`` (where the body runs: the backend's thread, the event
loop's thread, the child process) two process-wide hooks are in place, both taken off in
``end`` whatever happens:

- ``threading.Thread.start`` is listened to (``pytest_concur._hooks``) to record each
  thread started by the body's thread or, transitively, by a thread the body started,
  with the user's frames of the start call. Threads that were running before ``begin``
  (fixtures', the harness's) and threads started by them are never recorded, so they are
  never reported.
- ``threading.excepthook`` (replaced when the first thread is recorded) records the
  exceptions of recorded threads, formatted where they happen, and hands every other
  thread's exception to the hook that was there before.

At ``end``, recorded threads still alive are given the grace period (``concur_leak_grace``)
to finish; those still running then are reported. Python cannot stop a thread, so they are
left running, except the workers of a ``ThreadPoolExecutor`` the body never shut down:
the executor is shut down, which ends its idle workers. Workers of the running loop's
default executor belong to the loop, which its owner shuts down when it closes it; threads
of process pools and multiprocessing queues belong to the ``processes`` check.

Invariant: the recording state is only touched under its own lock; the GIL is not relied on.
"""

from __future__ import annotations

import sys
import threading
import traceback
import weakref
from typing import Any, final

import pytest

from pytest_concur import _hooks
from pytest_concur._checks._leak import TEST, LeakCheck, LeakWatch, Owner, Recording
from pytest_concur._checks._where import (
    Site,
    callable_name,
    format_exception,
    here,
    plural,
    settle,
)
from pytest_concur._state import backend_of

NAME = "threads"
# Taken at import, before any check runs: the deadlock check swaps threading.Lock for a
# tracked one during the body, and our own bookkeeping must not be tracked.
_real_lock = threading.Lock


@final
class ThreadsCheck(LeakCheck):
    """Threads started by the body are finished when it returns; their exceptions fail it."""

    name = NAME
    description = "threads the body starts end with it, and their exceptions are not lost"

    def watch(self, item: pytest.Item) -> LeakWatch | None:
        watch = super().watch(item)
        if isinstance(watch, ThreadsWatch) and backend_of(item) is None:
            # A plain test (--concur-check-all) is watched outside the loop that its plugin
            # (pytest-asyncio, anyio) runs it on, and which that plugin closes later.
            watch.loop_pools_are_loops = True
        return watch


@final
class ThreadsWatch(LeakWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    # Whether the workers of every event loop's default executor are left to that loop's
    # owner, not only the running loop's: set when a fixture is judged, outside any loop.
    loop_pools_are_loops = False

    def record(self) -> _Recording:
        return _Recording()

    def verdict(self, state: Recording) -> str | None:
        assert isinstance(state, _Recording)
        with state.lock:
            if not state.started and not state.errors and not state.executors:
                return None  # the common case: the body started nothing
        ignored = _loop_executor()
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
            problems.append(_leak_report(leaked, self.owner))
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
            problems.append(self._close_pools(open_pools))
        with state.lock:
            errors = list(state.errors)
        problems.extend(
            f"pytest-concur: an exception was raised in thread {name!r} started at {site} "
            f"(nobody joined it to see it)\n{text.rstrip()}"
            for name, site, text in errors
        )
        return "\n\n".join(problems) or None

    def _close_pools(self, pools: list[tuple[Any, list[tuple[threading.Thread, _Started]]]]) -> str:
        lines = [
            f"pytest-concur: {self.owner.subject} left {plural(len(pools), 'thread pool')} open"
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
            "context manager (with ThreadPoolExecutor() as pool: ...) or call shutdown()."
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
        self._stop_listening = _listen(self)

    def _on_start(self, thread: threading.Thread) -> None:
        if self.active:
            self._record(thread)

    def _on_executor(self, executor: Any, result: None) -> None:
        with self.lock:
            if not self.active or threading.current_thread() not in self.family:
                return
        site = here()
        with self.lock:
            self.executors.append((weakref.ref(executor), site))

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
        with self.lock:
            self.family.add(thread)
            self.started[thread] = started
            first = self._hook is None
            if first:
                self._hook = self._excepthook
        if first and self.catches_exceptions:
            self._previous_hook = threading.excepthook
            threading.excepthook = self._hook

    # A fixture's lineage leaves its threads' exceptions to pytest.
    catches_exceptions = True

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
        if self._hook is not None and threading.excepthook is self._hook:
            threading.excepthook = self._previous_hook
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
        self._hook = self._previous_hook = None
        with _lineages_lock:
            _LINEAGES.append(self)
        self._stop_listening = _listen(self)

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
        self._stop_listening()
        with _lineages_lock:
            if self in _LINEAGES:
                _LINEAGES.remove(self)


def _target_name(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)
    return callable_name(target) if target is not None else f"{type(thread).__qualname__}.run"


def _listen(recording: _Recording) -> Any:
    return _hooks.listen_many(
        (
            (_hooks.THREAD_START, recording._on_start),
            (_hooks.THREAD_POOL_INIT, recording._on_executor),
        )
    )


def acting_for_a_fixture() -> bool:
    """Whether the calling thread belongs to a live fixture's lineage."""
    with _lineages_lock:
        lineages = list(_LINEAGES)
    return any(lineage.acting() for lineage in lineages)


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
        if not thread.is_alive() or _belongs_to_processes(thread) or _claimed(thread):
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


def _is_loop_executor(executor: object) -> bool:
    # asyncio names the workers of every loop's default executor so (3.9+); the loop's
    # owner shuts it down when it closes the loop.
    return str(getattr(executor, "_thread_name_prefix", "")).startswith("asyncio")


def _is_deadlock_error(exc: BaseException | None) -> bool:
    # The deadlock check raises it in threads to unblock them, and reports the deadlock
    # itself; the hook it installed before ours keeps quiet about it.
    from pytest_concur._locks import DeadlockError

    return isinstance(exc, DeadlockError)


def _belongs_to_processes(thread: threading.Thread) -> bool:
    # Handler threads of multiprocessing.Pool, feeder threads of multiprocessing queues and
    # ProcessPoolExecutor's manager live as long as their pool: the processes check reports
    # the pool.
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or type(thread).__module__
    return module.startswith(("multiprocessing", "concurrent.futures.process"))


def _executor_of(thread: threading.Thread) -> Any:
    """The ThreadPoolExecutor a worker thread serves, if it is one and it still exists."""
    target = getattr(thread, "_target", None)
    if getattr(target, "__module__", None) != "concurrent.futures.thread":
        return None
    args = getattr(thread, "_args", ())
    reference = args[0] if args else None
    return reference() if isinstance(reference, weakref.ref) else None


def _loop_executor() -> object:
    """The default executor of the loop running in this thread: its owner closes it."""
    if "asyncio" not in sys.modules:
        return None
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return getattr(loop, "_default_executor", None)


def _leak_report(leaked: list[tuple[threading.Thread, _Started]], owner: Owner = TEST) -> str:
    lines = [f"pytest-concur: {owner.subject} left {plural(len(leaked), 'thread')} running"]
    for thread, started in leaked:
        daemon = ", daemon" if thread.daemon else ""
        lines.append(
            f"  Thread {thread.name!r} (target={started.target}{daemon}) started at {started.site}"
        )
    them, are = ("it", "it is") if len(leaked) == 1 else ("them", "they are")
    when = "" if owner is TEST else f" {owner.until}"  # a test's message stays as it was
    lines.append(
        f"  Python cannot stop a thread from outside, so {are} left running. Make {owner.who} "
        f"stop and join {them}{when}, or allow {them}: "
        f'@pytest.mark.concur_allow(threads=["{leaked[0][0].name}"]).'
    )
    return "\n".join(lines)


# -- for the concur fixture (pytest_concur/_workers.py) ---------------------------------------


def _claimed(thing: object) -> bool:
    # The concur fixture reports its workers' threads itself, and expect_clean() what its
    # block left: one report each. Not imported when it never ran: nothing is claimed then.
    workers = sys.modules.get("pytest_concur._workers")
    return workers is not None and bool(workers.claimed(thing))


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
