"""``--concur-html=FILE``: the page, its wait-for graphs, and how Chromium renders them."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from _helpers import run_maybe_fresh

DEADLOCK = """
    import threading
    import pytest

    @pytest.mark.backend("thread", "process")
    def test_deadlock():
        a, b = threading.Lock(), threading.Lock()
        a_held, b_held = threading.Event(), threading.Event()

        def other():
            with b:
                b_held.set()
                a_held.wait()
                with a:
                    pass

        worker = threading.Thread(target=other, name="other")
        worker.start()
        with a:
            a_held.set()
            b_held.wait()
            with b:
                pass
        worker.join()

    @pytest.mark.backend("thread")
    def test_inversion():
        a, b = threading.Lock(), threading.Lock()
        with a:
            with b:
                pass
        with b:
            with a:
                pass

    @pytest.mark.backend("thread", "asyncio")
    def test_fine():
        pass
"""


class _Drawing(HTMLParser):
    """The graphs of a page: per figure, its nodes and edges as their data-* say."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[dict[str, list[dict[str, str]]]]] = {}
        self._nodeid = ""
        self.details = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = {key: value or "" for key, value in attrs}
        if tag == "section" and "data-nodeid" in data:
            self._nodeid = data["data-nodeid"]
            self.sections[self._nodeid] = []
        elif tag == "svg":
            self.sections[self._nodeid].append({"nodes": [], "edges": []})
        elif tag == "g" and "data-node" in data:
            self.sections[self._nodeid][-1]["nodes"].append(data)
        elif tag == "g" and "data-from" in data:
            self.sections[self._nodeid][-1]["edges"].append(data)
        elif tag == "details":
            self.details += 1


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, pathlib.Path]:
    pytester.makepyfile(test_bank=DEADLOCK)
    result = run_maybe_fresh(
        pytester, "-n" in args, "--concur-html=out/report.html", *args, timeout=120
    )
    result.assert_outcomes(failed=3, passed=2)
    page = pytester.path / "out" / "report.html"
    result.stdout.fnmatch_lines(["*= pytest-concur summary =*", f"written: {page}"])
    return result, page


def edges(graph: dict[str, list[dict[str, str]]]) -> set[tuple[str, str, str]]:
    """Each edge as (from's type, label, to's type)."""
    types = {node["data-node"]: node["data-type"] for node in graph["nodes"]}
    return {(types[e["data-from"]], e["data-label"], types[e["data-to"]]) for e in graph["edges"]}


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_page_draws_each_deadlock_and_inversion_from_the_detectors_data(
    pytester: pytest.Pytester, xdist: list[str]
) -> None:
    _, page = run(pytester, *xdist)
    drawing = _Drawing()
    drawing.feed(page.read_text(encoding="utf-8"))
    assert sorted(drawing.sections) == [
        "test_bank.py::test_deadlock[process]",
        "test_bank.py::test_deadlock[thread]",
        "test_bank.py::test_inversion[thread]",
    ]
    assert drawing.details == 3  # each failure's text, folded
    for backend in ("thread", "process"):
        (graph,) = drawing.sections[f"test_bank.py::test_deadlock[{backend}]"]
        # Two threads, two locks: each holds one and waits for the other's.
        assert sorted(node["data-type"] for node in graph["nodes"]) == [
            "lock",
            "lock",
            "thread",
            "thread",
        ]
        assert len(graph["edges"]) == 4
        assert edges(graph) == {("thread", "holds", "lock"), ("thread", "waits for", "lock")}
        holders = {
            e["data-to"]: e["data-from"] for e in graph["edges"] if e["data-label"] == "holds"
        }
        waiters = {
            e["data-to"]: e["data-from"] for e in graph["edges"] if e["data-label"] != "holds"
        }
        assert set(holders) == set(
            waiters
        )  # every lock is held by one thread, awaited by the other
        assert all(holders[lock] != waiters[lock] for lock in holders)
    (inversion,) = drawing.sections["test_bank.py::test_inversion[thread]"]
    assert sorted(node["data-node"] for node in inversion["nodes"]) == [
        "lock-a",
        "lock-b",
        "taker-1",
        "taker-2",
    ]
    assert edges(inversion) == {("thread", "holds", "lock"), ("thread", "waits for", "lock")}


def test_without_backend_tests_the_page_says_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    pytester.runpytest("--concur-html=report.html").assert_outcomes(passed=1)
    text = (pytester.path / "report.html").read_text(encoding="utf-8")
    assert "No test ran under a backend." in text
    assert "<script" not in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Added to a copy of the page only: the report itself runs no script. It measures what
# Chromium laid out and writes it where --dump-dom shows it.
_MEASURE = """
<script>
const drawn = [...document.querySelectorAll("svg.wait-for")].map(svg => ({
  nodes: [...svg.querySelectorAll("g.node")].map(g => {
    const box = g.getBBox();
    return {id: g.dataset.node, type: g.dataset.type, width: box.width, height: box.height};
  }),
  edges: [...svg.querySelectorAll("g.edge path")].map(p => ({
    label: p.parentNode.dataset.label, length: p.getTotalLength(),
  })),
}));
const out = document.createElement("pre");
out.id = "measured";
out.textContent = JSON.stringify(drawn);
document.body.appendChild(out);
</script>
"""


def chromium(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # as root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={cwd / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_chromium_renders_the_wait_for_graph_of_a_known_deadlock(
    pytester: pytest.Pytester, tmp_path: pathlib.Path
) -> None:
    _, page = run(pytester)
    # The screenshot stays in tmp_path, an artefact of the run to look at.
    screenshot = tmp_path / "concur-report.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1100,2600", page.as_uri(), cwd=tmp_path)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000  # a drawn page, not a blank one
    measured_page = tmp_path / "measured.html"
    measured_page.write_text(
        page.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"),
        encoding="utf-8",
    )
    dom = chromium("--dump-dom", measured_page.as_uri(), cwd=tmp_path).stdout
    start = dom.index('<pre id="measured">') + len('<pre id="measured">')
    drawn = json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"'))
    assert len(drawn) == 3  # deadlock under thread and process, the inversion
    for graph in drawn:
        assert sorted(node["type"] for node in graph["nodes"]) == [
            "lock",
            "lock",
            "thread",
            "thread",
        ]
        assert all(node["width"] > 100 and node["height"] > 20 for node in graph["nodes"])
        assert sorted(edge["label"] for edge in graph["edges"]) == [
            "holds",
            "holds",
            "waits for",
            "waits for",
        ]
        assert all(edge["length"] > 20 for edge in graph["edges"])
