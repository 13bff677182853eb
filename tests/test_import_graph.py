"""The package's floors are in order: no import cycle between top-level units.

The graph is read from the source with `ast` (no module is imported): every
`import` and `from ... import`, at module level or inside a function, with relative
imports resolved. Modules collapse to top-level units (`ollama_ft.serve.jobs` ->
`serve`; a top-level module such as `ollama_ft/pipeline.py` is its own unit).
A lazy import inside a function still counts: it hides a cycle from Python's
import machinery, not from a reader.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = "ollama_ft"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# (source unit, target unit) -> [(file:line, import text)]
Edges = dict[tuple[str, str], list[tuple[str, str]]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """`ollama_ft.serve.jobs` -> `serve`; `ollama_ft.pipeline` -> `pipeline`; the package
    itself -> `__init__`; None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> set[str]:
    return {_module_name(path) for path in ROOT.rglob("*.py")}


def _imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement in `module` loads. `from P import x` names the submodule
    P.x when there is one (so `from ollama_ft import catalog` is `ollama_ft.catalog`), else P."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base)
        target = f"{prefix}.{node.module}" if node.module else prefix
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        module_name = sub if sub in known else target
        if module_name not in found:
            found.append(module_name)
    return found


def import_edges() -> Edges:
    edges: Edges = defaultdict(list)
    known = _modules()
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        source_unit = _unit(module)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported_modules(node, module, path.name == "__init__.py", known):
                target_unit = _unit(target)
                if target_unit is None or target_unit == source_unit:
                    continue
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                site = (where, lines[node.lineno - 1].strip())
                if site not in edges[(source_unit, target_unit)]:
                    edges[(source_unit, target_unit)].append(site)
    return dict(edges)


def strongly_connected(nodes: set[str], successors: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(successors.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def _a_cycle(component: list[str], successors: dict[str, set[str]]) -> list[str]:
    """One shortest way round from the component's first member back to it."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(successors.get(node, ())):
            if child == start:
                return paths[node] + [start]
            if child in members and child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return component


def _describe(component: list[str], edges: Edges, successors: dict[str, set[str]]) -> str:
    members = set(component)
    out = [f"cycle between {', '.join(component)} (e.g. {' -> '.join(_a_cycle(component, successors))}):"]
    for (src, dst), sites in sorted(edges.items()):
        if src in members and dst in members:
            out.append(f"  {src} -> {dst}")
            out.extend(f"    {where}: {line}" for where, line in sites)
    return "\n".join(out)


def test_no_cycle_between_top_level_units():
    edges = import_edges()
    nodes = {unit for pair in edges for unit in pair}
    successors: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        successors[src].add(dst)
    cycles = [c for c in strongly_connected(nodes, successors) if len(c) > 1]
    assert not cycles, "import cycles between top-level units:\n" + "\n\n".join(
        _describe(c, edges, successors) for c in cycles)


def test_ollama_never_imports_serve():
    sites = import_edges().get(("ollama", "serve"), [])
    assert not sites, "ollama/ imports serve/ (the bridge sits above the Ollama-format code):\n" + "\n".join(
        f"  {where}: {line}" for where, line in sites)


def test_the_graph_reader_sees_relative_and_lazy_imports():
    # the checker itself: a relative import inside a function resolves to its unit
    tree = ast.parse("def f():\n    from ..ollama import modelfile\n    from . import jobs\n"
                     "    from ollama_ft import catalog, __version__\n")
    known = {"ollama_ft", "ollama_ft.catalog", "ollama_ft.ollama.modelfile", "ollama_ft.serve.jobs"}
    found = [t for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for t in _imported_modules(node, "ollama_ft.serve.app", False, known)]
    assert found == ["ollama_ft.ollama.modelfile", "ollama_ft.serve.jobs", "ollama_ft.catalog", "ollama_ft"]
    assert [_unit(t) for t in found] == ["ollama", "serve", "catalog", "__init__"]
    assert strongly_connected({"a", "b", "c"}, {"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"], ["c"]]
