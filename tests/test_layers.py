"""The package's imports follow the layer table of docs/design.md, and no two modules import each
other in a circle.

Every import counts, at module level or inside a function (a function-level import is still a
dependency, only a later one), and so do imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "senseflow"
DESIGN = ROOT / "docs" / "design.md"
FRONT_END = "senseflow.cli"  # the one module allowed to import every layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The senseflow modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import senseflow.a.b.c` of a function: its module
                target = target.rpartition(".")[0]
            if target.startswith("senseflow") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer, package prefixes) from the first markdown table of docs/design.md, lowest layer first."""
    rows = []
    for line in DESIGN.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and "`senseflow" in cells[1]:
            rows.append((cells[0], re.findall(r"`(senseflow[\w.]*)`", cells[1])))
        elif rows and not line.startswith("|"):
            break
    return rows


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(table):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def test_design_doc_has_a_layer_table_that_covers_every_module():
    table = layer_table()
    assert len(table) >= 8, "docs/design.md lost its layer table"
    unplaced = [m for m in all_modules() if m != "senseflow" and layer_of(m, table) is None]
    assert not unplaced, f"modules in no layer of docs/design.md: {unplaced}"


def test_no_module_imports_a_higher_layer():
    table = layer_table()
    upward = []
    for module, targets in import_graph().items():
        if module in ("senseflow", FRONT_END):
            continue
        own = layer_of(module, table)
        for target in targets:
            theirs = layer_of(target, table)
            if theirs is not None and own is not None and theirs > own:
                upward.append(f"{module} ({table[own][0]}) imports {target} ({table[theirs][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    circles = strongly_connected(import_graph())
    assert not circles, "modules that import each other in a circle: " + "; ".join(map(str, circles))


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_circle_finder_finds_circles(graph, expected):
    assert strongly_connected(graph) == expected


def test_import_reader_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from senseflow.core import flow\n"
        "def f():\n    from senseflow.train.trainer import Distiller\n"
        "if False:\n    import senseflow.models.adapter\n"
    )
    modules = all_modules()
    found = imports_of("senseflow.method.mod", source, modules)
    assert {"senseflow.core.flow", "senseflow.train.trainer", "senseflow.models.adapter"} <= found
