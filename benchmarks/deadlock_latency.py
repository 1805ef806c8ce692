"""How fast a deadlock becomes a failure, against the peer that would otherwise end it.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/deadlock_latency.py [--runs 20]

Part 1 measures in-process, with tracking on as during a test body, the time from the
moment a deadlock is complete (the last thread starts its hopeless wait) to the moment the
DeadlockError reaches it, for a two-lock cycle, an Event nobody sets, and an asyncio loop
where every task waits. Target: under 1 s, goal 100 ms.

Part 2 runs a whole pytest session on a two-thread deadlock, once with pytest-concur and
once with the plugin off and pytest-timeout's --timeout=5 (the usual safety net), and
prints both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pytest_concur import DeadlockError, _locks, _loop_deadlocks


def two_lock_cycle() -> float:
    a, b = threading.Lock(), threading.Lock()
    both = threading.Barrier(2)
    blocked_at: list[float] = []
    caught_at: list[float] = []

    def worker(first: threading.Lock, second: threading.Lock) -> None:
        with first:
            both.wait()
            blocked_at.append(time.perf_counter())
            try:
                with second:
                    pass
            except DeadlockError:
                caught_at.append(time.perf_counter())

    threads = [
        threading.Thread(target=worker, args=(a, b)),
        threading.Thread(target=worker, args=(b, a)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        try:
            thread.join()
        except DeadlockError:  # the joining thread is told too
            _locks._real_join(thread)
    return min(caught_at) - max(blocked_at)


def event_never_set() -> float:
    event = threading.Event()
    start = time.perf_counter()
    try:
        event.wait()
    except DeadlockError:
        return time.perf_counter() - start
    raise AssertionError("not detected")


def loop_where_every_task_waits() -> float:
    loop = _loop_deadlocks.new_loop()
    started: list[float] = []

    async def main() -> None:
        _loop_deadlocks.note_body_task()
        event = asyncio.Event()
        started.append(time.perf_counter())
        await event.wait()

    try:
        loop.run_until_complete(main())
    except DeadlockError:
        return time.perf_counter() - started[0]
    finally:
        loop.close()
    raise AssertionError("not detected")


def measure(name: str, case: Callable[[], float], runs: int) -> None:
    times = []
    for _ in range(runs):
        with _locks.tracking():
            times.append(case() * 1000)
    print(
        f"{name:34} median {statistics.median(times):7.1f} ms   "
        f"max {max(times):7.1f} ms   ({runs} runs)"
    )


SESSION = """
import threading

def test_two_locks():
    a, b = threading.Lock(), threading.Lock()
    both = threading.Barrier(2)

    def worker(first, second):
        with first:
            both.wait()
            with second:
                pass

    threads = [threading.Thread(target=worker, args=(a, b), daemon=True),
               threading.Thread(target=worker, args=(b, a), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
"""


def session(folder: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        capture_output=True,
        check=False,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    print("Part 1: from deadlock complete to DeadlockError, in-process")
    measure("two-lock cycle", two_lock_cycle, runs)
    measure("Event nobody sets", event_never_set, runs)
    measure("asyncio: every task waits", loop_where_every_task_waits, runs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_deadlock.py").write_text(SESSION)
        ours = session(folder, "--concur-backends=thread")
        peer = session(folder, "-p", "no:concur", "--timeout=5")
    print("\nPart 2: a whole pytest session on a two-thread deadlock")
    print(f"{'pytest-concur (--concur-backends=thread)':44} {ours:6.2f} s")
    print(f"{'plugin off, pytest-timeout --timeout=5':44} {peer:6.2f} s")
    print(f"{'ratio':44} {peer / ours:6.1f}x faster")


if __name__ == "__main__":
    main()
