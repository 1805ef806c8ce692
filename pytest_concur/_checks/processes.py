"""The ``processes`` check: child processes and process pools the body leaves behind.

Design. From ``begin`` to ``end`` (where the body runs), and stopped in ``end`` whatever
happens, these are listened to (``pytest_concur._patches``) to record what the body starts
and where:

- ``multiprocessing.process.BaseProcess.start``: each process, with its target wrapped so
  that an exception in the child leaves its formatted traceback in a file the parent reads
  (the child's own stderr only says it to whoever reads the captured output);
- ``BaseProcess.exitcode``: reading it counts as having checked the exit status, and so
  does stopping the process (``terminate()``, ``kill()``): its exit code is then expected;
- ``subprocess.Popen.__init__``: each command started;
- ``multiprocessing.pool.Pool.__init__`` and ``ProcessPoolExecutor.__init__``: each pool.

At ``end``: a process still alive after the grace period (``concur_leak_grace``) is a leak;
it is sent SIGTERM, then SIGKILL, and reaped. One that exited with an error (a positive exit
code) that nobody looked at (a ``Process`` whose ``exitcode`` was never read, a ``Popen``
never waited for) fails the test with the child's traceback when there is one. A pool never
closed or shut down is reported and terminated; its workers are the pool's, not reported
one by one (nor are its helper threads, by the ``threads`` check).

Invariant: the recording state is only touched under its own lock.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur import _patches
from pytest_concur._checks._leak import TEST, LeakCheck, LeakWatch, Owner, Recording
from pytest_concur._checks._where import Site, callable_name, here, plural, settle
from pytest_concur._primitives import allocate_lock as _real_lock

if TYPE_CHECKING:
    import subprocess
    from multiprocessing.process import BaseProcess

NAME = "processes"
# How long a leaked child gets between SIGTERM and SIGKILL.
_TERMINATE_GRACE = 1.0
# Targets of pool workers: the pool is reported, not each of its workers.
_POOL_WORKER_MODULES = ("multiprocessing.pool", "concurrent.futures.process")


@final
class ProcessesCheck(LeakCheck):
    """Child processes and pools started by the body are over, and their errors seen."""

    name = NAME
    description = (
        "child processes and process pools the body starts end with it, and their errors are seen"
    )

    def watch(self, item: pytest.Item) -> LeakWatch | None:
        watch = super().watch(item)
        if isinstance(watch, ProcessesWatch):
            from pytest_concur._checks._reach import body_of

            watch.body = body_of(item)
        return watch


@final
class ProcessesWatch(LeakWatch):
    """Watches one run of a body; plain data until ``begin`` (it may be pickled)."""

    # The test function's code, where ownership by object stops looking (threads.owner_of).
    body: tuple[str, int] | None = None

    def record(self) -> _Recording:
        recording = _Recording()
        recording.body = self.body
        return recording

    def verdict(self, state: Recording) -> str | None:
        assert isinstance(state, _Recording)
        with state.lock:
            children = list(state.children)
            pools = list(state.pools)
        if not children and not pools:
            return None  # the common case: the body started nothing
        problems: list[str] = []
        open_pools = [
            (pool, site)
            for pool, site in pools
            if _pool_is_open(pool)
            and not _claimed(pool)
            and not self.allow.allows(NAME, (type(pool).__name__,), site)
        ]
        if open_pools:
            problems.append(_close_pools(open_pools, self.grace, self.owner))
        every = [child for child in children if not child.pool_worker]
        children = [child for child in every if not _claimed(child.handle())]
        for child in children:
            child.snapshot()
        settle(lambda: any(child.alive() for child in children), self.grace)
        leaked = [
            child
            for child in children
            if child.alive() and not self.allow.allows(NAME, child.names(), child.site)
        ]
        if leaked:
            problems.append(_leak_report(leaked, self.owner))
        with state.lock:
            checked = set(state.checked)
        for child in children:
            if child in leaked:
                continue
            problem = child.unchecked_error(checked)
            if problem:
                problems.append(problem)
        for child in every:
            child.forget()
        return "\n\n".join(problems) or None


@final
class _Traced:
    """A process target that leaves the traceback of its exception where the parent reads it."""

    def __init__(self, target: Callable[..., Any], path: str) -> None:
        self.target = target
        self.path = path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.target(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:
            with contextlib.suppress(OSError), open(self.path, "w") as file:
                tb = exc.__traceback__.tb_next if exc.__traceback__ else None
                file.write("".join(traceback.format_exception(type(exc), exc, tb)))
            raise


class _Child:
    """A process the body started: a multiprocessing process or a Popen."""

    def __init__(
        self,
        process: BaseProcess | None,
        popen: subprocess.Popen[Any] | None,
        target: str,
        site: Site,
        traceback_path: str | None,
    ) -> None:
        self.process = process
        self.popen = popen
        self.target = target
        self.site = site
        self.traceback_path = traceback_path
        self.pool_worker = False
        # Whether the test itself reaped the Popen (wait, communicate, poll): looked at first,
        # before this check's own polling reaps it.
        self.reaped_by_test = False

    def snapshot(self) -> None:
        if self.popen is not None:
            self.reaped_by_test = self.popen.returncode is not None

    def alive(self) -> bool:
        if self.process is not None:
            if getattr(self.process, "_popen", None) is None:
                return False
            try:
                return self.process.is_alive()
            except ValueError:  # the test closed it: it had ended
                return False
        assert self.popen is not None
        return self.popen.poll() is None

    def handle(self) -> object:
        """The ``Process`` or the ``Popen``."""
        return self.process if self.process is not None else self.popen

    def names(self) -> tuple[str, ...]:
        if self.process is not None:
            return (self.process.name, self.target)
        return (self.target,)

    def describe(self) -> str:
        if self.process is not None:
            return f"Process {self.process.name!r} (pid {self.process.pid}, target={self.target})"
        assert self.popen is not None
        return f"Process {self.target!r} (pid {self.popen.pid})"

    def stop(self) -> None:
        """SIGTERM, a moment, SIGKILL; then reap."""
        if self.process is not None:
            process = self.process
            process.terminate()
            process.join(_TERMINATE_GRACE)
            if process.is_alive():
                process.kill()
            process.join()
            return
        assert self.popen is not None
        popen = self.popen
        popen.terminate()
        try:
            popen.wait(_TERMINATE_GRACE)
        except Exception:
            popen.kill()
            popen.wait()

    def unchecked_error(self, checked: set[int]) -> str | None:
        """A report of an error exit nobody looked at, or None."""
        if self.process is not None:
            code = _exitcode(self.process)
            if code is None or code <= 0 or id(self.process) in checked:
                return None
            how = f"exited with code {code} and nobody checked its exitcode"
        else:
            assert self.popen is not None
            if self.reaped_by_test:
                return None
            code = self.popen.poll()  # reaps it
            if code is None or code <= 0:
                return None
            how = f"exited with code {code} and nobody waited for it"
        text = self._traceback()
        detail = (
            f"\n{text.rstrip()}"
            if text
            else "\n  Its traceback or message, if it printed one, is in the captured output."
        )
        return f"pytest-concur: child {self.describe()} started at {self.site} {how}{detail}"

    def _traceback(self) -> str:
        if self.traceback_path is None:
            return ""
        try:
            with open(self.traceback_path) as file:
                return file.read()
        except OSError:
            return ""

    def forget(self) -> None:
        if self.traceback_path is not None:
            with contextlib.suppress(OSError):
                os.remove(self.traceback_path)


class _Recording:
    """The hooks of one watch, and what they saw.

    ``acting``, if given, says whether the calling thread acts for the owner (a fixture's
    lineage): only what such threads start is recorded, for as long as the recording is
    open; exit codes are noted whoever reads them.
    """

    def __init__(self, acting: Callable[[], bool] | None = None) -> None:
        self.lock = _real_lock()
        self.active = True
        self._acting = acting
        self.children: list[_Child] = []
        self.pools: list[tuple[Any, Site]] = []
        # ids of the processes whose exitcode the test read.
        self.checked: set[int] = set()
        self._watched: set[int] = set()
        self._stop = _patches.listen_many(
            (
                (_patches.PROCESS_START, self._on_start),
                (_patches.PROCESS_EXITCODE, self._on_exitcode),
                (_patches.PROCESS_TERMINATE, self._on_stopped),
                (_patches.PROCESS_KILL, self._on_stopped),
                (_patches.POPEN_INIT, self._on_popen),
                (_patches.POOL_INIT, self._on_pool),
                (_patches.PROCESS_POOL_INIT, self._on_pool),
            )
        )

    body: tuple[str, int] | None = None

    def _on_start(self, process: BaseProcess) -> None:
        recording = self._taker()
        if recording is not None:
            recording._record_process(process)

    def _on_exitcode(self, process: BaseProcess, code: int) -> None:
        with self.lock:
            if self.active and id(process) in self._watched:
                self.checked.add(id(process))

    def _on_stopped(self, process: BaseProcess, args: object, kwargs: object) -> None:
        # Stopped on purpose (a pool library stopping its workers, whose SIGTERM handler
        # may exit with a code of its own): its exit status is no news.
        self._on_exitcode(process, 0)

    def _on_popen(self, popen: subprocess.Popen[Any], result: None) -> None:
        recording = self._taker()
        if recording is not None:
            recording._record_popen(popen)

    def _on_pool(self, pool: Any, result: None) -> None:
        recording = self._taker()
        if recording is not None:
            site = here()
            with recording.lock:
                recording.pools.append((pool, site))

    def _taker(self) -> _Recording | None:
        """The recording what the calling thread starts now belongs to, if any.

        A fixture's: only what its lineage starts. A body's: what the body starts, except
        what a fixture's thread starts meanwhile, and what a method of a fixture's object
        starts (``threads.owner_of``), which goes to that fixture's recording.
        """
        with self.lock:
            active = self.active
        if not active:
            return None
        if self._acting is not None:
            return self if self._acting() else None
        from pytest_concur._checks.threads import acting_for_a_fixture, owner_of

        if acting_for_a_fixture():
            return None
        lineage = owner_of(body=self.body)
        if lineage is None:
            return self
        taker = lineage.takers.get(NAME)  # None when the fixture's check is off
        return taker if isinstance(taker, _Recording) else None

    def _record_process(self, process: BaseProcess) -> None:
        target = getattr(process, "_target", None)
        path: str | None = None
        traced = target
        if isinstance(traced, _Traced):  # another recording's (expect_clean in a body)
            target, path = traced.target, traced.path
        module = getattr(target, "__module__", None) or ""
        pool_worker = module.startswith(_POOL_WORKER_MODULES)
        name = callable_name(target) if target is not None else f"{type(process).__name__}.run"
        if path is None and target is not None and not pool_worker:
            path = os.path.join(
                tempfile.gettempdir(), f"concur-{os.getpid()}-{os.urandom(6).hex()}.traceback"
            )
            process._target = _Traced(target, path)  # type: ignore[attr-defined]
        child = _Child(process, None, name, here(), path)
        child.pool_worker = pool_worker
        with self.lock:
            self.children.append(child)
            self._watched.add(id(process))

    def _record_popen(self, popen: subprocess.Popen[Any]) -> None:
        args = popen.args
        if isinstance(args, (list, tuple)):
            command = shlex.join(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args)
        else:
            command = os.fsdecode(args) if isinstance(args, bytes) else str(args)
        if len(command) > 100:
            command = command[:97] + "..."
        child = _Child(None, popen, command, here(), None)
        with self.lock:
            self.children.append(child)
            self._watched.add(id(popen))

    def close(self) -> None:
        """Stop listening (once, always)."""
        with self.lock:
            self.active = False
        self._stop()


def _exitcode(process: BaseProcess) -> int | None:
    popen: Any = getattr(process, "_popen", None)
    return None if popen is None else popen.poll()


def _pool_is_open(pool: Any) -> bool:
    if hasattr(pool, "_shutdown_thread"):  # ProcessPoolExecutor
        return not pool._shutdown_thread and bool(pool._processes)
    return getattr(pool, "_state", None) == "RUN"  # multiprocessing.pool.RUN


def _close_pools(pools: list[tuple[Any, Site]], grace: float, owner: Owner = TEST) -> str:
    lines = [f"pytest-concur: {owner.subject} left {plural(len(pools), 'process pool')} open"]
    for pool, site in pools:
        kind = type(pool).__name__
        if hasattr(pool, "_shutdown_thread"):
            workers = list((pool._processes or {}).values())
            lines.append(
                f"  {kind} with {plural(len(workers), 'worker process', 'worker processes')} "
                f"created at {site} was never shut down"
            )
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False, cancel_futures=True)
            settle(lambda: any(w.is_alive() for w in workers), grace)  # noqa: B023
            for worker in workers:
                if worker.is_alive():
                    _stop_process(worker)
        else:
            count = len(getattr(pool, "_pool", ()))
            if kind == "ThreadPool":
                workers_text = plural(count, "worker thread")
            else:
                workers_text = plural(count, "worker process", "worker processes")
            lines.append(f"  {kind} with {workers_text} created at {site} was never closed")
            if not _terminate_within(pool, max(grace, 2.0)):
                lines.append(
                    "  its terminate() got stuck (a lock its workers share is held by a "
                    "process that died, or by a thread of the test still using the pool): "
                    "pytest-concur killed its worker processes"
                )
    lines.append(
        f"  pytest-concur terminated {'it' if len(pools) == 1 else 'them'}. Use the pool as a "
        "context manager "
        "(with Pool() as pool: ...), or close and join it (shutdown() for an executor)."
    )
    return "\n".join(lines)


def _terminate_within(pool: Any, seconds: float) -> bool:
    """``pool.terminate()``, which can block forever, given ``seconds``; whether it ended.

    ``multiprocessing.Pool.terminate`` takes a lock its workers share; when a worker that
    held it died, or a thread of the test still waits on the pool, it never returns. It
    runs in a bare thread of its own (``_thread``: no ``threading.Thread``, which the checks
    would record, and which the interpreter would wait for at exit); if it does not end in
    time, the pool's worker processes are killed instead.
    """
    import _thread

    from pytest_concur import _locks

    ended = _locks._real_allocate_lock()
    ended.acquire()

    def terminate() -> None:
        try:
            with contextlib.suppress(Exception):
                pool.terminate()
        finally:
            ended.release()

    _thread.start_new_thread(terminate, ())
    if ended.acquire(timeout=seconds):
        return True
    for worker in list(getattr(pool, "_pool", ()) or ()):  # private: the pool's processes
        kill = getattr(worker, "kill", None)
        if kill is not None:
            with contextlib.suppress(Exception):
                kill()
    return False


def _stop_process(process: BaseProcess) -> None:
    process.terminate()
    process.join(_TERMINATE_GRACE)
    if process.is_alive():
        process.kill()
    process.join()


def _leak_report(leaked: list[_Child], owner: Owner = TEST) -> str:
    lines = [
        f"pytest-concur: {owner.subject} left "
        f"{plural(len(leaked), 'child process', 'child processes')} running"
    ]
    for child in leaked:
        lines.append(f"  {child.describe()} started at {child.site.with_test_line()}")
        child.stop()
    name = leaked[0].names()[0]
    managers = any(child.target.endswith("Manager._run_server") for child in leaked)
    how = (
        "Shut down every multiprocessing manager (manager.shutdown(), or with "
        "multiprocessing.Manager() as manager: ...) and join or wait for every process"
        if managers
        else "Join or wait for every process"
    )
    lines.append(
        f"  pytest-concur stopped {'it' if len(leaked) == 1 else 'them'} (SIGTERM, then "
        f"SIGKILL after {_TERMINATE_GRACE:g} s). {how} {owner.who} "
        f'starts, or allow it: @pytest.mark.concur_allow(processes=["{name}"]).'
    )
    return "\n".join(lines)


def record_for(acting: Callable[[], bool]) -> Recording:
    """Record what threads acting for an owner start (a fixture's; see ``_Recording``)."""
    return _Recording(acting)


# -- for the concur fixture (pytest_concur/_workers/) -----------------------------------------


def _claimed(thing: object) -> bool:
    # The concur fixture reports its workers' processes itself, and expect_clean() what its
    # block left: one report each. Not imported when it never ran: nothing is claimed then.
    claims = sys.modules.get("pytest_concur._workers._claims")
    return claims is not None and bool(claims.claimed(thing))


def recorded(state: Recording) -> list[object]:
    """The processes (``Process``, ``Popen``) and process pools a recording saw started."""
    assert isinstance(state, _Recording)
    with state.lock:
        return [child.handle() for child in state.children] + [pool for pool, _ in state.pools]


def busy(state: Recording) -> bool:
    """Whether a child the recording saw started still runs; reaps none.

    The verdict tells a ``Popen`` the test waited for from one it did not by whether it was
    reaped: this look must not reap it.
    """
    assert isinstance(state, _Recording)
    with state.lock:
        children = [child for child in state.children if not child.pool_worker]
    for child in children:
        popen = child.popen
        if child.process is not None:
            running = child.alive()
        else:
            running = (
                popen is not None and popen.returncode is None and _unreaped_running(popen.pid)
            )
        if running:
            return True
    return False


def _unreaped_running(pid: int) -> bool:
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # pragma: no cover - not POSIX: assume it runs, the verdict will look
        return True
    try:
        return waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped already
        return False


ProcessesCheck.watch_type = ProcessesWatch
