"""The cost of session-wide lock tracking on a plain suite, against the plugin disabled.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/session_locks.py [--tests 2000] [--rounds 9]

It writes a plain suite (no backend) of ``--tests`` tests that make and take locks the way
tests of a cache or a pool do: a lock made at module import, a session fixture's RLock, a
function fixture that builds an object with a Lock, a Condition and a queue.Queue, and a
body that takes them a few dozen times. Whole ``pytest`` sessions run in subprocesses,
plugin enabled and ``-p no:concur`` in turn (interleaved, so that the machine's load
drifts over both alike); it prints each side's median and their ratio, then what one
acquire/release pair and one lock creation cost in this process, tracked and plain.
"""

from __future__ import annotations

import _thread
import argparse
import statistics
import sys
import tempfile
import threading
import timeit
from pathlib import Path

from _common import best_run

CONFTEST = """
import queue, threading
import pytest

class Cache:
    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(threading.RLock())
        self._pending = queue.Queue()
        self._data = {}

    def put(self, key, value):
        with self._lock:
            self._data[key] = value
        with self._changed:
            self._changed.notify_all()
        self._pending.put(key)

    def get(self, key):
        with self._lock:
            return self._data.get(key)

@pytest.fixture(scope="session")
def registry():
    return threading.RLock()

@pytest.fixture
def cache():
    return Cache()
"""

TESTS = """
import threading
import pytest

MODULE_LOCK = threading.Lock()

@pytest.mark.parametrize("n", range({n}))
def test_cache(n, cache, registry):
    with registry:
        for key in range(20):
            cache.put(key, n)
            with MODULE_LOCK:
                assert cache.get(key) == n
    assert cache._pending.qsize() == 20
"""


def session(folder: Path, *args: str) -> float:
    """Wall time of one whole pytest session in a subprocess; exit if it fails."""
    return best_run(folder, *args, repeat=1)


def per_call() -> None:
    """What one lock operation costs here, tracked (outside a body) and plain, in ns."""
    from pytest_concur import _locks

    plain, tracked = _thread.allocate_lock(), _locks.TrackedLock()

    def take(lock: object) -> None:
        with lock:  # type: ignore[attr-defined]
            pass

    rows = [
        ("with lock: pass", lambda: take(plain), lambda: take(tracked)),
        ("threading.Lock()", _thread.allocate_lock, _locks._tracked_lock),
        ("threading.Condition()", threading.Condition, lambda: _condition(_locks)),
    ]
    print(f"{'one operation':24} {'plain ns':>9} {'tracked ns':>11}")
    for label, plain_op, tracked_op in rows:
        times = [
            min(timeit.repeat(op, number=20000, repeat=5)) / 20000 * 1e9
            for op in (plain_op, tracked_op)
        ]
        print(f"{label:24} {times[0]:9.0f} {times[1]:11.0f}")


def _condition(_locks: object) -> object:
    return threading.Condition(_locks._tracked_rlock())  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    options = parser.parse_args()
    cases = {"plugin enabled": (), "-p no:concur": ("-p", "no:concur")}
    times: dict[str, list[float]] = {label: [] for label in cases}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "conftest.py").write_text(CONFTEST)
        (folder / "test_locks.py").write_text(TESTS.format(n=options.tests))
        for args in cases.values():
            session(folder, *args)  # warm the file cache and the .pyc files
        for round_ in range(options.rounds):
            # Alternate which goes first, so neither always runs on the warmer machine.
            order = list(cases.items()) if round_ % 2 == 0 else list(cases.items())[::-1]
            for label, args in order:
                times[label].append(session(folder, *args))
    print(
        f"{options.tests} plain tests taking locks, {options.rounds} interleaved rounds, "
        f"Python {sys.version.split()[0]}"
    )
    print(f"{'session':16} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, values in times.items():
        print(f"{label:16} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")
    enabled, disabled = (statistics.median(v) for v in times.values())
    print(
        f"ratio enabled / disabled: {enabled / disabled:.4f} ({(enabled / disabled - 1) * 100:+.2f}%)"
    )
    print()
    per_call()


if __name__ == "__main__":
    main()
