"""How often stress mode exposes a race, with 1, 2, 4 and 8 copies under the thread backend.

Run by hand (never in CI; the machines are shared and noisy):

    python benchmarks/stress.py [--runs 100] [--run-parallel-python PATH]

It writes a test module with a racy counter (``value = self.value``, a yield, then
``self.value = value + 1``) and a correct one (the same under a lock), parametrized into
``--runs`` items, and runs it with ``--concur-backends=thread --concur-workers=N``. Each
item is one run: every copy increments the shared counter, the copies meet at a barrier,
and each checks the total. It prints how many runs out of ``--runs`` failed, that is
exposed the race. The correct counter must never fail.

pytest-run-parallel runs the same module with ``--parallel-threads=N`` in the same run
when it is importable by this interpreter, or by the one given with
``--run-parallel-python`` (a separate virtualenv keeps it out of this project's own test
runs); otherwise its column says so.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = """
import threading
import time

import pytest

INCREMENTS = 50


class RacyCounter:
    def __init__(self):
        self.value = 0

    def increment(self):
        value = self.value
        time.sleep(0)  # a yield between the read and the write
        self.value = value + 1


class SafeCounter(RacyCounter):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def increment(self):
        with self.lock:
            super().increment()


@pytest.fixture
def copies(request):
    # The same module runs under pytest-concur (worker_count) and pytest-run-parallel
    # (num_parallel_threads); plainly, it is 1.
    for name in ("worker_count", "num_parallel_threads"):
        try:
            return request.getfixturevalue(name)
        except pytest.FixtureLookupError:
            pass
    return 1


@pytest.fixture
def shared(copies):
    # Function-scoped fixtures are set up once per item and shared by its copies.
    return {{"racy": RacyCounter(), "safe": SafeCounter(), "barrier": threading.Barrier(copies)}}


@pytest.mark.parametrize("run", range({runs}))
@pytest.mark.parametrize("kind", ["racy", "safe"])
def test_counter(kind, run, shared, copies):
    counter = shared[kind]
    for _ in range(INCREMENTS):
        counter.increment()
    shared["barrier"].wait()
    assert counter.value == INCREMENTS * copies
"""


def run(python: str, folder: Path, *args: str) -> tuple[dict[str, int], float]:
    """Failed runs of each counter kind, and the wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"pytest {' '.join(args)} broke:\n{proc.stdout}\n{proc.stderr}")
    failed = {"racy": 0, "safe": 0}
    for line in proc.stdout.splitlines():
        # One line per failed (or errored) item in the short summary.
        match = re.match(
            r"(?:PARALLEL )?(FAILED|ERROR) \S*test_counter\[(?:\w+-)?(racy|safe)-\d+\]", line
        )
        if match:
            failed[match.group(2)] += 1
    return failed, elapsed


def has_run_parallel(python: str) -> bool:
    proc = subprocess.run(
        [python, "-c", "import pytest_run_parallel"], capture_output=True, check=False
    )
    return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument(
        "--run-parallel-python",
        default=sys.executable,
        help="an interpreter that has pytest-run-parallel installed (default: this one)",
    )
    options = parser.parse_args()
    runs = options.runs
    rp_python = options.run_parallel_python
    rp = has_run_parallel(rp_python)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_race.py").write_text(BODY.format(runs=runs))
        print(f"runs out of {runs} that exposed the race (thread backend; racy / correct)")
        header = f"{'workers':>7}  {'pytest-concur':>22}  {'pytest-run-parallel':>22}"
        print(header)
        print("-" * len(header))
        for workers in (int(w) for w in options.workers.split(",")):
            ours, our_time = run(
                sys.executable,
                folder,
                "--concur-backends=thread",
                f"--concur-workers={workers}",
            )
            cell = f"{ours['racy']:>3} / {ours['safe']:<3} {our_time:5.1f}s"
            if rp:
                theirs, their_time = run(rp_python, folder, f"--parallel-threads={workers}")
                other = f"{theirs['racy']:>3} / {theirs['safe']:<3} {their_time:5.1f}s"
            else:
                other = "not installed"
            print(f"{workers:>7}  {cell:>22}  {other:>22}")
        if not rp:
            print(
                "pytest-run-parallel is not importable by "
                f"{rp_python}; pass --run-parallel-python to compare."
            )


if __name__ == "__main__":
    main()
