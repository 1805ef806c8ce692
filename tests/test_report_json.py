"""``--concur-report=FILE.json``: the document CI tools read, checked against its schema."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from _helpers import run_maybe_fresh

from pytest_concur import _summary

SCHEMA_PATH = pathlib.Path(__file__).parent.parent / "docs" / "report.schema.json"


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


# -- a validator for the part of JSON Schema the report's schema uses ----------------------

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def problems(value: Any, node: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """What in ``value`` breaks the schema ``node``: one line per problem, with its path."""
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        return problems(value, root["$defs"][name], root, at)
    found: list[str] = []
    if "type" in node:
        names = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if isinstance(value, bool) and "boolean" not in names:
            return [f"{at}: {value!r} is not of type {names}"]
        if not any(isinstance(value, _TYPES[name]) for name in names):
            return [f"{at}: {value!r} is not of type {names}"]
    if "const" in node and value != node["const"]:
        found.append(f"{at}: {value!r} is not {node['const']!r}")
    if "enum" in node and value not in node["enum"]:
        found.append(f"{at}: {value!r} is not one of {node['enum']}")
    if "minimum" in node and isinstance(value, (int, float)) and value < node["minimum"]:
        found.append(f"{at}: {value!r} is below {node['minimum']}")
    if isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            found += problems(item, node["items"], root, f"{at}[{index}]")
    if isinstance(value, dict):
        found += [
            f"{at}: {key!r} is missing" for key in node.get("required", ()) if key not in value
        ]
        properties = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in node:
                found += problems(key, node["propertyNames"], root, f"{at} key {key!r}")
            if key in properties:
                found += problems(item, properties[key], root, f"{at}.{key}")
            elif extra is False:
                found.append(f"{at}: unexpected {key!r}")
            elif isinstance(extra, dict):
                found += problems(item, extra, root, f"{at}.{key}")
    return found


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"report": "pytest-concur report"}, "$: 'version' is missing"),
        ({"version": 2}, "$.version: 2 is not 1"),
        ({"findings": {"deadlock": 0}}, "$.findings.deadlock: 0 is below 1"),
        ({"findings": {"livelock": 1}}, "$.findings key 'livelock': 'livelock' is not one of"),
        ({"tests": [{"outcome": "fine"}]}, "$.tests[0].outcome: 'fine' is not one of"),
        ({"tests": [{"detection_ms": "3"}]}, "$.tests[0].detection_ms: '3' is not of type"),
        ({"extra": True}, "$: unexpected 'extra'"),
    ],
)
def test_the_validator_rejects_what_the_schema_forbids(document: Any, problem: str) -> None:
    # The validator is written here (no dependency for it): it must be able to fail.
    found = problems(document, schema(), schema())
    assert any(line.startswith(problem) for line in found), found


def test_the_schema_names_every_kind_and_outcome_the_plugin_reports() -> None:
    definitions = schema()["$defs"]
    assert definitions["kind"]["enum"] == list(_summary.KINDS)
    assert definitions["outcome"]["enum"] == list(_summary.OUTCOMES)
    assert schema()["properties"]["version"]["const"] == _summary.SCHEMA_VERSION


TESTS = """
    import threading, time
    import pytest

    @pytest.mark.backend("thread", "asyncio")
    def test_fine():
        pass

    @pytest.mark.backend("thread", "process")
    def test_deadlock(concur_backend):
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()

    @pytest.mark.backend("thread")
    def test_leak():
        threading.Thread(target=time.sleep, args=(3,), daemon=True).start()

    @pytest.mark.backend("asyncio")
    def test_skipped():
        pytest.skip("not today")

    def test_plain():
        pass
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_report_matches_its_schema_and_says_what_ran(
    pytester: pytest.Pytester, xdist: list[str]
) -> None:
    pytester.makepyfile(TESTS)
    args = ["--concur-report=out/report.json", "-o", "concur_leak_grace=0.2", *xdist]
    result = run_maybe_fresh(pytester, bool(xdist), *args, timeout=120)
    result.assert_outcomes(passed=3, failed=3, skipped=1)
    document = json.loads((pytester.path / "out" / "report.json").read_text(encoding="utf-8"))
    assert problems(document, schema(), schema()) == []
    assert document["backends"] == ["thread", "process", "asyncio"]
    assert document["outcomes"] == {
        "thread": {"passed": 1, "failed": 2},
        "process": {"failed": 1},
        "asyncio": {"passed": 1, "skipped": 1},
    }
    assert document["findings"] == {"deadlock": 2, "leak (thread)": 1}
    assert document["differing"] == []
    tests = {test["nodeid"]: test for test in document["tests"]}
    name = "test_the_report_matches_its_schema_and_says_what_ran.py"
    assert sorted(tests) == sorted(
        f"{name}::{test}"
        for test in (
            "test_fine[thread]",
            "test_fine[asyncio]",
            "test_deadlock[thread]",
            "test_deadlock[process]",
            "test_leak[thread]",
            "test_skipped[asyncio]",
        )
    )
    deadlock = tests[f"{name}::test_deadlock[process]"]
    assert deadlock["test"] == f"{name}::test_deadlock"
    assert deadlock["outcome"] == "failed"
    assert deadlock["findings"] == ["deadlock"]
    assert 0 <= deadlock["detection_ms"] < 5000  # measured in the child, carried in the text
    assert tests[f"{name}::test_leak[thread]"]["detection_ms"] is None


def test_a_session_without_backend_tests_writes_an_empty_report(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("def test_plain(): pass")
    pytester.runpytest("--concur-report=report.json").assert_outcomes(passed=1)
    document = json.loads((pytester.path / "report.json").read_text(encoding="utf-8"))
    assert problems(document, schema(), schema()) == []
    assert document["tests"] == []
    assert document["backends"] == []
