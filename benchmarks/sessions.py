"""Whole pytest sessions, side by side: what each backend costs per test, as a user feels it.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/sessions.py                   # the full run, several minutes
    python benchmarks/sessions.py --quick           # about a minute
    python benchmarks/sessions.py --only thread,asyncio --rounds 7

Every figure is the wall time of a whole ``pytest`` process (start, collection, the run,
the summary), never pytest's own per-test durations, which leave out what the hooks around
each test cost. A round runs every session once, one after the other, so that whatever the
machine does meanwhile falls on all of them alike; each figure is the median over the
rounds (after one warm-up round, which also writes the bytecode caches). The cost of a
session per test is its time minus the time of plain pytest on as many tests *in the same
round and the same environment*, divided by the number of tests; the ratio puts it next to
the peer's cost, measured the same way in the peer's own environment.

The peers run from their own virtualenvs where they do not support the newest pytest:
``--forked-python`` (pytest-forked; default ``.peers/forked8/bin/python``, pytest 8.4) and
``--parallel-python`` (pytest-run-parallel; default ``.peers/forked/bin/python``). Make them
with, e.g.::

    python -m venv .peers/forked8 && .peers/forked8/bin/pip install pytest-forked "pytest<9"
    python -m venv .peers/forked && .peers/forked/bin/pip install pytest pytest-run-parallel

pytest-asyncio is measured in this environment (it is a test dependency). A peer that is
missing is left out of the table, with a note.

Also measured: pytest-concur installed but unused against ``-p no:concur`` on
``--idle-tests`` plain tests; the thread backend at ``--tests`` and at ``--many`` items
(the per-test cost must not grow with the session), with the resident memory of the
process after collection and at the end of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent / ".peers"

SYNC = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_sync(n):
    assert n >= 0
"""

ASYNC = """
import asyncio

import pytest

@pytest.mark.parametrize("n", range({n}))
async def test_async(n):
    await asyncio.sleep(0)
"""

# Loaded with -p into every session: the resident memory after collection and at the end.
RSS_PLUGIN = """
import json, os

_SEEN = {}

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def pytest_collection_finish(session):
    _SEEN["collected"] = _rss()

def pytest_unconfigure(config):
    out = os.environ.get("BENCH_RSS_OUT")
    if out and "collected" in _SEEN:
        _SEEN["end"] = _rss()
        with open(out, "w") as f:
            json.dump(_SEEN, f)
"""

# What the built-in checks are registered as (pytest_concur/plugin.py): blocking the name
# runs the backends with no check at all.
CHECKS_OFF = ["-p", "no:concur-builtin-checks"]
# The blocked-loop check times each step by the wall clock: on a machine so busy that a
# trivial step can wait 0.1 s for a core, it would fail the run. Still on, with more room.
NO_ASYNC_PLUGINS = ["-p", "no:asyncio", "-p", "no:anyio", "-o", "concur_blocked_loop=5"]
PYTEST_ASYNCIO = [
    "-p",
    "no:concur",
    "-p",
    "no:anyio",
    "-o",
    "asyncio_mode=auto",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
]


@dataclasses.dataclass(frozen=True)
class Session:
    """One pytest command line, run in one environment on one generated test module."""

    label: str
    python: str
    module: str  # "sync" or "async"
    tests: int
    args: tuple[str, ...]

    def run(self, folder: Path) -> tuple[float, float, dict[str, int]]:
        """One run: its wall time, its CPU time (its children's included), its memory."""
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # users have bytecode caches
        env.pop("PYTEST_ADDOPTS", None)
        env["PYTHONPATH"] = str(folder)
        rss_out = folder / f"rss-{os.getpid()}.json"
        env["BENCH_RSS_OUT"] = str(rss_out)
        rss_out.unlink(missing_ok=True)
        command = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p"]
        command += ["bench_rss", *self.args, f"test_{self.module}_{self.tests}.py"]
        with tempfile.TemporaryFile() as output:
            start = time.perf_counter()
            proc = subprocess.Popen(
                command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT
            )
            # wait4 gives the CPU time of the run (with the children it reaped): on a busy
            # machine it says what the run costs better than the wall time does.
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace")
                raise SystemExit(f"{self.label}: {' '.join(command)} failed:\n{text[-4000:]}")
        rss = json.loads(rss_out.read_text()) if rss_out.exists() else {}
        return elapsed, usage.ru_utime + usage.ru_stime, rss


@dataclasses.dataclass(frozen=True)
class Row:
    """A line of the table: a session, the plain session it is measured against, a peer."""

    session: Session
    baseline: Session | None
    peer: Session | None = None
    peer_baseline: Session | None = None
    target: str = ""


def _python_of(path: str, what: str, notes: list[str]) -> str | None:
    if path and Path(path).exists():
        return path
    notes.append(f"{what}: no interpreter at {path!r}; left out (see the docstring).")
    return None


def _rows(options: argparse.Namespace, notes: list[str]) -> list[Row]:
    me = sys.executable
    n = options.tests
    only = set(options.only.split(",")) if options.only else None
    plain = Session("plain pytest", me, "sync", n, ("-p", "no:concur"))
    rows: list[Row] = []

    def want(group: str) -> bool:
        return only is None or group in only

    if want("thread"):
        rows.append(
            Row(
                Session("thread, checks on", me, "sync", n, ("--concur-backends=thread",)),
                plain,
                target="<= 0.3 ms",
            )
        )
        rows.append(
            Row(
                Session(
                    "thread, checks off", me, "sync", n, ("--concur-backends=thread", *CHECKS_OFF)
                ),
                plain,
            )
        )
    if want("asyncio"):
        rows.append(
            Row(
                Session(
                    "asyncio, checks on",
                    me,
                    "async",
                    n,
                    ("--concur-backends=asyncio", *NO_ASYNC_PLUGINS),
                ),
                plain,
                Session("pytest-asyncio", me, "async", n, tuple(PYTEST_ASYNCIO)),
                plain,
                target="<= peer",
            )
        )
        rows.append(
            Row(
                Session(
                    "asyncio, checks off",
                    me,
                    "async",
                    n,
                    ("--concur-backends=asyncio", *NO_ASYNC_PLUGINS, *CHECKS_OFF),
                ),
                plain,
            )
        )
    if want("process"):
        forked = _python_of(options.forked_python, "pytest-forked", notes)
        peer = peer_plain = None
        if forked is not None:
            peer = Session("pytest-forked", forked, "sync", n, ("--forked",))
            peer_plain = Session("plain pytest (forked's env)", forked, "sync", n, ())
        process = ("--concur-backends=process",)
        rows.append(
            Row(
                Session("process, checks on", me, "sync", n, process),
                plain,
                peer,
                peer_plain,
                target="<= peer",
            )
        )
        rows.append(
            Row(Session("process, checks off", me, "sync", n, (*process, *CHECKS_OFF)), plain)
        )
    if want("stress"):
        parallel = _python_of(options.parallel_python, "pytest-run-parallel", notes)
        peer = peer_plain = None
        w = str(options.workers)
        if parallel is not None:
            peer = Session("pytest-run-parallel", parallel, "sync", n, (f"--parallel-threads={w}",))
            peer_plain = Session("plain pytest (run-parallel's env)", parallel, "sync", n, ())
        rows.append(
            Row(
                Session(
                    f"stress, {w} threads",
                    me,
                    "sync",
                    n,
                    ("--concur-backends=thread", f"--concur-workers={w}"),
                ),
                plain,
                peer,
                peer_plain,
                target="<= peer",
            )
        )
    if want("idle"):
        m = options.idle_tests
        idle_plain = Session("plain pytest", me, "sync", m, ("-p", "no:concur"))
        rows.append(Row(Session("installed, unused", me, "sync", m, ()), idle_plain, target="< 2%"))
    if want("growth"):
        m = options.many
        rows.append(
            Row(
                Session("thread, checks on", me, "sync", m, ("--concur-backends=thread",)),
                Session("plain pytest", me, "sync", m, ("-p", "no:concur")),
                target=f"= at {n}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=500, help="tests per session (500)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--idle-tests", type=int, default=2000, help="for 'idle' (2000)")
    parser.add_argument("--many", type=int, default=10_000, help="for 'growth' (10000)")
    parser.add_argument("--workers", type=int, default=4, help="stress mode's copies (4)")
    parser.add_argument(
        "--quick", action="store_true", help="100 tests, 2 rounds, 500 idle, 1000 many"
    )
    parser.add_argument(
        "--only", default="", help="groups: thread,asyncio,process,stress,idle,growth"
    )
    parser.add_argument("--forked-python", default=str(PEERS / "forked8" / "bin" / "python"))
    parser.add_argument("--parallel-python", default=str(PEERS / "forked" / "bin" / "python"))
    parser.add_argument("--json", default="", help="also write the medians to this file")
    options = parser.parse_args()
    if options.quick:
        options.tests, options.rounds = 100, 2
        options.idle_tests, options.many = 500, 1000
    notes: list[str] = []
    rows = _rows(options, notes)
    sessions: list[Session] = []
    for row in rows:
        for session in (row.session, row.baseline, row.peer, row.peer_baseline):
            if session is not None and session not in sessions:
                sessions.append(session)
    times: dict[Session, list[float]] = {s: [] for s in sessions}
    cpu: dict[Session, list[float]] = {s: [] for s in sessions}
    memory: dict[Session, list[dict[str, int]]] = {s: [] for s in sessions}
    with tempfile.TemporaryDirectory(prefix="concur-bench-") as tmp:
        folder = Path(tmp)
        (folder / "bench_rss.py").write_text(RSS_PLUGIN)
        for session in sessions:
            body = SYNC if session.module == "sync" else ASYNC
            path = folder / f"test_{session.module}_{session.tests}.py"
            path.write_text(body.format(n=session.tests))
        started = time.monotonic()
        load = os.getloadavg()[0]
        for round_ in range(options.rounds + 1):  # round 0 warms up
            for session in sessions:
                elapsed, used, rss = session.run(folder)
                if round_:
                    times[session].append(elapsed)
                    cpu[session].append(used)
                    memory[session].append(rss)
            print(f"round {round_}/{options.rounds} done", file=sys.stderr, flush=True)
        load = max(load, os.getloadavg()[0])
    took = time.monotonic() - started
    for title, measured in (("wall time", times), ("CPU time", cpu)):
        _print(options, title, rows, measured, took, load)
    _print_memory(memory)
    for note in notes:
        print(f"note: {note}")
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {s.label + f" [{s.tests}]": statistics.median(t) for s, t in times.items()},
                indent=2,
            )
        )


def _cost(times: dict[Session, list[float]], session: Session, baseline: Session) -> float:
    """Median over rounds of (session - baseline) / tests, in ms per test."""
    pairs = zip(times[session], times[baseline], strict=True)
    return statistics.median((a - b) / session.tests * 1000 for a, b in pairs)


def _print(
    options: argparse.Namespace,
    title: str,
    rows: list[Row],
    times: dict[Session, list[float]],
    took: float,
    load: float,
) -> None:
    import pytest

    print(
        f"{title}: Python {sys.version.split()[0]}, pytest {pytest.__version__}, "
        f"{os.cpu_count()} cores, load average up to {load:.1f}; median of {options.rounds} "
        f"interleaved rounds, {took:.0f} s in all"
    )
    header = (
        f"{'session':26} {'tests':>6} {'s':>6} {'ms/test':>8}   "
        f"{'peer':22} {'ms/test':>8} {'ratio':>6}  target"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row.session
        median = statistics.median(times[s])
        cost = _cost(times, s, row.baseline) if row.baseline else 0.0
        line = f"{s.label:26} {s.tests:6} {median:6.2f} {cost:+8.3f}   "
        if row.peer is not None and row.peer_baseline is not None:
            peer_cost = _cost(times, row.peer, row.peer_baseline)
            ratio = cost / peer_cost if peer_cost > 0 else float("nan")
            line += f"{row.peer.label:22} {peer_cost:+8.3f} {ratio:5.2f}x"
        elif row.baseline is not None and s.label == "installed, unused":
            pairs = zip(times[s], times[row.baseline], strict=True)
            ratio = statistics.median(a / b for a, b in pairs)
            line += f"{'(vs -p no:concur)':22} {'':8} {ratio:5.3f}x"
        else:
            line += f"{'':22} {'':8} {'':6}"
        print(f"{line}  {row.target}")
    print()


def _print_memory(memory: dict[Session, list[dict[str, int]]]) -> None:
    print("resident memory, MB: after collection -> at the end (median)")
    for session, seen in memory.items():
        ends = [m for m in seen if "collected" in m and "end" in m]
        if not ends:
            continue
        before = statistics.median(m["collected"] for m in ends) / 2**20
        after = statistics.median(m["end"] for m in ends) / 2**20
        per_test = (after - before) * 2**20 / session.tests
        print(
            f"  {session.label:34} {session.tests:6} tests: {before:6.1f} -> {after:6.1f} "
            f"({per_test:+.0f} bytes/test)"
        )


if __name__ == "__main__":
    main()
