"""The cost of session-wide lock tracking on a plain suite, against the plugin disabled.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/session_locks.py [--tests 2000] [--rounds 9]

It writes a plain suite (no backend) of ``--tests`` tests that make and take locks the way
tests of a cache or a pool do: a lock made at module import, a session fixture's RLock, a
function fixture that builds an object with a Lock, a Condition and a queue.Queue, and a
body that takes them a few dozen times. Whole ``pytest`` sessions run in subprocesses,
plugin enabled, enabled with ``concur_session_locks = false`` and ``-p no:concur`` in turn
(interleaved, so that the machine's load drifts over all alike); it prints each one's
median wall and CPU time and the ratios, then what one acquire/release pair and one lock
creation cost in this process, tracked and plain.
"""

from __future__ import annotations

import _thread
import argparse
import resource
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
        for key in range({ops}):
            cache.put(key, n)
            with MODULE_LOCK:
                assert cache.get(key) == n
    assert cache._pending.qsize() == {ops}
"""


def session(folder: Path, *args: str) -> tuple[float, float]:
    """Wall and CPU time (user + system) of one whole pytest session in a subprocess.

    CPU time is the steadier figure on a machine others load too: waiting for a core does
    not count in it.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = best_run(folder, *args, repeat=1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


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
    parser.add_argument(
        "--ops", type=int, default=5, help="puts and gets per test (8 lock operations each)"
    )
    options = parser.parse_args()
    cases = {
        "plugin enabled": (),
        "session locks off": ("-o", "concur_session_locks=false"),
        "-p no:concur": ("-p", "no:concur"),
    }
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "conftest.py").write_text(CONFTEST)
        (folder / "test_locks.py").write_text(TESTS.format(n=options.tests, ops=options.ops))
        for args in cases.values():
            session(folder, *args)  # warm the file cache and the .pyc files
        for round_ in range(options.rounds):
            # Rotate which goes first, so none always runs on the warmer machine.
            items = list(cases.items())
            shift = round_ % len(items)
            for label, args in items[shift:] + items[:shift]:
                times[label].append(session(folder, *args))
    print(
        f"{options.tests} plain tests, {options.ops * 8} lock operations each, "
        f"{options.rounds} interleaved rounds, Python {sys.version.split()[0]}"
    )
    print(f"{'session':18} {'median wall s':>14} {'median CPU s':>13} {'min wall s':>11}")
    medians = {}
    for label, values in times.items():
        wall, cpu = (statistics.median(v[k] for v in values) for k in (0, 1))
        medians[label] = (wall, cpu)
        print(f"{label:18} {wall:14.3f} {cpu:13.3f} {min(v[0] for v in values):11.3f}")
    for label in ("session locks off", "-p no:concur"):
        ratios = [medians["plugin enabled"][k] / medians[label][k] for k in (0, 1)]
        print(
            f"plugin enabled / {label}: wall {ratios[0]:.4f} ({(ratios[0] - 1) * 100:+.2f}%), "
            f"CPU {ratios[1]:.4f} ({(ratios[1] - 1) * 100:+.2f}%)"
        )
    print()
    per_call()


if __name__ == "__main__":
    main()
