"""``--concur-html=FILE``: one self-contained page of what pytest-concur saw.

The page needs nothing but itself (no script, no stylesheet or font from elsewhere), so a
CI artefact opens anywhere, offline. It has the summary (per backend, by kind, the tests
that differ, the matrix), then one section per test that failed under a backend: its
findings, the wait-for graph of each deadlock and lock-order inversion drawn as SVG, and
pytest's failure text folded (``<details>``), stacks and all.

The graphs are the detector's own data (``_locks.wait_for_graph``), carried on the
reports; nothing here reads the failure text. Nodes and edges carry ``data-*`` attributes
(``data-node``, ``data-type``, ``data-from``, ``data-to``, ``data-label``) for tools and
tests to read the drawing back.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_concur import _summary

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
h3 { font-size: 1em; font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
td.passed, td.xfailed { background: #e6f4ea; } td.failed, td.error { background: #fce8e6; }
td.skipped, td.xpassed { background: #fef7e0; }
.kind { display: inline-block; border-radius: .8em; padding: 0 .6em; margin-right: .3em;
        background: #fce8e6; color: #a50e0e; font-size: .9em; }
section.test { border-top: 1px solid #ddd; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
figure { margin: 1em 0; } figcaption { font-weight: 600; margin-bottom: .3em; }
svg text { font: 12px ui-monospace, monospace; }
svg .thread ellipse { fill: #e8f0fe; stroke: #1a73e8; stroke-width: 1.5; }
svg .lock rect { fill: #fef7e0; stroke: #b06000; stroke-width: 1.5; }
svg .edge path { fill: none; stroke-width: 1.6; }
svg .edge.holds path { stroke: #188038; }
svg .edge.waits-for path { stroke: #c5221f; stroke-dasharray: 6 3; }
svg .edge.joins path { stroke: #5f6368; stroke-dasharray: 2 3; }
svg .detail { fill: #5f6368; font-size: 10px; }
"""


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the page (registered only when ``--concur-html`` is given)."""
    config = session.config
    page = config.getoption("concur_html", None)
    if not page or hasattr(config, "workerinput"):
        return  # xdist: the controller writes it, from every worker's reports
    path = os.path.join(config.invocation_params.dir, page)
    _summary.note_written(config, write(config, _summary.records(config), path))


def write(config: pytest.Config, records: Sequence[_summary.Record], path: str) -> str:
    """Write the page for ``records`` to ``path`` (directories are made); the absolute path."""
    return _summary.write_file(path, page(config, list(records)))


def page(config: pytest.Config, records: list[_summary.Record]) -> str:
    """The whole HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>pytest-concur report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>pytest-concur report</h1>",
    ]
    if not records:
        parts.append("<p>No test ran under a backend.</p>")
    else:
        parts.extend(_summary_html(config, records))
        failed = [record for record in records if record.failures or record.findings]
        if failed:
            parts.append(f"<h2>Failures and findings ({len(failed)})</h2>")
            parts.extend(_test_html(record) for record in failed)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _summary_html(config: pytest.Config, records: list[_summary.Record]) -> list[str]:
    backends = _summary.backend_names(config, records)
    rows = []
    for backend in backends:
        counts = _summary.count(r.outcome for r in records if r.backend == backend)
        rows.append(f"<tr><th>{_e(backend)}</th><td>{_e(counts)}</td></tr>")
    kinds = _summary.count(kind for record in records for kind in record.findings)
    parts = [
        '<h2>Summary</h2><table id="outcomes">',
        *rows,
        "</table>",
        f'<p id="findings">Findings: {_e(kinds or "none")}</p>',
    ]
    differing = _summary.differing(records)
    if differing:
        items = "".join(f"<li><code>{_e(test)}</code></li>" for test, _ in differing)
        parts.append(f"<p>Outcome differs between backends:</p><ul>{items}</ul>")
    header = "".join(f"<th>{_e(b)}</th>" for b in backends)
    body = []
    for test, cells in _summary.by_test(records).items():
        row = "".join(
            f'<td class="{_e(cells.get(b, ""))}">{_e(cells.get(b, "-"))}</td>' for b in backends
        )
        body.append(f"<tr><td><code>{_e(test)}</code></td>{row}</tr>")
    parts.append(f'<table id="matrix"><tr><th>test</th>{header}</tr>{"".join(body)}</table>')
    return parts


def _test_html(record: _summary.Record) -> str:
    kinds = "".join(f'<span class="kind">{_e(kind)}</span>' for kind in record.findings)
    parts = [
        f'<section class="test" data-nodeid="{_e(record.nodeid)}">',
        f"<h3>{_e(record.nodeid)}</h3>",
        f"<p>{_e(record.outcome)} under {_e(record.backend)} {kinds}</p>",
    ]
    if record.detection_ms is not None:
        parts.append(f"<p>Deadlock found {record.detection_ms:g} ms after its last wait began.</p>")
    for graph in record.graphs:
        parts.append(
            f'<figure class="graph"><figcaption>{_e(graph.get("title", ""))}</figcaption>'
            f"{svg(graph)}</figure>"
        )
    for when, text in record.failures:
        parts.append(
            f"<details><summary>Failure at {_e(when)} (stacks and all)</summary>"
            f"<pre>{_e(text)}</pre></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


# -- the wait-for graph -----------------------------------------------------------------

_NODE_W = 240  # a node's box; labels longer than fit are cut (the full text is its title)
_NODE_H = 46


def svg(graph: dict[str, Any]) -> str:
    """The graph drawn: nodes on a circle (threads as ellipses, locks as boxes), edges as
    arrows labelled "holds", "waits for" or "joins"."""
    nodes: list[dict[str, str]] = [n for n in graph.get("nodes", ()) if isinstance(n, dict)]
    edges: list[dict[str, str]] = [e for e in graph.get("edges", ()) if isinstance(e, dict)]
    count = max(len(nodes), 1)
    radius = 0 if count == 1 else max(120.0, count * (_NODE_W + 30) / (2 * math.pi))
    width = int(2 * radius + _NODE_W + 40)
    height = int(2 * radius + _NODE_H + 60)
    cx, cy = width / 2, height / 2
    where: dict[str, tuple[float, float]] = {}
    for index, node in enumerate(nodes):
        angle = -math.pi / 2 + 2 * math.pi * index / count
        where[node["id"]] = (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="wait-for" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        "<defs>",
        *(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="10" refY="5" '
            f'markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
            for name, colour in (
                ("holds", "#188038"),
                ("waits-for", "#c5221f"),
                ("joins", "#5f6368"),
            )
        ),
        "</defs>",
    ]
    seen: dict[tuple[str, str], int] = {}
    for edge in edges:
        start, end = where.get(edge.get("from", "")), where.get(edge.get("to", ""))
        if start is None or end is None:
            continue
        pair = (min(edge["from"], edge["to"]), max(edge["from"], edge["to"]))
        nth = seen[pair] = seen.get(pair, -1) + 1
        parts.append(_edge(edge, start, end, nth))
    for node in nodes:
        parts.append(_node(node, *where[node["id"]]))
    parts.append("</svg>")
    return "".join(parts)


def _edge(
    edge: dict[str, str], start: tuple[float, float], end: tuple[float, float], nth: int
) -> str:
    label = edge.get("label", "")
    css = label.replace(" ", "-")
    (x1, y1), (x2, y2) = _clip(start, end), _clip(end, start)
    # Edges between the same two nodes bend apart: the first straight, then either side.
    bend = 0 if nth == 0 else 40 * ((nth + 1) // 2) * (1 if nth % 2 else -1)
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    mx = (x1 + x2) / 2 - bend * (y2 - y1) / length
    my = (y1 + y2) / 2 + bend * (x2 - x1) / length
    return (
        f'<g class="edge {_e(css)}" data-from="{_e(edge.get("from"))}" '
        f'data-to="{_e(edge.get("to"))}" data-label="{_e(label)}">'
        f'<path d="M{x1:.1f},{y1:.1f} Q{mx:.1f},{my:.1f} {x2:.1f},{y2:.1f}" '
        f'marker-end="url(#arrow-{_e(css)})"/>'
        f'<text x="{mx:.1f}" y="{my - 4:.1f}" text-anchor="middle">{_e(label)}</text></g>'
    )


def _clip(point: tuple[float, float], towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from a node's centre towards another leaves the node's box."""
    (x, y), (tx, ty) = point, towards
    dx, dy = tx - x, ty - y
    if dx == 0 and dy == 0:
        return point
    scale = min(
        (_NODE_W / 2) / abs(dx) if dx else math.inf, (_NODE_H / 2) / abs(dy) if dy else math.inf
    )
    return (x + dx * scale, y + dy * scale)


def _node(node: dict[str, str], x: float, y: float) -> str:
    kind = node.get("type", "")
    label, detail = node.get("label", ""), node.get("detail", "")
    if kind == "thread":
        shape = f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{_NODE_W / 2}" ry="{_NODE_H / 2}"/>'
    else:
        shape = (
            f'<rect x="{x - _NODE_W / 2:.1f}" y="{y - _NODE_H / 2:.1f}" width="{_NODE_W}" '
            f'height="{_NODE_H}" rx="4"/>'
        )
    return (
        f'<g class="node {_e(kind)}" data-node="{_e(node.get("id"))}" data-type="{_e(kind)}">'
        f"<title>{_e(label)} {_e(detail)}</title>{shape}"
        f'<text x="{x:.1f}" y="{y - 3:.1f}" text-anchor="middle">{_e(_cut(label, 32))}</text>'
        f'<text class="detail" x="{x:.1f}" y="{y + 12:.1f}" text-anchor="middle">'
        f"{_e(_cut(detail, 40))}</text></g>"
    )


def _cut(text: str, most: int) -> str:
    """The start of ``text``: a site's file and line come first (its title has it all)."""
    return text if len(text) <= most else text[: most - 1] + "…"
