"""Soak: thousands of backend items in one session, and whether anything grows.

Run by hand (never in CI):

    python benchmarks/soak.py [--items 10000] [--block 1000] [--xdist]

It writes a module whose tests run under all three backends (a third of ``--items``
each, interleaved), taking a lock, starting and joining a thread now and then, creating
and awaiting tasks, as ordinary suites do; then runs it in one pytest session (or, with
``--xdist``, under ``-n 2 --dist loadgroup``). A conftest plugin samples, every
``--block`` items, the wall time, the resident memory (``/proc/self/statm``), the open
file descriptors and the live threads of the process running the tests. The table shows
each block's cost per item and what the process holds at its end; the verdict compares
the last block with the first: the per-item cost and memory must not grow with the
session, and descriptors and threads must come back to where they were.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = """
import asyncio, threading
import pytest

LOCK = threading.Lock()

@pytest.mark.backend("thread", "process", "asyncio")
@pytest.mark.parametrize("n", range({per_backend}))
def test_sync(n):
    with LOCK:
        pass
    if n % 10 == 0:
        done = threading.Event()
        worker = threading.Thread(target=done.set)
        worker.start()
        worker.join()
        assert done.is_set()

@pytest.mark.backend("thread", "asyncio")
@pytest.mark.parametrize("n", range({per_backend_async}))
async def test_async(n):
    tasks = [asyncio.create_task(asyncio.sleep(0)) for _ in range(3)]
    await asyncio.gather(*tasks)
"""

SAMPLER = """
import json, os, threading, time

_SAMPLES = []
_COUNT = [0]
BLOCK = {block}

def _sample():
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    _SAMPLES.append({{
        "items": _COUNT[0],
        "time": time.perf_counter(),
        "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
    }})

def pytest_sessionstart(session):
    _sample()

def pytest_collection_modifyitems(items):
    # Round-robin over the backends, so that every block holds the same mix.
    groups = {{}}
    for item in items:
        name, _, params = item.nodeid.partition("[")
        groups.setdefault((name, params.split("-")[0]), []).append(item)
    mixed = []
    for i in range(max(len(group) for group in groups.values())):
        mixed.extend(group[i] for group in groups.values() if i < len(group))
    items[:] = mixed

def pytest_runtest_logfinish(nodeid, location):
    _COUNT[0] += 1
    if _COUNT[0] % BLOCK == 0:
        _sample()

def pytest_sessionfinish(session):
    _sample()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join({out!r}, f"samples-{{worker}}.json"), "w") as f:
        json.dump(_SAMPLES, f)
"""


def run(
    items: int, block: int, xdist: bool, plain: bool = False
) -> dict[str, list[dict[str, float]]]:
    with tempfile.TemporaryDirectory(prefix="concur-soak-") as tmp:
        folder = Path(tmp)
        # Five groups of the same size (three backends of sync tests, two of async ones).
        per_backend = per_backend_async = max(1, items // 5)
        if plain:  # as many sync items, no backends
            per_backend, per_backend_async = per_backend * 5, 0
        (folder / "test_soak.py").write_text(
            TESTS.format(per_backend=per_backend, per_backend_async=per_backend_async)
        )
        (folder / "conftest.py").write_text(SAMPLER.format(block=block, out=str(folder)))
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        if xdist:
            args += ["-n", "2", "--dist", "loadgroup"]
        if plain:
            # The same tests in plain pytest, for what pytest itself keeps per item (its
            # terminal reporter holds every report).
            args += ["-p", "no:concur", "-W", "ignore"]
        started = time.perf_counter()
        done = subprocess.run(args, cwd=folder, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
        print(f"pytest exited {done.returncode} in {elapsed:.1f} s: {tail[0]}")
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        return {
            path.stem.removeprefix("samples-"): json.loads(path.read_text())
            for path in sorted(folder.glob("samples-*.json"))
        }


def report(name: str, samples: list[dict[str, float]], plain_kb: float | None) -> bool:
    print(f"\nprocess {name}: {samples[-1]['items']:.0f} items")
    print(f"{'items':>7} {'ms/item':>8} {'RSS MB':>8} {'fds':>5} {'threads':>8}")
    costs = []
    for before, after in itertools.pairwise(samples):
        count = after["items"] - before["items"]
        if count <= 0:
            continue
        cost = (after["time"] - before["time"]) / count * 1000
        costs.append(cost)
        print(
            f"{after['items']:7.0f} {cost:8.3f} {after['rss_mb']:8.1f} "
            f"{after['fds']:5.0f} {after['threads']:8.0f}"
        )
    if len(costs) < 3:
        print("too few blocks for a verdict: raise --items or lower --block")
        return True
    # The first block pays imports and the forkserver's start; compare the second block's
    # cost with the last ones', and memory from the end of the first block to the end.
    early, late = costs[1], statistics.median(costs[-3:])
    first, last = samples[1], samples[-1]
    growth = late / early
    rss = last["rss_mb"] - first["rss_mb"]
    fds = last["fds"] - first["fds"]
    threads = last["threads"] - first["threads"]
    per_item_kb = rss * 1024 / (last["items"] - first["items"])
    versus = f" (plain pytest, same tests: {plain_kb:.2f} KB)" if plain_kb is not None else ""
    print(
        f"per-item cost, last blocks / second block: {growth:.2f}x; RSS {rss:+.1f} MB after "
        f"the first block, {per_item_kb:.2f} KB per item{versus}; fds {fds:+.0f} and "
        f"threads {threads:+.0f} since then"
    )
    # Memory: what pytest-concur adds per item must stay within 1 KB of plain pytest's own.
    grows = per_item_kb - (plain_kb or 0.0) > 1.0
    ok = growth < 1.25 and not grows and fds <= 0 and threads <= 0
    print("verdict:", "flat" if ok else "GROWS")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=1_000)
    parser.add_argument("--xdist", action="store_true", help="run under -n 2 --dist loadgroup")
    options = parser.parse_args()
    if not os.path.exists("/proc/self/statm"):
        sys.exit("soak.py reads /proc: Linux only")
    print(f"Python {sys.version.split()[0]}, {options.items} items, samples every {options.block}")
    # Plain pytest on as many tests, the same way (under xdist too: its controller keeps
    # every worker's reports), for what pytest itself keeps per item in each process.
    plain = run(options.items, options.block, xdist=options.xdist, plain=True)
    plain_kb: dict[str, float] = {}
    for name, samples in plain.items():
        if len(samples) > 2:
            plain_kb[name] = (
                (samples[-1]["rss_mb"] - samples[1]["rss_mb"])
                * 1024
                / (samples[-1]["items"] - samples[1]["items"])
            )
    results = run(options.items, options.block, options.xdist)
    if not results:
        sys.exit("no samples came back: see pytest's output above")
    flat = [report(name, samples, plain_kb.get(name)) for name, samples in results.items()]
    sys.exit(0 if all(flat) else 1)


if __name__ == "__main__":
    main()
