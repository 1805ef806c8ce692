"""What deadlock detection costs: tracked locks against raw ones, measured in one run.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/locks.py

Prints the time of an uncontended acquire/release pair for a raw ``threading.Lock``, a
tracked one outside a body (tracking off), a tracked one inside a body (tracking on, no lock
held, and one lock held, which records lock order), a raw and a tracked ``RLock``, and a
``with`` block on each, and the cost of tracking around a body that takes no lock.
Targets: under 1 microsecond per tracked pair, under 0.1 ms per body.
"""

from __future__ import annotations

import threading
import timeit

from pytest_concur import _locks

N = 200_000


def pair(lock: object) -> float:
    acquire = lock.acquire  # type: ignore[attr-defined]
    release = lock.release  # type: ignore[attr-defined]

    def body() -> None:
        for _ in range(1000):
            acquire()
            release()

    best = min(timeit.repeat(body, number=N // 1000, repeat=5))
    return best / N * 1e9


def with_block(lock: object) -> float:
    def body() -> None:
        for _ in range(1000):
            with lock:  # type: ignore[attr-defined]
                pass

    best = min(timeit.repeat(body, number=N // 1000, repeat=5))
    return best / N * 1e9


def main() -> None:
    raw = threading.Lock()
    raw_rlock = threading.RLock()
    rows = [("raw threading.Lock", pair(raw), with_block(raw))]
    rows.append(("raw threading.RLock", pair(raw_rlock), with_block(raw_rlock)))
    tracked = _locks.TrackedLock()
    rows.append(("tracked Lock, tracking off", pair(tracked), with_block(tracked)))
    with _locks.tracking():
        tracked = _locks.TrackedLock()
        rows.append(("tracked Lock, tracking on", pair(tracked), with_block(tracked)))
        outer = _locks.TrackedLock()
        with outer:
            rows.append(("  ... while holding another", pair(tracked), with_block(tracked)))
        rlock = _locks.TrackedLock(reentrant=True)
        rows.append(("tracked RLock, tracking on", pair(rlock), with_block(rlock)))

    def watch_cycle() -> None:
        with _locks.tracking():
            pass

    per_body = min(timeit.repeat(watch_cycle, number=2000, repeat=5)) / 2000 * 1e6
    base = rows[0][1]
    print(f"uncontended acquire+release, best of 5, {N} pairs each")
    print(f"{'lock':32} {'pair ns':>9} {'with ns':>9} {'pair vs raw':>12}")
    for name, pair_ns, with_ns in rows:
        print(f"{name:32} {pair_ns:9.0f} {with_ns:9.0f} {pair_ns / base:11.1f}x")
    print(f"\nstarting and stopping tracking around a body that takes no lock: {per_body:.1f} us")


if __name__ == "__main__":
    main()
