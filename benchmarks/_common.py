"""What the benchmarks share: timing whole pytest runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def pytest_run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One quiet pytest run in ``folder`` (no cache), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        capture_output=True,
        text=True,
    )


def best_run(folder: Path, *args: str, repeat: int) -> float:
    """The best wall time of ``repeat`` pytest runs in ``folder``; exit if one fails."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        proc = pytest_run(folder, *args)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"pytest {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        best = min(best, elapsed)
    return best
