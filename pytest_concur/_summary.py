"""What pytest-concur found, at a glance: the summary section, JUnit properties, the JSON file.

Where the facts come from. Every report of an item that runs under a backend is read once,
where it is made (``pytest_runtest_makereport``, in the process that ran the test: an
xdist worker or the only one): the backend's name and the kinds of finding its failure
text names become entries of ``report.user_properties`` (``concur_backend``,
``concur_finding``, ``concur_detection_ms``). That attribute is public, JSON-serialisable
and kept by xdist's report serialisation, and pytest's JUnit XML writes it as
``<property>`` elements; so the controller of ``-n N`` sees what a plain run sees, and CI
tools see it too. The summary is built from the reports as they are logged
(``pytest_runtest_logreport``, which runs in the controller), never from worker state.

Classifying by text. The checks report to people, in messages whose headlines are stable
(tests pin them): "pytest-concur: deadlock: ...", "... left 1 thread running", ... A
finding is one kind per test, however many times its headline repeats (every thread of a
deadlock fails with it).

Invariant: only items that run under a backend are recorded; a session without any prints
no section and writes a report with no tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Generator, Iterable, Sequence
from typing import Any, Final, final

import pytest

from pytest_concur._state import parametrized_backend

# -- kinds of finding ----------------------------------------------------------------------

DEADLOCK: Final = "deadlock"
INVERSION: Final = "lock-order inversion"
BACKGROUND_ERROR: Final = "background error"
BLOCKED_LOOP: Final = "blocked loop"
HANG: Final = "hang"
CRASHED_CHILD: Final = "crashed child"

# The headlines each kind is reported with, in the order the summary lists kinds.
_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        (DEADLOCK, r"pytest-concur: deadlock: "),
        (INVERSION, r"pytest-concur: potential deadlock: two locks are taken in both orders"),
        ("leak (thread)", r"pytest-concur: .*\bleft \d+ threads? running"),
        ("leak (task)", r"pytest-concur: .*\bleft \d+ tasks? pending"),
        ("leak (process)", r"pytest-concur: .*\bleft \d+ child process(es)? running"),
        ("leak (pool)", r"pytest-concur: .*\bleft \d+ (thread|process) pools? open"),
        ("leak (loop)", r"pytest-concur: .*\bleft \d+ event loops? open"),
        ("leak (worker)", r"pytest-concur: \d+ workers? (was|were) never joined"),
        ("leak (coroutine)", r"pytest-concur: coroutine .* was never awaited"),
        (BACKGROUND_ERROR, r"pytest-concur: .* raised an exception that nobody retrieved"),
        (BACKGROUND_ERROR, r"pytest-concur: an exception was raised in thread "),
        (BLOCKED_LOOP, r"pytest-concur: the event loop was blocked: "),
        (HANG, r"Timeout \(>[0-9.e+-]+s, .*\): pytest-concur found no deadlock"),
        (CRASHED_CHILD, r"the child process \(pid \d+\) running .* before it reported an outcome"),
    )
)
KINDS: Final[tuple[str, ...]] = tuple(dict.fromkeys(kind for kind, _ in _PATTERNS))
# How long the deadlock detector took, from the moment the last of the deadlocked waits
# began (see _locks._render).
_LATENCY = re.compile(r"\bfound ([0-9.]+) ms after the last of these waits began")

BACKEND_PROPERTY: Final = "concur_backend"
FINDING_PROPERTY: Final = "concur_finding"
LATENCY_PROPERTY: Final = "concur_detection_ms"
REPORT_OPTION: Final = "--concur-report"
# The document's kind and the version of its schema (docs/report.schema.json): bumped when a
# field is removed or changes meaning, or a new kind of finding or outcome may appear.
REPORT_KIND: Final = "pytest-concur report"
SCHEMA_VERSION: Final = 1


def classify(text: str) -> list[str]:
    """The kinds of finding a failure text reports, each once, in :data:`KINDS` order."""
    return list(dict.fromkeys(kind for kind, pattern in _PATTERNS if pattern.search(text)))


def detection_ms(text: str) -> float | None:
    """How long the detector took to find the deadlock the text reports, if it says."""
    match = _LATENCY.search(text)
    return float(match.group(1)) if match else None


# -- what each backend item's reports carry -------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    name = parametrized_backend(item)
    if name is not None and call.when == "setup":
        # Before the report is made from the item's list: every phase's report has it.
        item.user_properties.append((BACKEND_PROPERTY, name))
    report = yield
    if "pytest_concur._locks" in sys.modules:
        from pytest_concur import _locks

        graphs = _locks.take_graphs()
        if graphs:
            # Plain data on the report: xdist's serialisation keeps it (see the module).
            report.concur_graphs = graphs  # type: ignore[attr-defined]
    if name is None or not report.failed:
        return report
    text = report.longreprtext
    found: list[tuple[str, object]] = [(FINDING_PROPERTY, kind) for kind in classify(text)]
    latency = detection_ms(text)
    if latency is not None:
        found.append((LATENCY_PROPERTY, latency))
    for entry in found:
        if entry not in item.user_properties:
            # The item's list for the reports of later phases (JUnit XML writes the
            # teardown report's), this report's own for the summary and xdist.
            item.user_properties.append(entry)
        if entry not in report.user_properties:
            report.user_properties.append(entry)
    return report


# -- the controller's record ----------------------------------------------------------------


@final
@dataclasses.dataclass(slots=True)  # one per backend item: 10,000 in a big session
class Record:
    """One item that ran under a backend, as its reports told.

    Lean on purpose: the controller of a big session keeps one per item, beside the
    reports pytest's terminal reporter keeps. What most items never have (findings,
    failures, graphs) is an empty tuple shared by all, and the test's name without its
    backend is worked out when asked.
    """

    nodeid: str
    backend: str
    outcome: str = "passed"
    findings: tuple[str, ...] = ()
    detection_ms: float | None = None
    duration: float = 0.0
    # (phase, pytest's failure text) of each phase that failed, for the HTML report.
    failures: tuple[tuple[str, str], ...] = ()
    # The deadlock check's wait-for graphs (see _locks.wait_for_graph).
    graphs: tuple[dict[str, Any], ...] = ()

    @property
    def test(self) -> str:
        """The nodeid without the backend in its parameter id."""
        return _without_backend(self.nodeid, self.backend)


_RECORDS = pytest.StashKey[dict[str, Record]]()
# Under xdist: each nodeid's place in the collection, as the workers reported it.
_ORDER = pytest.StashKey[dict[str, int]]()
# How bad an outcome is: a later phase's outcome replaces an earlier one only if worse.
_RANK: Final = {"passed": 0, "xpassed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}
OUTCOMES: Final = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


@final
class Collector:
    """Registered once per config: records the reports as they are logged, then tells."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, Record] = config.stash.setdefault(_RECORDS, {})
        self.written: list[str] = []  # the files of --concur-report and --concur-html
        self._entries: dict[str, tuple[str, str]] = {}  # see _backend_of

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        backend = self._backend_of(report)
        if backend is None:
            return
        record = self.records.get(report.nodeid)
        if record is None:
            record = self.records[report.nodeid] = Record(report.nodeid, backend)
        record.duration += report.duration
        if report.failed:
            record.failures += ((str(report.when), report.longreprtext),)
        for graph in getattr(report, "concur_graphs", None) or ():
            if isinstance(graph, dict) and graph not in record.graphs:
                record.graphs += (graph,)
        # Any length: a user's entry or another plugin's may not be a pair.
        for key, value in (entry for entry in report.user_properties if len(entry) == 2):
            if key == FINDING_PROPERTY and value not in record.findings:
                record.findings += (str(value),)
            elif key == LATENCY_PROPERTY and isinstance(value, (int, float)):
                record.detection_ms = float(value)
        outcome = _outcome(report)
        if outcome is not None and _RANK[outcome] >= _RANK[record.outcome]:
            record.outcome = outcome

    def _backend_of(self, report: pytest.TestReport) -> str | None:
        """The report's backend; its property entry made the one this process shares.

        Under xdist every report reaches the controller as a fresh copy, with its own
        tuple and strings for ``("concur_backend", "thread")``, and pytest's terminal
        reporter keeps every report to the end of the session: three copies an item, half
        a kilobyte, in a session of 10,000 items 5 MB. One shared entry per backend
        instead (tuples and strings are immutable: nobody can tell).
        """
        properties = report.user_properties
        for index, entry in enumerate(properties):
            if len(entry) == 2 and entry[0] == BACKEND_PROPERTY:
                backend = str(entry[1])
                shared = self._entries.setdefault(backend, (BACKEND_PROPERTY, backend))
                if entry is not shared and isinstance(entry, tuple):
                    properties[index] = shared
                return shared[1]
        return None

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: Sequence[str]) -> None:
        # Reports come in the order the workers finish them: list the tests in the order
        # they were collected instead, the same whatever the scheduling.
        order = self.config.stash.setdefault(_ORDER, {})
        for nodeid in ids:
            order.setdefault(nodeid, len(order))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        config = self.config
        if hasattr(config, "workerinput"):
            return  # an xdist worker: the controller prints the summary
        reportchars = getattr(config.option, "reportchars", "") or ""
        matrix = "A" in reportchars or config.get_verbosity() >= 2
        lines = summary_lines(config, matrix)
        lines.extend(f"written: {path}" for path in self.written)
        if not lines:
            return
        terminalreporter.write_sep("=", "pytest-concur summary")
        for line in lines:
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        config = self.config
        if hasattr(config, "workerinput"):
            return  # the controller writes the files, from every worker's reports
        here = config.invocation_params.dir
        path = config.getoption("concur_report", None)
        if path:
            self.written.append(write_report(config, os.path.join(here, path)))


# The name the plugin registers its Collector under.
COLLECTOR = "concur-summary-collector"


def _outcome(report: pytest.TestReport) -> str | None:
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            return "xpassed" if xfail else "passed"
        if report.skipped:
            return "xfailed" if xfail else "skipped"
        return "failed"
    if report.failed:
        return "error"
    if report.skipped:  # at setup: a skip marker, a skip in a fixture
        return "xfailed" if xfail else "skipped"
    return None


def _without_backend(nodeid: str, backend: str) -> str:
    """``test_x[thread-4]`` -> ``test_x[4]``; ``test_x[thread]`` -> ``test_x``."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    head, _, ids = nodeid[:-1].partition("[")
    parts = ids.split("-")
    if backend in parts:
        parts.remove(backend)
    return f"{head}[{'-'.join(parts)}]" if parts else head


def records(config: pytest.Config) -> list[Record]:
    """The items that ran under a backend, in the order they were collected."""
    done = list(config.stash.get(_RECORDS, {}).values())
    order = config.stash.get(_ORDER, None)
    if order:  # else they ran, and were reported, in that order
        done.sort(key=lambda record: order.get(record.nodeid, len(order)))
    return done


def backend_names(config: pytest.Config, done: list[Record]) -> list[str]:
    """The backends that ran, in the registry's order (under xdist reports come any way)."""
    from pytest_concur._registry import REGISTRY

    ran = {record.backend for record in done}
    known = list(config.stash.get(REGISTRY, {}))
    return [name for name in known if name in ran] + sorted(ran.difference(known))


# -- the terminal section -------------------------------------------------------------------

_MAX_LISTED = 10


def summary_lines(config: pytest.Config, matrix: bool) -> list[str]:
    """The lines of the summary section; none when no item ran under a backend."""
    done = records(config)
    if not done:
        return []
    backends = backend_names(config, done)
    width = max(len(name) for name in backends) + 1
    lines = []
    for backend in backends:
        counts = count(record.outcome for record in done if record.backend == backend)
        lines.append(f"{backend + ':':<{width}} {counts}")
    lines.append(f"findings: {count(k for r in done for k in r.findings) or 'none'}")
    listed = differing(done)
    if listed:
        lines.append(f"outcome differs between backends ({len(listed)}):")
        for test, cells in listed[:_MAX_LISTED]:
            outcomes = ", ".join(f"{b} {cells[b]}" for b in backends if b in cells)
            lines.append(f"  {test}: {outcomes}")
        if len(listed) > _MAX_LISTED:
            lines.append(f"  ... and {len(listed) - _MAX_LISTED} more (-rA shows every test)")
    if matrix:
        lines.append("")
        lines.extend(_matrix(done, backends))
    return lines


def _tally(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def count(names: Iterable[str]) -> str:
    """``2 passed, 1 failed``, in the order of :data:`OUTCOMES` and :data:`KINDS`."""
    order = {name: index for index, name in enumerate(OUTCOMES + KINDS)}
    counts = sorted(_tally(names).items(), key=lambda item: order.get(item[0], len(order)))
    return ", ".join(f"{count} {name}" for name, count in counts)


def by_test(done: list[Record]) -> dict[str, dict[str, str]]:
    tests: dict[str, dict[str, str]] = {}
    for record in done:
        tests.setdefault(record.test, {})[record.backend] = record.outcome
    return tests


def differing(done: list[Record]) -> list[tuple[str, dict[str, str]]]:
    return [(test, cells) for test, cells in by_test(done).items() if len(set(cells.values())) > 1]


def _matrix(done: list[Record], backends: list[str]) -> list[str]:
    tests = by_test(done)
    first = max(len("test"), *(len(test) for test in tests))
    width = max(*(len(b) for b in backends), *(len(o) for o in OUTCOMES))

    def row(name: str, cells: list[str]) -> str:
        return "  ".join([f"{name:<{first}}"] + [f"{cell:<{width}}" for cell in cells]).rstrip()

    rows = [row("test", backends)]
    rows.extend(row(test, [cells.get(b, "-") for b in backends]) for test, cells in tests.items())
    return rows


# -- the JSON file --------------------------------------------------------------------------


def report_data(config: pytest.Config) -> dict[str, Any]:
    """The ``--concur-report`` document (schema: docs/report.schema.json)."""
    done = records(config)
    backends = backend_names(config, done)
    return {
        "report": REPORT_KIND,
        "version": SCHEMA_VERSION,
        "backends": backends,
        "outcomes": {
            backend: _tally(r.outcome for r in done if r.backend == backend) for backend in backends
        },
        "findings": _tally(kind for record in done for kind in record.findings),
        "differing": [test for test, _ in differing(done)],
        "tests": [
            {
                "nodeid": record.nodeid,
                "test": record.test,
                "backend": record.backend,
                "outcome": record.outcome,
                "findings": list(record.findings),
                "detection_ms": record.detection_ms,
                "duration": round(record.duration, 6),
            }
            for record in done
        ],
    }


def write_report(config: pytest.Config, path: str) -> str:
    """Write the ``--concur-report`` document to ``path``; the absolute path."""
    return write_file(path, json.dumps(report_data(config), indent=2) + "\n")


def note_written(config: pytest.Config, path: str) -> None:
    """List ``path`` among the files the summary section says were written."""
    collector = config.pluginmanager.get_plugin(COLLECTOR)
    if isinstance(collector, Collector):
        collector.written.append(path)


def write_file(path: str, text: str) -> str:
    """Write ``text`` to ``path``, making its directories; the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return path
