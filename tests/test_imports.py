"""What loading pytest-concur costs a pytest run that does not use it, and the import graph.

The ``pytest11`` entry point is imported by every pytest run of an environment where the
plugin is installed; asyncio, multiprocessing, concurrent.futures and the checks must wait
for a session that uses them. These tests run fresh interpreters: this suite's own process
has imported everything long ago (see conftest.py).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pytest_concur

PACKAGE = Path(pytest_concur.__file__).parent

# Standard library packages a session that runs no test under a backend does not need.
HEAVY = ("asyncio", "multiprocessing", "concurrent.futures")
# pytest-concur's machinery for running bodies: the process child, stress mode, the loops.
MACHINERY = (
    "pytest_concur._backends._child",
    "pytest_concur._hang",
    "pytest_concur._item_loops",
    "pytest_concur._loop_deadlocks",
    "pytest_concur._report",
    "pytest_concur._shutdown",
    "pytest_concur._stress",
)
# The checks and what they hook.
CHECKS = (
    "pytest_concur._checks._",
    "pytest_concur._checks.blocked_loop",
    "pytest_concur._checks.deadlock",
    "pytest_concur._checks.processes",
    "pytest_concur._checks.tasks",
    "pytest_concur._checks.threads",
    "pytest_concur._patches",
    "pytest_concur._locks",
    "pytest_concur._lock_diagnosis",
    "pytest_concur._workers",
)

# Prints the modules that importing `what` adds to what `import pytest` imports already.
NEW_MODULES = """
import json, sys
import pytest
before = set(sys.modules)
{what}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _fresh(code: str, tmp_path: Path) -> list[Any]:
    """Run ``code`` in a new interpreter without other plugins; the JSON list it printed."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(found, list)
    return found


def _heavy(modules: list[str], *, checks: bool = True) -> list[str]:
    """The modules of ``modules`` that a run without backends should not import."""
    return [
        name
        for name in modules
        if name.startswith(MACHINERY)
        or (checks and name.startswith(CHECKS))
        or any(name == heavy or name.startswith(f"{heavy}.") for heavy in HEAVY)
    ]


def test_importing_the_plugin_imports_no_machinery(tmp_path: Path) -> None:
    new = _fresh(NEW_MODULES.format(what="import pytest_concur.plugin"), tmp_path)
    assert "pytest_concur.plugin" in new  # the measurement measures something
    assert _heavy(new) == []


def test_importing_the_package_imports_only_the_package(tmp_path: Path) -> None:
    new = _fresh(NEW_MODULES.format(what="import pytest_concur"), tmp_path)
    assert [name for name in new if name.startswith("pytest_concur")] == ["pytest_concur"]


def _without_plugin(code: str, tmp_path: Path) -> set[str]:
    """What the same run imports without pytest-concur (on 3.14, pytest's pdb imports
    asyncio): not ours to avoid."""
    return set(_fresh(code.replace("'-p', 'pytest_concur.plugin', ", ""), tmp_path))


# A single --version is answered before plugins load; twice, it lists them.
@pytest.mark.parametrize(
    "args", [["--version", "--version"], ["--help"]], ids=["version-verbose", "help"]
)
def test_pytest_version_and_help_import_no_machinery(tmp_path: Path, args: list[str]) -> None:
    code = NEW_MODULES.format(what=f"pytest.main(['-p', 'pytest_concur.plugin', *{args!r}])")
    new = _fresh(code, tmp_path)
    assert "pytest_concur.plugin" in new
    pytests_own = _without_plugin(code, tmp_path)
    assert [name for name in _heavy(new) if name not in pytests_own] == []


def test_a_session_without_backends_imports_only_the_checks(tmp_path: Path) -> None:
    # The checks are made at session start so that their ini keys are checked up front (a
    # bad one is a usage error even in a session without backends); that imports no heavy
    # standard library package, nor the process, stress and event loop machinery.
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    code = NEW_MODULES.format(
        what="assert pytest.main(['-p', 'pytest_concur.plugin', '-q', 'test_plain.py']) == 0"
    )
    new = _fresh(code, tmp_path)
    assert "pytest_concur._checks.threads" in new
    pytests_own = _without_plugin(code, tmp_path)
    assert [name for name in _heavy(new, checks=False) if name not in pytests_own] == []


def test_a_session_with_the_asyncio_backend_imports_asyncio(tmp_path: Path) -> None:
    # The other side of the tests above: the lazy imports happen when they are needed.
    (tmp_path / "test_async.py").write_text(
        "import pytest\n\n@pytest.mark.backend('asyncio')\nasync def test_x():\n    pass\n"
    )
    code = NEW_MODULES.format(
        what="assert pytest.main(['-p', 'pytest_concur.plugin', '-q', 'test_async.py']) == 0"
    )
    new = _fresh(code, tmp_path)
    assert "asyncio" in new
    assert "pytest_concur._item_loops" in new


def test_public_names_are_handed_on_lazily(tmp_path: Path) -> None:
    code = """
import json, sys
import pytest_concur
out = ["pytest_concur._workers" in sys.modules]
concur = pytest_concur.Concur
out.append("pytest_concur._workers" in sys.modules)
out.append(concur is sys.modules["pytest_concur._workers"].Concur)
out.append(set(pytest_concur.__all__) <= set(dir(pytest_concur)))
try:
    pytest_concur.Nope
except AttributeError as exc:
    out.append(str(exc))
print(json.dumps(out))
"""
    assert _fresh(code, tmp_path) == [
        False,
        True,
        True,
        True,
        "module 'pytest_concur' has no attribute 'Nope'",
    ]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.Module, modules: set[str], here: str) -> set[str]:
    """The package's modules ``tree`` imports when it runs, wherever the import statement is.

    Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from m import x`` is
    an import of the module ``m.x`` if there is one, else of ``m``. The packages a module
    sits in are not counted: running a package's ``__init__`` before its submodules is how
    Python imports, not a cycle (and the ``__init__`` modules here import their
    submodules only inside the hooks that need them).
    """
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != here}


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {
        _module_name(path): _imported(ast.parse(path.read_text()), modules, _module_name(path))
        for path in paths
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from p import q\n"
        "def f():\n    from p.r import s\n"
    )
    assert _imported(tree, {"p", "p.q", "p.r", "p.r.s"}, "p.x") == {"p.r.s"}


def test_the_package_has_no_import_cycle() -> None:
    assert _cycles(_import_graph()) == []


def test_every_subpackage_is_in_the_wheel() -> None:
    # setuptools packages only what pyproject.toml lists: a subpackage missing there is
    # missing from the wheel tox installs, while an editable install hides it.
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not path.exists():  # pragma: no cover - the suite runs from a checkout
        pytest.skip("no pyproject.toml beside the tests")
    pyproject = path.read_text()
    listed = set(
        re.findall(
            r'"(pytest_concur(?:\.\w+)*)"', pyproject.split("packages = [", 1)[1].split("]", 1)[0]
        )
    )
    source = path.parent / "pytest_concur"
    found = {
        ".".join(init.parent.relative_to(path.parent).parts) for init in source.rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
