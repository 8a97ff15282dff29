"""The package's structure, as the style guide asks: no import cycle between its modules (module-level or
function-level imports alike), tools/ as thin CLIs (no sys.path edits, no tool importing another tool), and no
module reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_bdlora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported package module, names taken from it) for every import of the package anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "megatron_bdlora"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megatron_bdlora":
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in known else (node.module, [alias.name]))
    return [(m, names) for m, names in found if m in known]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_between_package_modules():
    known = _modules()
    graph = {name: {m for m, _ in _imports(path, known) if m != name} for name, path in known.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tools_are_thin_clis_without_sys_path_edits_or_imports_of_other_tools():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    offenders = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                offenders.append(f"{path.name}:{node.lineno}: sys.path")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}:{node.lineno}: imports {a.name}" for a in node.names if a.name in tools]
            elif isinstance(node, ast.ImportFrom) and node.module in tools:
                offenders.append(f"{path.name}:{node.lineno}: imports {node.module}")
    assert offenders == []


def test_no_module_imports_another_modules_private_names():
    known = _modules()
    offenders = [f"{name} takes {private} from {module}"
                 for name, path in known.items()
                 for module, names in _imports(path, known) if module != name
                 for private in names if private.startswith("_")]
    assert offenders == []
