"""Per-test overhead of each backend, against a plain run measured in the same process.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/overhead.py [--tests 300] [--repeat 3]

It writes a module of trivial tests (sync and async) to a temporary folder, runs it with
pytest plainly, with pytest-concur loaded but idle, and under each backend, and prints the
best wall time of each run, the time per test and the ratio to the plain run. Other
start methods of the process backend are measured too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import best_run

BODY = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_sync(n):
    assert n >= 0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    n = options.tests
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_bench.py").write_text(BODY.format(n=n))
        cases = [
            ("plain, plugin off", ["-p", "no:concur"]),
            ("plain, plugin idle", []),
            ("thread", ["--concur-backends=thread"]),
            ("asyncio", ["--concur-backends=asyncio"]),
            ("process (auto: fork)", ["--concur-backends=process"]),
            (
                "process (forkserver)",
                ["--concur-backends=process", "--concur-start-method=forkserver"],
            ),
            ("process (spawn)", ["--concur-backends=process", "--concur-start-method=spawn"]),
        ]
        baseline = None
        print(f"{n} trivial tests, best of {options.repeat} runs, Python {sys.version.split()[0]}")
        print(f"{'run':24} {'total s':>8} {'per test ms':>12} {'vs plain':>9}")
        for label, args in cases:
            total = best_run(folder, *args, repeat=options.repeat)
            if baseline is None:
                baseline = total
            per_test = (total - baseline) / n * 1000 if baseline != total else 0.0
            print(f"{label:24} {total:8.2f} {per_test:+12.3f} {total / baseline:9.2f}x")


if __name__ == "__main__":
    main()
