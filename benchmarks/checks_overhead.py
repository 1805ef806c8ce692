"""Per-test cost of the built-in checks on a test that starts nothing.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/checks_overhead.py [--tests 2000] [--repeat 5]

Two runs of separate pytest processes differ by more than the checks cost (a few percent
of a run is noise on a shared machine), so the comparison is made inside one run: a
``conftest.py`` puts a gate in front of the built-in checks, and the gate lets them watch
every other block of 50 tests only. The blocks alternate, so whatever the machine does
meanwhile (and what the garbage collector does) falls on both halves alike; in blocks, not
test by test, so that what a watched test leaves to the next one to pay (garbage, say)
is paid in its own half. Each test's setup, call and teardown durations (pytest's own
``report.duration``) are summed per half; the difference, per test, is what the checks
cost; each figure is the mean of a run watching the even blocks and one watching the odd. Two gates are measured: every check, and
every check but the deadlock check (always on in that run). The goal is under 0.1 ms.
The median of ``--repeat`` such pairs is printed, with the spread.

Also printed: the in-process cost of each watch's ``begin()`` + ``end()`` with nothing
started, warm (a lower bound: in a whole run the caches are cold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BODY = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_nothing(n):
    pass
"""

# Gates the built-in checks: tests run in blocks of 50 with them, 50 without, in turn.
CONFTEST = r"""
import json, os, re
import pytest

GATED = {gated!r}
TOTALS = {{"on": 0.0, "off": 0.0}}


class Gate:
    def __init__(self, check):
        self.check = check
        self.name = check.name
        self.description = check.description

    def watch(self, item):
        return self.check.watch(item) if _on(item) else None


PARITY = int(os.environ["CONCUR_BENCH_PARITY"])


def _on(item):
    return _block(item.callspec.params["n"]) == PARITY


def _block(n):
    return n // 50 % 2


@pytest.hookimpl(wrapper=True)
def pytest_concur_add_checks(config):
    checks = yield
    return [[Gate(c) if c.name in GATED else c for c in group] for group in checks]


def pytest_runtest_logreport(report):
    n = int(re.search(r"[\[-](\d+)[\]-]", report.nodeid).group(1))
    TOTALS["on" if _block(n) == PARITY else "off"] += report.duration


def pytest_sessionfinish(session):
    with open(os.environ["CONCUR_BENCH_OUT"], "w") as file:
        json.dump(TOTALS, file)
"""


def micro(count: int) -> dict[str, tuple[float, float]]:
    """Microseconds per begin() + end() of each watch, nothing started: in a thread, in a loop."""
    import asyncio

    import pytest_concur._checks._allow as allow
    from pytest_concur._checks.blocked_loop import BlockedLoopWatch
    from pytest_concur._checks.deadlock import DeadlockWatch
    from pytest_concur._checks.processes import ProcessesWatch
    from pytest_concur._checks.tasks import TasksWatch
    from pytest_concur._checks.threads import ThreadsWatch

    makers = {
        "deadlock": lambda: DeadlockWatch(threading.get_ident(), "warn"),
        "threads": lambda: ThreadsWatch(allow.Allow(), 1.0),
        "tasks": lambda: TasksWatch(allow.Allow(), 1.0),
        "processes": lambda: ProcessesWatch(allow.Allow(), 1.0),
        "blocked_loop": lambda: BlockedLoopWatch(0.1, False, "test", "test.py", 1),
    }

    def measure(make: object) -> float:
        watch = make()  # type: ignore[operator]
        watch.begin()  # the first one pays for imports
        watch.end(False)
        start = time.perf_counter()
        for _ in range(count):
            watch.begin()
            watch.end(False)
        return (time.perf_counter() - start) / count * 1e6

    async def in_loop(make: object) -> float:
        return measure(make)

    return {name: (measure(make), asyncio.run(in_loop(make))) for name, make in makers.items()}


def gated_run(folder: Path, backend: str) -> float:
    """Milliseconds per test that the gated checks add, from two pytest runs.

    One run watches the even blocks, the other the odd ones: whatever favours one half
    cancels out in the mean.
    """
    costs = []
    for parity in (0, 1):
        out = folder / "totals.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--concur-backends={backend}",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            env={**_environ(), "CONCUR_BENCH_OUT": str(out), "CONCUR_BENCH_PARITY": str(parity)},
        )
        if proc.returncode != 0:
            raise SystemExit(f"pytest failed in {folder}:\n{proc.stdout}\n{proc.stderr}")
        totals = json.loads(out.read_text())
        tests = int(folder.name.rsplit("-", 1)[1])
        costs.append((totals["on"] - totals["off"]) / (tests / 2) * 1000)
    return sum(costs) / 2


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    n = options.tests
    print(f"Python {sys.version.split()[0]}")
    print("begin() + end() of one watch, nothing started, in-process, warm (us):")
    print(f"  {'watch':14} {'thread':>8} {'in a loop':>10}")
    total = [0.0, 0.0]
    for name, (plain, looped) in micro(20000).items():
        print(f"  {name:14} {plain:8.1f} {looped:10.1f}")
        total = [total[0] + plain, total[1] + looped]
    print(f"  {'all':14} {total[0]:8.1f} {total[1]:10.1f}")
    gates = {
        "every check": ("deadlock", "threads", "tasks", "processes", "concur", "blocked_loop"),
        "all but deadlock": ("threads", "tasks", "processes", "concur", "blocked_loop"),
    }
    print(
        f"\n{n} tests that start nothing, half of them watched, per watched test "
        f"(median of {options.repeat} runs, [min, max]):"
    )
    print(f"{'backend':8} " + " ".join(f"{label:>26}" for label in gates))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for index, (label, gated) in enumerate(gates.items()):
            folder = folders[label] = Path(tmp, f"gate{index}-{n}")
            folder.mkdir()
            (folder / "test_bench.py").write_text(BODY.format(n=n))
            (folder / "conftest.py").write_text(CONFTEST.format(gated=gated))
        for backend in ("thread", "asyncio"):
            cells = []
            for label in gates:
                costs = [gated_run(folders[label], backend) for _ in range(options.repeat)]
                cells.append(
                    f"{statistics.median(costs):+.3f} ms [{min(costs):+.3f}, {max(costs):+.3f}]"
                )
            print(f"{backend:8} " + " ".join(f"{cell:>26}" for cell in cells))


if __name__ == "__main__":
    main()
