"""The package's structure: no import circle between modules — counting imports inside functions too, which the
layers contract of import-linter (`make imports`) does not see within a package — and no module or package named
like a module of Python's standard library (``select``, ``random``: shadowed when Python runs from inside the
package)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tokensieve

ROOT = Path(tokensieve.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, is a package's ``__init__``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the package's modules it imports, wherever the import statement is (module level, a function, a
    method); ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in mods:
                        target = target.rsplit(".", 1)[0] if "." in target else ""
                    if target:
                        edges[name].add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    if f"{module}.{alias.name}" in mods:
                        edges[name].add(f"{module}.{alias.name}")
                    elif module in mods:
                        edges[name].add(module)
        edges[name].discard(name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_circles_even_through_imports_inside_functions():
    edges = import_graph()
    assert sum(len(v) for v in edges.values()) > 500  # the graph was read (every module's imports)
    assert circles(edges) == []


def test_the_circle_finder_finds_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_named_like_a_standard_library_module():
    stdlib = set(sys.stdlib_module_names)
    clashes = sorted(
        str(path.relative_to(ROOT))
        for path in [*ROOT.rglob("*.py"), *(p for p in ROOT.rglob("*") if p.is_dir())]
        if (path.stem if path.suffix == ".py" else path.name) in stdlib
    )
    assert clashes == []
