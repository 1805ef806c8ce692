"""Stacks as a person reads them: the frames of the test's code, none of the harness's.

A leaf (standard library only): the deadlock report, the hang report and a crashed
child's faulthandler dump all show stacks, and all leave out the same frames: pytest's,
pluggy's, pytest-concur's own, the interpreter's start, an event loop's running, a thread's
start, and what a forked child copied of its parent's stack.
"""

from __future__ import annotations

import os
import traceback
from types import FrameType

import pytest_concur

# Where pytest-concur's code is: its frames are never the user's.
PACKAGE = os.path.join(os.path.dirname(os.path.abspath(pytest_concur.__file__)), "")


def is_ours(filename: str) -> bool:
    """Whether code of ``filename`` is pytest-concur's."""
    return filename.startswith(PACKAGE)


def short_path(filename: str) -> str:
    """``filename`` relative to the working directory when it is under it."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive, on Windows
        return filename
    return filename if relative.startswith(os.pardir) else relative


# Frames that are never where a test stands: pytest's and pluggy's calls down to the test,
# the interpreter's start, an event loop's own running, a thread's start.
_NOISE = (
    os.sep + "_pytest" + os.sep,
    os.sep + "pluggy" + os.sep,
    os.path.join("pytest", "__main__.py"),
    "<frozen runpy>",
    os.path.join("asyncio", "base_events.py"),
    os.path.join("asyncio", "events.py"),
    os.path.join("asyncio", "runners.py"),
    os.path.join("multiprocessing", "process.py"),
    os.path.join("multiprocessing", "popen_fork.py"),
    os.path.join("multiprocessing", "context.py"),
    os.path.join("multiprocessing", "forkserver.py"),
    os.path.join("multiprocessing", "spawn.py"),
    # pytest-xdist's worker: its start-up and the I/O thread of execnet.
    os.sep + "execnet" + os.sep,
    os.sep + "xdist" + os.sep,
)
_THREAD_START = ("run", "_bootstrap", "_bootstrap_inner")
# Where a multiprocessing child's own life starts: what its stack holds before that frame
# is how it was started (a fork copies the whole stack of its parent, pytest's included).
_CHILD_START = (os.path.join("multiprocessing", "process.py"), "_bootstrap")
# A stack deeper than this shows its oldest and newest calls only.
_MAX_FRAMES = 40
_OLDEST_KEPT = 8


def _is_noise(filename: str, name: str) -> bool:
    if is_ours(filename) or any(part in filename for part in _NOISE):
        return True
    if filename == "<string>" and name == "<module>":
        return True  # the ``python -c`` that started a spawned child or an xdist worker
    return filename.endswith("threading.py") and name in _THREAD_START


def _is_child_start(filename: str, name: str) -> bool:
    return filename.endswith(_CHILD_START[0]) and name == _CHILD_START[1]


def stack_lines(frame: FrameType | None) -> list[str]:
    """A thread's stack, oldest call first, without the frames of :data:`_NOISE`.

    Also what a deadlock's report shows of each thread (see ``_locks``): in a process
    backend's child, a stack starts with the parent's pytest frames, copied by the fork.
    """
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), capture_locals=False)
    entries = list(reversed(summary))
    starts = [i for i, entry in enumerate(entries) if _is_child_start(entry.filename, entry.name)]
    if starts:
        entries = entries[starts[-1] + 1 :]
    entries = [entry for entry in entries if not _is_noise(entry.filename, entry.name)]
    hidden = len(entries) - _MAX_FRAMES
    if hidden > 0:
        older = traceback.StackSummary.from_list(entries[:_OLDEST_KEPT]).format()
        newer = traceback.StackSummary.from_list(entries[_OLDEST_KEPT + hidden :]).format()
        text = "".join([*older, f"  ... ({hidden} calls not shown) ...\n", *newer])
    else:
        text = "".join(traceback.StackSummary.from_list(entries).format())
    return text.rstrip("\n").splitlines()


def filter_dump(text: str) -> str:
    """A faulthandler dump without the frames of :data:`_NOISE`.

    Its stacks list the most recent call first: a child's start ends what is kept of each.
    """
    kept = []
    started = False  # past the child's start, in the stack of the thread at hand
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith('File "') and " in " in stripped:
            filename = stripped[len('File "') :].split('"', 1)[0]
            name = stripped.rsplit(" in ", 1)[-1]
            if started or _is_noise(filename, name):
                started = started or _is_child_start(filename, name)
                continue
        else:
            started = False
        kept.append(line)
    return "\n".join(kept)
