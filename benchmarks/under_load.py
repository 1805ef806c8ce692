"""The suite on a busy machine: run it several times in a row beside CPU hogs.

Run by hand (it takes a while):

    python benchmarks/under_load.py [--runs 5] [--hogs 2] [-- PYTEST ARGS...]

It starts ``--hogs`` processes that spin (``while True: pass``), then runs this project's
test suite ``--runs`` times in a row (``pytest -n 2 -q -p no:randomly`` by default, or the
arguments after ``--``), and ends the hogs however the runs went. It prints each run's
summary line and every test that failed, and exits non-zero if any run was not green: a
verdict that a loaded machine can flip is a bug in the test (or in the check it tests).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("pytest_args", nargs="*", default=["-n", "2", "-q", "-p", "no:randomly"])
    options = parser.parse_args()
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(options.hogs)
    ]
    green = 0
    failures: dict[str, int] = {}
    try:
        for number in range(1, options.runs + 1):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pytest", *options.pytest_args],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            elapsed = time.perf_counter() - started
            lines = done.stdout.strip().splitlines()
            summary = lines[-1] if lines else "(no output)"
            print(f"run {number}: exit {done.returncode} in {elapsed:.0f} s: {summary}", flush=True)
            for line in lines:
                match = re.match(r"^(FAILED|ERROR) (\S+)", line)
                if match:
                    failures[match.group(2)] = failures.get(match.group(2), 0) + 1
                    print(f"    {line}")
            green += done.returncode == 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"{green} of {options.runs} runs green beside {options.hogs} busy loops")
    for nodeid, count in sorted(failures.items(), key=lambda kv: -kv[1]):
        print(f"  {count}x {nodeid}")
    sys.exit(0 if green == options.runs else 1)


if __name__ == "__main__":
    main()
