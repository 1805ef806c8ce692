"""What happens when a backend test reaches its deadline without a proven deadlock.

Three parts, one module each:

- ``_at_deadline``: the hang report: every thread with its stack, held locks and wait, every
  pending task with its await chain, every child process (:func:`report`, and
  :func:`report_in_child` inside a child of the process backend);
- ``_children``: the child processes: asking them for their stacks with a signal, reading
  them from outside, ``/proc``; the process backend's registration of its children;
- ``_release``: letting go of the stuck threads (:func:`release`), so the session goes on.

All of it runs in a signal handler in the main thread: it never blocks on a lock and bounds
every wait (see each module). This ``__init__`` only hands the names on.
"""

from __future__ import annotations

from pytest_concur._hang._at_deadline import report, report_in_child
from pytest_concur._hang._children import (
    DUMP_SIGNAL,
    REPORT_END,
    REPORT_START,
    ask_for_stacks,
    descendants,
    forget_stack_file,
    install_parent_handler,
    proc_stat,
    register_stack_file,
    reported,
)
from pytest_concur._hang._release import release

__all__ = [
    "DUMP_SIGNAL",
    "REPORT_END",
    "REPORT_START",
    "ask_for_stacks",
    "descendants",
    "forget_stack_file",
    "install_parent_handler",
    "proc_stat",
    "register_stack_file",
    "release",
    "report",
    "report_in_child",
    "reported",
]
