"""The ``process`` backend: the body runs in a child process; its outcome comes back.

Only the test call runs in the child. Fixtures are set up and torn down in the pytest
process as usual, once, and their values are handed to the child: under ``fork`` (the
default on Linux) the child simply has them, as it has the whole test process; under
``spawn`` and ``forkserver`` they are pickled, and one that cannot be is an error naming the
fixture. The child renders a failure with pytest's own machinery, where the frames are, and
sends the rendering back (see ``_child``). The job and the verdict from the children's
outcomes are made by ``jobs``, the same pieces that out-of-process backends of other
packages use through the public API.

No child outlives its test: whatever ends the wait (the body finished, a crash, a timeout
raised by pytest-timeout, ^C), the child is sent SIGTERM, given a grace period so coverage
and ``finally`` blocks can finish, then SIGKILL, and reaped.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import pytest

from pytest_concur._backends import jobs
from pytest_concur._backends.base import BodyCall
from pytest_concur._backends.jobs import ChildFailure as ChildFailure

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from pytest_concur._backends import _child

# What runs and watches a child (_child, _hang: asyncio, the lock tracker) is imported by the
# functions that use it: every session makes a ProcessBackend, few run a test under it.

START_METHODS = ("auto", "fork", "forkserver", "spawn")
START_METHOD_OPTION = "--concur-start-method"
START_METHOD_INI = "concur_start_method"
# How long a child gets between SIGTERM and SIGKILL.
TERMINATE_GRACE = 2.0


def start_method(config: pytest.Config) -> str:
    """The start method chosen by option or ini (``auto`` by default); a usage error if unknown."""
    option = config.getoption("concur_start_method")
    value = option or config.getini(START_METHOD_INI)
    method = str(value or "auto")
    if method not in START_METHODS:
        where = START_METHOD_OPTION if option else f"the {START_METHOD_INI} ini key"
        raise pytest.UsageError(
            f"unknown start method {method!r} for the process backend (in {where}); "
            f"choose one of: {', '.join(START_METHODS)}."
        )
    return method


def resolve_auto() -> tuple[str, str]:
    """What ``auto`` means right now, and why.

    ``fork`` gives the child the test process as it is: nothing to pickle, failures
    rendered exactly as in a plain run. It is unsafe while another thread of the program
    runs (a lock it holds at fork time stays held in the child), so ``auto`` forks only
    while Python's ``threading`` module knows no thread but this one, and uses
    ``forkserver`` otherwise. Threads it does not know are the harness's or a C library's
    (pytest-xdist's execnet I/O thread, faulthandler's watchdog for
    ``faulthandler_timeout``): they do not run the test's Python code, and forking past
    them is what fork-based test runners have always done. ``spawn`` where there is no
    safe fork at all.

    Nor do the threads an earlier test was failed for leaving running (a leak, or a body
    given up on at its deadline) count: otherwise one such test would switch every later
    ``[process]`` item to forkserver, and a test's outcome would depend on the order the
    tests ran in.
    """
    from pytest_concur import _locks

    if sys.platform == "darwin" or not hasattr(os, "fork"):
        return "spawn", "fork is not available or not safe on this platform"
    me = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not me and not _locks.left_behind(t)]
    if not others:
        return "fork", ""
    names = ", ".join(t.name for t in others)
    return "forkserver", (
        f"the test process runs {len(others) + 1} threads ({names}), "
        "which makes fork unsafe, so the child was started with forkserver"
    )


@final
class ProcessBackend:
    """Run each test body in a child process started with the configured start method."""

    name = "process"
    description = "the test body runs in a child process (see --concur-start-method)"

    def __init__(self, config: pytest.Config) -> None:
        # Checked here, at session start, so a bad value is a usage error up front.
        self.start_method = start_method(config)

    def start(self, item: pytest.Item) -> _ProcessRunner:
        method, why = self.start_method, ""
        if method == "auto":
            method, why = resolve_auto()
        return _ProcessRunner(
            item, method, why, harness=method == "fork" and self.start_method == "auto"
        )


@final
class _ProcessRunner:
    def __init__(self, item: pytest.Item, method: str, why: str, *, harness: bool) -> None:
        self._item = item
        self._method = method
        self._why = why
        # auto chose fork although the harness's own threads run: its warning is not news.
        self._quiet_fork = harness
        self._processes: list[BaseProcess] = []
        # The copies whose crash faulthandler dumped (into the captured stderr).
        self._dumped: set[int] = set()

    def run(self, call: BodyCall) -> None:
        __tracebackhide__ = True  # the plugin's frames are not the user's
        import multiprocessing
        import multiprocessing.connection

        job = jobs.new_job(call)
        method = self._method
        ctx: Any = multiprocessing.get_context(method)
        if method == "forkserver":
            # Paid once per session, by the server, instead of once per child.
            ctx.set_forkserver_preload(["pytest_concur._backends._child"])
        # Stress mode (see pytest_concur._stress): one child per copy, each with its own
        # worker_index, all let go at once by one event once every child has started.
        count = call.workers
        go = ctx.Event() if count > 1 else None
        children: list[tuple[BaseProcess, Any, tuple[Path, Path] | None]] = []
        outcomes: list[_child.Outcome | None] = []
        from pytest_concur import _stress

        if method != "fork":
            _stress.warn_hooks_not_called(self._item, method)
        # Each copy's own worker_index and tmp_path (made here, before any child starts).
        copies = jobs.copies(job, count, _stress.copies_kwargs)
        with tempfile.TemporaryDirectory(prefix="concur-") as tmp:
            ended = False
            waiting = False
            try:
                for index, copy in enumerate(copies):
                    children.append(self._start_child(ctx, copy, call, Path(tmp), index, go))
                if go is not None:
                    go.set()
                waiting = True
                for process, reader, _ in children:
                    outcomes.append(_receive(process, reader, multiprocessing.connection.wait))
                ended = True
            except BaseException as exc:
                if waiting and count > 1:
                    # A timeout or ^C ended the wait: say which copies it cut short.
                    running = [(i, p.pid) for i, (p, _, _) in enumerate(children) if p.is_alive()]
                    _stress.note_unfinished(exc, running, count)
                raise
            finally:
                for index, (process, reader, streams) in enumerate(children):
                    reader.close()
                    if ended:
                        # It sent its outcome or closed the pipe: it is on its way out. Let
                        # it finish, so coverage and multiprocessing's own cleanups in the
                        # child save their work, and so its real exit status is what we
                        # report.
                        process.join(TERMINATE_GRACE)
                    else:
                        _dump_stacks(process, Path(tmp, f"stacks{index}"))
                    _stop(process)
                    if streams is not None:
                        jobs.forward(streams[0].read_text(errors="replace"), sys.stdout)
                        jobs.forward(streams[1].read_text(errors="replace"), sys.stderr)
                    if _forward_crash_dump(process, Path(tmp, f"crash{index}")):
                        self._dumped.add(index)
        processes = [process for process, _, _ in children]
        dumped = self._dumped
        jobs.verdict(
            self._item,
            outcomes,
            lost=lambda i: _crash_message(processes[i], self._item, i in dumped),
            lost_key=lambda i: ("crash", str(processes[i].exitcode), ""),
        )

    def _start_child(
        self,
        ctx: Any,
        job: _child.Job,
        call: BodyCall,
        tmp: Path,
        index: int,
        go: Any,
    ) -> tuple[BaseProcess, Any, tuple[Path, Path] | None]:
        """Start one child running ``job``; its process, pipe end and output files."""
        __tracebackhide__ = True  # the plugin's frames are not the user's
        from pytest_concur import _hang
        from pytest_concur._backends import _child

        config = self._item.config
        method, why = self._method, self._why
        reader, writer = ctx.Pipe(duplex=False)
        stacks = Path(tmp, f"stacks{index}")
        stacks.touch()
        crash = Path(tmp, f"crash{index}")
        crash.touch()
        job = dataclasses.replace(
            job,
            stack_path=str(stacks),
            crash_path=str(crash) if faulthandler.is_enabled() else None,
        )
        if method == "fork":
            # The child has the parent's memory: nothing needs pickling on the way in,
            # and it has the item, so failures render exactly as in a plain run.
            args: tuple[Any, ...] = (job, writer, self._item, None)
            streams: tuple[Path, Path] | None = None
        else:
            streams = (Path(tmp, f"stdout{index}"), Path(tmp, f"stderr{index}"))
            for path in streams:
                path.touch()
            capture = config.getoption("capture", "fd") != "no"
            boot = _child.Bootstrap(
                sys_path=list(sys.path),
                cwd=os.getcwd(),
                modules=jobs.pytest_imported_modules(config),
                stdout_path=str(streams[0]) if capture else None,
                stderr_path=str(streams[1]) if capture else None,
            )
            job.warning_filters = jobs.picklable_filters()
            args = (_pickle_job(job, call, method, why), writer, None, boot)
        if go is not None:
            args = (*args, go)
        name = f"concur-{self._item.name}" + (f"-copy{index}" if go is not None else "")
        process = ctx.Process(target=_child.main, args=args, name=name, daemon=False)
        self._processes.append(process)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns when forking a process that has threads. Under auto
                # we only fork with the harness's own threads around (see resolve_auto),
                # which is not news to anyone; with fork forced, the threads are the
                # test's, and the warning is theirs to see.
                if self._quiet_fork:
                    warnings.filterwarnings(
                        "ignore", "This process .* is multi-threaded", DeprecationWarning
                    )
                process.start()
        except BaseException:
            reader.close()
            raise
        finally:
            writer.close()
        if process.pid is not None:
            _hang.register_stack_file(process.pid, str(stacks))
        return process, reader, streams

    def close(self) -> None:
        processes, self._processes = self._processes, []
        for process in processes:
            _stop(process)


def _receive(
    process: BaseProcess, reader: Any, wait: Callable[..., list[Any]]
) -> _child.Outcome | None:
    """Wait for the child's outcome; ``None`` if it ended without sending one."""
    __tracebackhide__ = True  # the plugin's frames are not the user's
    from pytest_concur._backends import _child

    while True:
        ready = wait([reader, process.sentinel])
        if reader in ready:
            try:
                data = reader.recv_bytes()
            except EOFError:
                return None
            outcome = pickle.loads(data)
            assert isinstance(outcome, _child.Outcome)
            return outcome
        if process.sentinel in ready and not reader.poll():
            return None


def _dump_stacks(process: BaseProcess, stacks: Path) -> None:
    """Ask a child we are giving up on (^C, another plugin's timeout) to print its stacks.

    pytest-concur's own deadline has them in its report already.
    """
    from pytest_concur import _hang

    pid = process.pid
    if _hang.DUMP_SIGNAL is None or pid is None or _hang.reported(pid):
        return
    if not process.is_alive():
        return
    text = _hang.ask_for_stacks(pid, str(stacks), 1.0)
    if text:
        print(
            f"pytest-concur: the child process (pid {pid}) was still running; its threads' "
            f"stacks follow:\n{text}",
            file=sys.stderr,
            flush=True,
        )


def _stop(process: BaseProcess) -> None:
    """End the child and what it started: SIGTERM, a grace period, SIGKILL; then reap it.

    The child's own children would be orphans that outlive the session: they are ended too
    (on Linux, where /proc tells who they are).
    """
    from pytest_concur import _hang

    pid = process.pid
    if pid is None:
        return  # never started: a deadline struck while it was being started
    below = _hang.descendants(pid) if process.is_alive() else []
    if process.is_alive():
        process.terminate()
        process.join(TERMINATE_GRACE)
        if process.is_alive():
            process.kill()
    process.join()
    _hang.forget_stack_file(pid)
    # A child that died (SIGKILL, a crash) before it ended its own children left them
    # to init, where /proc no longer says whose they are; its process group does.
    _end_group(pid)
    _end_orphans(below)


def _end_group(pgid: int) -> None:
    """End what is left of the process group the child led (its children and theirs).

    The group cannot outlive its last member, and Linux does not hand out a pid that is
    still some group's id, so ``pgid`` names the child's group as long as it exists.
    """
    if not hasattr(os, "killpg"):  # pragma: no cover - not POSIX
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        try:
            os.killpg(pgid, sig)
        except OSError:  # no such group: nothing was left (or it never formed one)
            return
        deadline = time.monotonic() + TERMINATE_GRACE
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.02)


def _end_orphans(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except OSError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + TERMINATE_GRACE
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _exists(pid)]
            if alive:
                time.sleep(0.02)
        pids = alive


def _exists(pid: int) -> bool:
    """Whether ``pid`` is still a live process (not ours to reap: it is another's child)."""
    from pytest_concur import _hang

    fields = _hang.proc_stat(pid)
    return fields is not None and bool(fields) and fields[0] != "Z"


def _crash_message(process: BaseProcess, item: pytest.Item, dumped: bool) -> str:
    from pytest_concur._checks._where import how_it_ended

    how = how_it_ended(process.exitcode)
    if item.config.getoption("capture", "fd") == "no":
        where = "went to the terminal as it came (-s)"
        dump = ", and faulthandler's dump of its threads at the crash after it"
    else:
        where = 'is in the "Captured stdout call" and "Captured stderr call" sections below'
        dump = ", and faulthandler's dump of its threads at the crash at the end of its stderr"
    if not dumped:
        dump = ""
    return (
        f"the child process (pid {process.pid}) running {item.nodeid} {how} before it "
        "reported an outcome: the body crashed the interpreter, called os._exit(), or was "
        f"killed. Its output so far, if any, {where}{dump}."
    )


def _forward_crash_dump(process: BaseProcess, path: Path) -> bool:
    """Put faulthandler's dump of a child's crash, if any, in this test's stderr.

    Trimmed to the user's frames: without the plugin's, pytest's, multiprocessing's and
    (under fork) the parent's stack the child was forked in. True if there was a dump.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    if not text.strip():
        return False
    from pytest_concur._stacks import filter_dump

    lines = [
        line
        for line in filter_dump(text).splitlines()
        # The C extensions loaded: one long line of module names, no help here.
        if not line.startswith("Extension modules:")
    ]
    body = "\n".join(lines).strip("\n")
    jobs.forward(
        f"pytest-concur: the child process (pid {process.pid}) crashed:\n{body}\n", sys.stderr
    )
    return True


def _pickle_job(job: _child.Job, call: BodyCall, method: str, why: str) -> bytes:
    """Pickle the job for a fresh interpreter, naming the first value that cannot go."""
    reason = f" ({why})" if why else ""
    return jobs.pickle_job(
        job,
        call,
        where=f"the child process (start method {method}{reason})",
        fix=f"use {START_METHOD_OPTION}=fork so the child inherits it, or ",
        function_fix="Under spawn and forkserver the child imports the test by module and "
        f"name, so it must be defined at module or class level. Use {START_METHOD_OPTION}="
        "fork, or move the test function to module level.",
    )
