"""Per-test cost of the built-in checks on a test that starts nothing.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/checks_overhead.py [--tests 1000] [--repeat 5]

It writes a module of trivial tests to a temporary folder and runs it under each backend
twice in the same run: with the built-in checks (the default), and with a ``conftest.py``
that makes the built-in ``pytest_concur_add_checks`` return no checks. The difference,
divided by the number of tests, is what the checks cost a test that starts nothing (the
goal is under 0.1 ms). Best of ``--repeat`` runs each, so noise only makes it look worse.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import best_run

BODY = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_nothing(n):
    pass
"""

# Unregisters the built-in checks' plugin module and stands in for it with {checks}.
CONFTEST = """
import pytest

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    config.pluginmanager.unregister(name="concur-builtin-checks")

def pytest_concur_add_checks(config):
    from pytest_concur._checks.deadlock import DeadlockCheck
    return {checks}
"""


def micro(count: int) -> dict[str, tuple[float, float]]:
    """Microseconds per begin() + end() of each leak check's watch: in a thread, in a loop."""
    import asyncio

    import pytest_concur._checks._allow as allow
    from pytest_concur._checks.processes import ProcessesWatch
    from pytest_concur._checks.tasks import TasksWatch
    from pytest_concur._checks.threads import ThreadsWatch

    def measure(kind: type) -> float:
        watch = kind(allow.Allow(), 1.0)
        watch.begin()  # the first one pays for imports
        watch.end(False)
        start = time.perf_counter()
        for _ in range(count):
            watch.begin()
            watch.end(False)
        return (time.perf_counter() - start) / count * 1e6

    async def in_loop(kind: type) -> float:
        return measure(kind)

    return {
        kind.__name__: (measure(kind), asyncio.run(in_loop(kind)))
        for kind in (ThreadsWatch, TasksWatch, ProcessesWatch)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    n = options.tests
    print(f"Python {sys.version.split()[0]}")
    print("begin() + end() of one watch, nothing started, in-process (us):")
    print(f"  {'watch':16} {'thread':>8} {'in a loop':>10}")
    total = [0.0, 0.0]
    for name, (plain, looped) in micro(20000).items():
        print(f"  {name:16} {plain:8.1f} {looped:10.1f}")
        total = [total[0] + plain, total[1] + looped]
    print(f"  {'all three':16} {total[0]:8.1f} {total[1]:10.1f}")
    cases = {
        "no checks": "[]",
        "deadlock only": "[DeadlockCheck(config)]",
        "all built-in": None,  # the real thing, no conftest
    }
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for label, checks in cases.items():
            folder = folders[label] = Path(tmp, label.replace(" ", "-"))
            folder.mkdir()
            (folder / "test_bench.py").write_text(BODY.format(n=n))
            if checks is not None:
                (folder / "conftest.py").write_text(CONFTEST.format(checks=checks))
        print(f"\n{n} tests that start nothing, whole pytest runs, best of {options.repeat}:")
        print(
            f"{'backend':8} "
            + " ".join(f"{label:>14}" for label in cases)
            + "  leak checks per test"
        )
        for backend in ("thread", "asyncio"):
            args = (f"--concur-backends={backend}",)
            times = {
                label: best_run(folders[label], *args, repeat=options.repeat) for label in cases
            }
            leak = (times["all built-in"] - times["deadlock only"]) / n * 1000
            print(
                f"{backend:8} "
                + " ".join(f"{times[label]:13.3f}s" for label in cases)
                + f"  {leak:+.4f} ms"
            )


if __name__ == "__main__":
    main()
