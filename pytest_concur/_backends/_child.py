"""What runs inside the ``process`` backend's child.

Kept apart from the parent's side and light on imports: under ``spawn`` and ``forkserver``
this module is the child's entry point and everything it imports is paid for per test.

The child runs the body, then sends one :class:`Outcome` back through a pipe: how the body
ended, pytest's own rendering of the failure (made here, where the frames and their locals
still exist), the exception itself when it pickles, the warnings the body raised, and, under
``--capture=sys``, what it printed. The parent turns that into the item's report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import pickle
import signal
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import pytest

from pytest_concur import _locks
from pytest_concur._report import end_at_the_wait
from pytest_concur._watching import run_watched, run_watched_async


@dataclasses.dataclass
class Job:
    """What the child needs to run one body."""

    function: Callable[..., Any]
    kwargs: dict[str, Any]
    nodeid: str
    tbstyle: str
    showlocals: bool
    fulltrace: bool
    verbosity: int
    # The checks' watches, run around the body here in the child (see pytest_concur.Watch).
    watches: list[Any] = dataclasses.field(default_factory=list)
    # Whether the test records warnings itself (pytest's recwarn fixture).
    uses_recwarn: bool = False
    # Only for start methods that do not inherit the parent's memory (spawn, forkserver).
    warning_filters: list[Any] | None = None
    # Which copy of the body this is, and of how many (stress mode; see pytest_concur._stress).
    copy_index: tuple[int, int] = (0, 1)
    # Where the child writes its threads' stacks when the parent asks (DUMP_SIGNAL).
    stack_path: str | None = None
    # Where faulthandler writes if the child crashes (SIGSEGV, SIGABRT...); None when the
    # parent has faulthandler off (-p no:faulthandler). The parent puts the dump, trimmed
    # to the user's frames, in the test's captured stderr.
    crash_path: str | None = None


@dataclasses.dataclass
class Bootstrap:
    """How a fresh interpreter is made to see the modules the parent's pytest imported."""

    sys_path: list[str]
    cwd: str
    # Module name -> (file, whether pytest rewrote its asserts), for the test and conftest
    # modules pytest imported itself, which the child cannot find by a plain import.
    modules: dict[str, tuple[str, bool]]
    stdout_path: str | None
    stderr_path: str | None


@dataclasses.dataclass
class Outcome:
    """How the body ended, in a form that crosses the pipe."""

    passed: bool
    exception: bytes | None = None  # the pickled exception, when it pickles
    type_name: str = ""
    message: str = ""
    longrepr: Any = None  # pytest's rendering of the failure, or a skip's (path, line, reason)
    # pytest's outcome exceptions do not pickle (their __module__ says "builtins"), so they
    # travel as (which, message, pytrace, returncode) and are raised anew on the other side.
    pytest_outcome: tuple[str, str, bool, int | None] | None = None
    warnings: list[tuple[str, bytes | None, str, int]] = dataclasses.field(default_factory=list)
    stdout: str = ""  # only what a ``--capture=sys`` parent could not see through the fd
    stderr: str = ""
    site: str = ""  # file:line that raised, to tell stress-mode copies' failures apart
    # The deadlock check's wait-for graphs (see _locks.note_graphs), for the parent's report.
    graphs: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# The parent sends this when it gives up on the child (a timeout): dump every thread's stack
# to stderr. Its default action is to be ignored, so a child that has not installed the
# handler yet is not killed by it.
DUMP_SIGNAL = getattr(signal, "SIGURG", None)
_STACKS: Any = None  # the open file the stacks go to; faulthandler keeps only its fd
_CRASH: Any = None  # the open file a crash's dump goes to (see _install_crash_dump)
_BODY_PID: int | None = None  # the process that runs the body (not one it forked)
# How long a stress-mode child waits for the others to start before it starts anyway.
GO_TIMEOUT = 30.0
# What a job of pytest_concur.pack_jobs starts with (see _backends.jobs).
JOB_TAG = "pytest-concur job 1"


def main(
    job: Job | bytes,
    conn: Any,
    item: pytest.Item | None,
    boot: Bootstrap | None,
    go: Any = None,
) -> None:
    """The child's entry point: run the job and send back its :class:`Outcome`.

    In stress mode ``go`` is an event shared by the copies' children: each waits for it,
    so that the copies start together.
    """
    # A process group of its own: if this child dies before it can end what it started,
    # the parent still finds its children by the group (see process._stop). The body's
    # stdin is already /dev/null (multiprocessing's bootstrap), so being out of the
    # terminal's foreground group costs nothing; ^C reaches the parent, which ends us.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if boot is not None:
        _bootstrap(boot)
    # Imported here: it cannot be loaded in a subinterpreter, where run_job may run.
    import faulthandler

    if DUMP_SIGNAL is not None:
        # The real stderr (fd 2): under --capture=sys, sys.stderr has no file descriptor.
        with contextlib.suppress(Exception):
            faulthandler.register(DUMP_SIGNAL, file=2, all_threads=True)
    if isinstance(job, bytes):
        job = pickle.loads(job)
    assert isinstance(job, Job)
    if DUMP_SIGNAL is not None and job.stack_path is not None:
        _install_stack_dump(job.stack_path)
    if job.crash_path is not None:
        _install_crash_dump(job.crash_path)
    ready = (lambda: go.wait(GO_TIMEOUT)) if go is not None else None
    outcome = execute(job, item, ready)
    # The interpreter's own streams may hold output echoed to them (--capture=tee-sys);
    # a forked child leaves through os._exit, which would drop their buffers.
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    conn.send_bytes(_dumps(outcome))
    conn.close()


def run_job(job: bytes) -> bytes:
    """Run one job of :func:`pytest_concur.pack_jobs` here; its outcome, for ``raise_outcomes``.

    Call it in the interpreter the job was made for (a fresh ``python`` of the same
    environment, a subinterpreter): it makes the test and conftest modules that the
    parent's pytest imported importable here, then runs the body as the ``process``
    backend's child does: inside the checks' watches, an ``async def`` body on an event
    loop of its own, its warnings recorded and pytest's rendering of a failure made here,
    where the frames are. It does not raise for what the body did: every outcome is in
    the bytes it returns. What the body prints goes to this interpreter's stdout and
    stderr (under pytest's default ``--capture=fd``, a child process that inherited the
    parent's file descriptors is captured with the test).
    """
    tag, boot, data = pickle.loads(job)
    if tag != JOB_TAG or not isinstance(boot, Bootstrap) or not isinstance(data, bytes):
        raise ValueError("run_job was given something that pack_jobs did not make")
    # One finder of the parent's modules, however many jobs this interpreter runs.
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ParentModules)]
    _bootstrap(boot)
    loaded = pickle.loads(data)
    assert isinstance(loaded, Job)
    outcome = execute(loaded)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return _dumps(outcome)


def execute(
    job: Job, item: pytest.Item | None = None, ready: Callable[[], object] | None = None
) -> Outcome:
    """Run ``job`` here and say how it ended, with its warnings and sys-captured output.

    ``item`` is the test item when this process has it (a forked child): the copy hooks
    are then called around the body, and failures rendered by the item itself. ``ready``
    waits for the other copies (stress mode), after the setup hook.
    """
    marks = (_mark(sys.stdout), _mark(sys.stderr))
    # Record the body's warnings to send them back, unless the test records them itself
    # (recwarn): then they are its business, inside the child.
    recording: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext([]) if job.uses_recwarn else warnings.catch_warnings(record=True)
    )
    with recording as caught:
        if job.warning_filters is not None:
            warnings.filters[:] = job.warning_filters  # type: ignore[index]
        try:
            if item is not None:
                # Forked: the item and its hooks are here. The copy hooks run in this child,
                # the setup one before the copies are let go together.
                from pytest_concur._stress import with_copy_hooks

                job.function = with_copy_hooks(item, *job.copy_index, job.function, ready)
                ready = None
            if ready is not None:
                ready()
            _run(job)
        except BaseException as exc:
            outcome = _failure(exc, job, item)
        else:
            outcome = Outcome(passed=True)
    outcome.warnings = [_warning(w) for w in caught or ()]
    outcome.graphs = _locks.take_graphs()
    outcome.stdout, outcome.stderr = _since(sys.stdout, marks[0]), _since(sys.stderr, marks[1])
    return outcome


def _install_stack_dump(path: str) -> None:
    """Answer the parent's DUMP_SIGNAL into ``path``, which its hang report reads.

    Two answers: faulthandler's dump of every thread, written at once from the C signal
    handler whatever the threads are doing; then, when the main thread next runs Python
    code, pytest-concur's own report (the locks each thread holds, the wait it is in, the
    tasks), which the parent prefers when it comes. Appending: processes forked from this
    one inherit both handlers and the file.
    """
    import faulthandler

    global _STACKS, _BODY_PID
    assert DUMP_SIGNAL is not None
    _BODY_PID = os.getpid()
    with contextlib.suppress(Exception):
        _STACKS = open(path, "a")  # noqa: SIM115 - open for the process's life
        # A handler for the child's whole life, not a replaced attribute: not _patches'.
        signal.signal(DUMP_SIGNAL, _report_to_parent)
        faulthandler.register(DUMP_SIGNAL, file=_STACKS, all_threads=True, chain=True)


def _install_crash_dump(path: str) -> None:
    """Send faulthandler's dump of a crash to ``path``, for the parent to report.

    A forked child inherits pytest's faulthandler, which writes to the terminal (a copy of
    the parent's stderr made before capturing began): the dump would land in the progress
    line, with the parent's pytest frames the fork copied.
    """
    import faulthandler

    global _CRASH
    with contextlib.suppress(Exception):
        _CRASH = open(path, "w")  # noqa: SIM115 - open for the process's life
        faulthandler.enable(file=_CRASH, all_threads=True)


def _report_to_parent(signum: int, frame: types.FrameType | None) -> None:
    from pytest_concur import _hang

    with contextlib.suppress(Exception):
        # A process the body forked inherits this handler: its threads are not the body.
        text = _hang.report_in_child(frame, runs_the_body=os.getpid() == _BODY_PID)
        _STACKS.write(f"{_hang.REPORT_START}\n{text}\n{_hang.REPORT_END}\n")
        _STACKS.flush()


def _run(job: Job) -> None:
    if inspect.iscoroutinefunction(job.function):
        from pytest_concur._item_loops import LoopRunner

        runner = LoopRunner()
        try:
            runner.run(run_watched_async(job.watches, job.function, job.kwargs))
        except BaseException as exc:
            problem = runner.close()  # a task that ignores cancellation: named, not waited for
            if problem is not None and sys.version_info >= (3, 11):
                exc.add_note(f"\npytest-concur also found:\n{problem}")
            raise
        problem = runner.close()
        if problem is not None:
            pytest.fail(problem, pytrace=False)
    else:
        run_watched(job.watches, job.nodeid, job.function, job.kwargs)


def _failure(exc: BaseException, job: Job, item: pytest.Item | None) -> Outcome:
    excinfo = pytest.ExceptionInfo.from_exception(exc)
    longrepr: Any
    if isinstance(exc, pytest.skip.Exception):
        visible = excinfo.traceback.filter(excinfo) or excinfo.traceback
        entry = visible[-1]
        longrepr = (str(entry.path), entry.lineno + 1, excinfo.exconly(tryshort=True))
    else:
        end_at_the_wait(excinfo)
        try:
            longrepr = (
                item.repr_failure(excinfo) if item is not None else _repr_failure(excinfo, job)
            )
        except Exception as problem:
            # Never lose the failure to a problem in rendering it.
            longrepr = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            longrepr += (
                f"\n(pytest-concur could not render this failure as pytest does: {problem!r})"
            )
    try:
        pickle.dumps(longrepr)
    except Exception:
        longrepr = str(longrepr)
    exception: bytes | None = None
    pytest_outcome = _pytest_outcome(exc)
    if pytest_outcome is None:
        try:
            exception = pickle.dumps(exc)
            pickle.loads(exception)  # a pickle that cannot be loaded back is no better than none
        except Exception:
            exception = None
    tb = exc.__traceback__
    site = ""
    while tb is not None:
        site = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return Outcome(
        passed=False,
        site=site,
        exception=exception,
        pytest_outcome=pytest_outcome,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        longrepr=longrepr,
    )


_OUTCOMES: dict[str, type[BaseException]] = {
    "skip": pytest.skip.Exception,
    "xfail": pytest.xfail.Exception,
    "fail": pytest.fail.Exception,
    "exit": pytest.exit.Exception,
}


def _pytest_outcome(exc: BaseException) -> tuple[str, str, bool, int | None] | None:
    for which, kind in _OUTCOMES.items():
        if type(exc) is kind:
            msg = getattr(exc, "msg", None) or ""
            pytrace = bool(getattr(exc, "pytrace", True))
            return (which, msg, pytrace, getattr(exc, "returncode", None))
    return None


def raise_pytest_outcome(which: str, msg: str, pytrace: bool, returncode: int | None) -> NoReturn:
    """Raise anew, in this process, an outcome exception the child raised."""
    __tracebackhide__ = True
    if which == "exit":
        pytest.exit(msg, returncode)
    if which == "fail":
        pytest.fail(msg, pytrace=pytrace)
    if which == "xfail":
        pytest.xfail(msg)
    pytest.skip(msg)


def _repr_failure(excinfo: pytest.ExceptionInfo[BaseException], job: Job) -> Any:
    """pytest's own failure rendering for a test function, without the item (spawn)."""
    if isinstance(excinfo.value, pytest.fail.Exception) and not excinfo.value.pytrace:
        return str(excinfo.value)
    style = "long" if job.tbstyle in ("auto", "long") or job.fulltrace else job.tbstyle
    code = job.function.__code__ if hasattr(job.function, "__code__") else None

    def cut(info: pytest.ExceptionInfo[BaseException]) -> Any:
        traceback = info.traceback
        if code is not None:
            cut = traceback.cut(path=code.co_filename, firstlineno=code.co_firstlineno - 1)
            traceback = cut if cut != traceback else traceback.cut(path=code.co_filename)
        traceback = traceback.filter(info)
        if job.tbstyle == "auto" and len(traceback) > 2:
            traceback = type(traceback)(
                [
                    traceback[0],
                    *(e.with_repr_style("short") for e in traceback[1:-1]),
                    traceback[-1],
                ]
            )
        return traceback

    options: dict[str, Any] = {}
    if "truncate_args" in inspect.signature(excinfo.getrepr).parameters:  # pytest 8.3+
        options["truncate_args"] = job.verbosity <= 2
    return excinfo.getrepr(
        funcargs=True,
        showlocals=job.showlocals,
        style=style,  # type: ignore[arg-type]
        tbfilter=False if job.fulltrace else cut,
        truncate_locals=job.verbosity <= 1,
        **options,
    )


def _warning(w: warnings.WarningMessage) -> tuple[str, bytes | None, str, int]:
    try:
        category: bytes | None = pickle.dumps(w.category)
    except Exception:
        category = None
    return (str(w.message), category, w.filename, w.lineno)


def _mark(stream: Any) -> int:
    getvalue = getattr(stream, "getvalue", None)
    return len(getvalue()) if callable(getvalue) else -1


def _since(stream: Any, mark: int) -> str:
    if mark < 0:
        return ""
    try:
        stream.flush()
        return str(stream.getvalue()[mark:])
    except Exception:
        return ""


def _dumps(outcome: Outcome) -> bytes:
    try:
        return pickle.dumps(outcome)
    except Exception as exc:
        # Keep the verdict even if some part of it does not pickle.
        return pickle.dumps(
            dataclasses.replace(
                outcome,
                exception=None,
                longrepr=None if outcome.longrepr is None else str(outcome.longrepr),
                message=outcome.message or f"(could not send the outcome: {exc!r})",
            )
        )


# --- start methods without the parent's memory ------------------------------------------


def _bootstrap(boot: Bootstrap) -> None:
    sys.path[:] = boot.sys_path
    with contextlib.suppress(OSError):
        os.chdir(boot.cwd)
    for fd, path in ((1, boot.stdout_path), (2, boot.stderr_path)):
        if path is not None:
            target = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(target, fd)
            os.close(target)
    # Line by line, so that a child that crashes loses no line it printed before.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.meta_path.insert(0, _ParentModules(boot.modules))


class _ParentModules(importlib.abc.MetaPathFinder):
    """Finds the modules the parent's pytest imported by path, asserts rewritten as there."""

    def __init__(self, modules: dict[str, tuple[str, bool]]) -> None:
        self._modules = modules

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self._modules.get(fullname)
        if entry is None:
            return None
        filename, rewrite = entry
        is_package = os.path.basename(filename) == "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname,
            filename,
            loader=_SourceLoader(fullname, filename, rewrite),
            submodule_search_locations=[os.path.dirname(filename)] if is_package else None,
        )


class _SourceLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, rewrite: bool) -> None:
        super().__init__(fullname, path)
        self._rewrite = rewrite

    def get_code(self, fullname: str) -> types.CodeType:
        # Always from source: a cached .pyc here would be an import without rewriting.
        path = self.get_filename(fullname)
        source = self.get_data(path)
        if self._rewrite:
            try:
                import ast

                from _pytest.assertion.rewrite import rewrite_asserts

                tree = ast.parse(source, filename=path)
                rewrite_asserts(tree, source, path, None)
                return compile(tree, path, "exec", dont_inherit=True)
            except Exception:
                # pytest's rewriter is not public API; without it asserts still work, with
                # plain messages.
                pass
        return compile(source, path, "exec", dont_inherit=True)
