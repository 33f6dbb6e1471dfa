"""The product package imports in one direction: no module imports one that imports it back,
counting the imports inside functions and under `if TYPE_CHECKING:` (a cycle hidden there is
still a tangle to read, and breaks the day someone moves the import up)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deploykit"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str], package: Path = PACKAGE) -> set[str]:
    """Every module of the package that `path` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from deploykit import deploy` imports the module deploykit.deploy
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name != package.name} - {module_name(path, package)}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(path, package): path for path in package.rglob("*.py")}
    return {name: imports_of(path, set(files), package) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (enough to name the tangle)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                found.append([*path[path.index(following) :], following])
            elif following not in state:
                visit(following, [*path, following])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """A package whose only cycle hides in a function and under TYPE_CHECKING."""
    package = tmp_path / "deploykit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from deploykit import b\n")
    (package / "b.py").write_text("def f():\n    from deploykit.c import g\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import deploykit.a\ndef g(): pass\n"
    )
    (package / "d.py").write_text("import deploykit.c\n")
    assert cycles(import_graph(package)) == [["deploykit.a", "deploykit.b", "deploykit.c", "deploykit.a"]]
    (package / "c.py").write_text("def g(): pass\n")
    assert cycles(import_graph(package)) == []


def test_the_product_package_has_no_import_cycle():
    assert cycles(import_graph()) == []
