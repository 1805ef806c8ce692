"""How often ``explore=100`` finds each racy asyncio and thread body, what a decision costs.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/explore.py [--items 50]

For each racy body it writes a test module with ``--items`` copies of the test
(parametrized, so each has its own node id and hence its own seeds) under
``@pytest.mark.backend("asyncio", explore=100)`` and counts how many of them fail: the
share of explore=100 runs that find the bug. The same module with ``explore=0`` (asyncio's
own order, what a plain run does) is the baseline. Each correct body runs once with
``explore=1000`` and must pass: 0 failures in 1,000 schedules.

The cost per scheduling decision is measured in-process: many tasks that each yield many
times, on the exploring loop with a schedule against the same loop without one, the
difference divided by the decisions made. Last, the wall time of one ``explore=100`` item
on a small body against the same item run once, and what shrinking made of the failing
schedules (preemptions before and after, runs it took).

Thread bodies (the lost update ``v = self.n; self.n = v + 1`` between two threads, a
check-then-act on a dict) are measured alike under ``@pytest.mark.backend("thread",
explore=100)``; their decision cost is that of the baton-passing scheduler: two threads
that each run many lines of this file, handing the baton on where the schedule says,
against the same two threads run as the operating system schedules them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import re
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from _common import pytest_run

from pytest_concur import _stress
from pytest_concur._explore._asyncio import Control, exploring_loop
from pytest_concur._explore._schedule import Schedule
from pytest_concur._explore._threads import ThreadScheduler

# A cache's get, racy and locked, shared by two bodies.
_GET = (
    """
    async def get(cache, key):
        if key not in cache:
            cache[key] = await fetch(key)
        return cache[key]
    """,
    """
    async def get(cache, key):
        async with LOCKS[0]:
            if key not in cache:
                cache[key] = await fetch(key)
        return cache[key]
    """,
)

# Each body: name -> (racy source, correct source, the rest). A plain run of each racy one passes:
# asyncio's first-in-first-out order happens to hide the race.
BODIES = {
    "check-then-await": (
        *_GET,
        """
        async def fetch(key):
            FETCHES.append(key)
            await asyncio.sleep(0)
            return key

        async def later(cache, key):
            await asyncio.sleep(0)
            return await get(cache, key)

        async def body():
            cache = {}
            await asyncio.gather(get(cache, 1), later(cache, 1))
            assert len(FETCHES) == 1
        """,
    ),
    "cache stampede (4 tasks)": (
        *_GET,
        """
        async def fetch(key):
            FETCHES.append(key)
            for _ in range(2):
                await asyncio.sleep(0)
            return key

        async def client(cache, delay):
            for _ in range(delay):
                await asyncio.sleep(0)
            return await get(cache, "k")

        async def body():
            cache = {}
            await asyncio.gather(*(client(cache, 3 * i) for i in range(4)))
            assert len(FETCHES) == 1
        """,
    ),
    "lost update across an await": (
        """
        async def add(box):
            value = box[0]
            await asyncio.sleep(0)
            box[0] = value + 1
        """,
        """
        async def add(box):
            async with LOCKS[0]:
                value = box[0]
                await asyncio.sleep(0)
                box[0] = value + 1
        """,
        """
        async def late(box):
            await asyncio.sleep(0)
            await add(box)

        async def body():
            box = [0]
            await asyncio.gather(add(box), late(box))
            assert box[0] == 2
        """,
    ),
    "lazy init with an await": (
        """
        async def instance():
            if not INSTANCES:
                await asyncio.sleep(0)  # connect
                INSTANCES.append(object())
            return INSTANCES[-1]
        """,
        """
        async def instance():
            async with LOCKS[0]:
                if not INSTANCES:
                    await asyncio.sleep(0)  # connect
                    INSTANCES.append(object())
            return INSTANCES[-1]
        """,
        """
        async def late():
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return await instance()

        async def body():
            INSTANCES.clear()
            first, second = await asyncio.gather(instance(), late())
            assert first is second
        """,
    ),
}

# Thread bodies: name -> (racy source, correct source). A plain run of each racy one passes.
THREAD_BODIES = {
    "lost update (2 threads)": (
        """
        def work(box, lock):
            value = box[0]
            box[0] = value + 1
        """,
        """
        def work(box, lock):
            with lock:
                value = box[0]
                box[0] = value + 1
        """,
    ),
    "check-then-act on a dict": (
        """
        def work(box, lock):
            box[0] += 1
            if "k" not in CACHE:
                MADE.append(1)
                CACHE["k"] = object()
        """,
        """
        def work(box, lock):
            with lock:
                box[0] += 1
                if "k" not in CACHE:
                    MADE.append(1)
                    CACHE["k"] = object()
        """,
    ),
}

THREAD_MODULE = """
import threading
import pytest

CACHE = {{}}
MADE = []
{work}

@pytest.mark.parametrize("copy", range({items}))
@pytest.mark.backend("thread", explore={explore})
def test_body(copy):
    CACHE.clear()
    MADE.clear()
    box, lock = [0], threading.Lock()
    threads = [threading.Thread(target=work, args=(box, lock)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(MADE) <= 1 and box[0] == 2
"""

MODULE = """
import asyncio
import pytest

FETCHES = []
INSTANCES = []
LOCKS = []
{get}
{rest}

@pytest.mark.parametrize("copy", range({items}))
@pytest.mark.backend("asyncio", explore={explore})
async def test_body(copy):
    FETCHES.clear()
    LOCKS[:] = [asyncio.Lock()]
    await body()
"""


def _module(get: str, rest: str, items: int, explore: int) -> str:
    return MODULE.format(
        get=textwrap.dedent(get), rest=textwrap.dedent(rest), items=items, explore=explore
    )


def _failures(folder: Path, source: str, *args: str) -> tuple[int, int, float]:
    """(failed, total, seconds) of one pytest run of ``source``."""
    path = folder / "test_body.py"
    path.write_text(source)
    start = time.perf_counter()
    proc = pytest_run(folder, "-p", "no:asyncio", str(path), *args)
    elapsed = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    failed = re.search(r"(\d+) failed", last)
    passed = re.search(r"(\d+) passed", last)
    errors = re.search(r"(\d+) error", last)
    if errors or not (failed or passed):
        raise SystemExit(f"collection or setup errors:\n{proc.stdout}\n{proc.stderr}")
    nfailed = int(failed[1]) if failed else 0
    return nfailed, nfailed + (int(passed[1]) if passed else 0), elapsed


_DURATION = ("--durations=1", "--durations-min=0")


def _call_seconds(folder: Path, source: str) -> float:
    """The duration of the call phase of the only test of ``source``, best of three."""
    path = folder / "test_body.py"
    path.write_text(source)
    best = float("inf")
    for _ in range(3):
        proc = pytest_run(folder, "-p", "no:asyncio", str(path), *_DURATION)
        match = re.search(r"([\d.]+)s call ", proc.stdout)
        if match is None:
            raise SystemExit(f"no duration in:\n{proc.stdout}\n{proc.stderr}")
        best = min(best, float(match[1]))
    return best


def decision_cost(tasks: int = 10, steps: int = 2000) -> tuple[float, int]:
    """Microseconds per scheduling decision, and the decisions measured."""

    async def worker() -> None:
        for _ in range(steps):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(tasks)))

    def timed(schedule: Schedule | None) -> float:
        control = Control()
        loop = exploring_loop(control)
        try:
            control.schedule = schedule
            start = time.perf_counter()
            loop.run_until_complete(main())
            return time.perf_counter() - start
        finally:
            control.schedule = None
            loop.close()

    plain = min(timed(None) for _ in range(3))
    best = float("inf")
    decisions = 0
    for seed in range(3):
        schedule = Schedule(seed)
        best = min(best, timed(schedule))
        decisions = len(schedule.decisions)
    return (best - plain) / decisions * 1e6, decisions


def _spin(lines: int) -> None:
    total = 0
    for step in range(lines):
        total += step


def thread_decision_cost(lines: int = 5000) -> tuple[float, int]:
    """Microseconds per decision of the thread scheduler, and the decisions measured."""

    def timed(scheduler: ThreadScheduler | None) -> float:
        body = _spin if scheduler is None else scheduler.wrap(_spin)

        def copy(index: int) -> None:
            _stress._COPY_INDEX.set(index)
            body(lines=lines)

        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(copy, index))
            for index in range(2)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if scheduler is not None:
            scheduler.stop()
        return elapsed

    plain = min(timed(None) for _ in range(3))
    best, decisions = float("inf"), 0
    for seed in range(3):
        schedule = Schedule(seed)
        best = min(best, timed(ThreadScheduler(schedule, copies=2)))
        decisions = len(schedule.decisions)
    return (best - plain) / max(decisions, 1) * 1e6, decisions


_SHRUNK = re.compile(r"Shrunk from (\d+) preemptions to (\d+) in (\d+) more run")
_NOT_SHRUNK = re.compile(r"Not shrunk: .* in (\d+) more runs? \((\d+) preemption")


def _shrinking(folder: Path, source: str) -> str:
    """Preemptions before and after shrinking, over the failures of one run of ``source``."""
    path = folder / "test_body.py"
    path.write_text(source)
    proc = pytest_run(folder, "-p", "no:asyncio", str(path))
    pairs = [(int(a), int(b), int(runs)) for a, b, runs in _SHRUNK.findall(proc.stdout)]
    pairs += [(int(a), int(a), int(runs)) for runs, a in _NOT_SHRUNK.findall(proc.stdout)]
    if not pairs:
        return "no failure was shrunk (found by the bounded search, or none with preemptions)"
    before = statistics.median(a for a, _, _ in pairs)
    after = statistics.median(b for _, b, _ in pairs)
    runs = statistics.mean(r for _, _, r in pairs)
    return (
        f"preemptions {before:g} -> {after:g} (medians of {len(pairs)} failures), "
        f"{runs:.1f} more runs on average"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50, help="explore=100 runs per body")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'body':<30} {'plain run':>10} {'explore=100':>12} {'correct, 1000':>14}")
        for name, (racy, correct, rest) in BODIES.items():
            plain, total, _ = _failures(folder, _module(racy, rest, args.items, 0))
            found, total, _ = _failures(folder, _module(racy, rest, args.items, 100))
            wrong, _, _ = _failures(folder, _module(correct, rest, 1, 1000))
            print(f"{name:<30} {plain:>4}/{total:<5} {found:>6}/{total:<5} {wrong:>8}/1000")
        for name, (racy, correct) in THREAD_BODIES.items():
            work = textwrap.dedent(racy)
            plain, total, _ = _failures(
                folder, THREAD_MODULE.format(work=work, items=args.items, explore=0)
            )
            found, total, _ = _failures(
                folder, THREAD_MODULE.format(work=work, items=args.items, explore=100)
            )
            fixed = THREAD_MODULE.format(work=textwrap.dedent(correct), items=1, explore=1000)
            wrong, _, _ = _failures(folder, fixed)
            label = f"{name} [thread]"
            print(f"{label:<30} {plain:>4}/{total:<5} {found:>6}/{total:<5} {wrong:>8}/1000")
        print("\nshrinking a failing schedule (10 failures per body):")
        for name, (racy, _, rest) in BODIES.items():
            print(f"  {name:<36} {_shrinking(folder, _module(racy, rest, 10, 100))}")
        large = textwrap.dedent(THREAD_BODIES["lost update (2 threads)"][0]).replace(
            "def work(box, lock):\n",
            "def work(box, lock):\n    for _ in range(25):\n        pass\n",
        )
        label = "lost update, 25-line loops [thread]"
        shrunk = _shrinking(folder, THREAD_MODULE.format(work=large, items=10, explore=100))
        print(f"  {label:<36} {shrunk}")
        racy, correct, rest = BODIES["check-then-await"]
        once = _call_seconds(folder, _module(correct, rest, 1, 0))
        hundred = _call_seconds(folder, _module(correct, rest, 1, 100))
        print(
            f"\nexplore=100 on a small correct body: {hundred * 1000:.1f} ms for the test's "
            f"call, against {once * 1000:.1f} ms for one plain run"
        )
    cost, decisions = decision_cost()  # in-process, after the runs
    print(f"cost per scheduling decision: {cost:.2f} us (over {decisions} decisions, 10 tasks)")
    cost, decisions = thread_decision_cost()
    print(
        f"cost per thread scheduling decision: {cost:.2f} us (over {decisions} decisions, "
        "2 threads, a line each)"
    )


if __name__ == "__main__":
    main()
